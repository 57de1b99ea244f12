#!/usr/bin/env bash
# Packs spconv's GPU wheel and what it imports, for the GPU machine (Python 3.12, no network),
# into .gpu_carry/spconv_site.tar.xz (44 MB: the wheels unpacked are 345 MB, over the 64 MiB a
# device call may carry). Run once here, where pip reaches an index; then name .gpu_carry in the
# device call's carry, and benchmarks/run_gpu.sh unpacks it and puts it on PYTHONPATH.
# The versions are the issue's baseline: spconv-cu126 2.3.8 with cumm-cu126 0.7.11; its wheels
# bundle their CUDA 12.6 runtime and NVRTC, so they need no CUDA 12 install there.
set -euo pipefail
cd "$(dirname "$0")/.."
wheels=$(mktemp -d) site=$(mktemp -d)
trap 'rm -rf "$wheels" "$site"' EXIT
for pkg in spconv-cu126==2.3.8 cumm-cu126==0.7.11 pccm==0.4.16 ccimport==0.4.4 fire lark termcolor; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$wheels" "$pkg"
done
for w in "$wheels"/*.whl; do python3 -m zipfile -e "$w" "$site"; done
mkdir -p .gpu_carry
tar -cJf .gpu_carry/spconv_site.tar.xz -C "$site" .
ls -l .gpu_carry/spconv_site.tar.xz

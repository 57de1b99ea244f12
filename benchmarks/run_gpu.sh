#!/usr/bin/env bash
# Everything a GPU session should run, in three device calls of under 10 minutes each (the device
# README: few, full calls), from the repository root on the GPU machine:
#   bash benchmarks/run_gpu.sh tests                  # then
#   bash benchmarks/run_gpu.sh neighbors gaussian     # then
#   bash benchmarks/run_gpu.sh sparse pointconv       # carry .gpu_carry (below)
# (no arguments: all five parts, which pass one call's 600 s limit).
# The GPU image already has torch, triton, pytest, hypothesis, tqdm and matplotlib; the project
# runs from the source tree. The spconv-cu126 baseline: run benchmarks/pack_spconv_gpu.sh once on
# the development machine and name .gpu_carry in the device call's carry; it is unpacked here
# (without it the spconv rows say why they are missing). Logs and tables go to $OUT (or ./gpu_out).
set -uo pipefail
out=${OUT:-gpu_out}
mkdir -p "$out"
export PYTHONPATH=src PYTHONUNBUFFERED=1
parts=${*:-tests neighbors gaussian sparse pointconv}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; python3 -m pointconv info; } 2>&1 | tee "$out/info.txt"
for part in $parts; do
  case $part in
    # GPU tests: every device-parametrized test runs on cuda too, and the Triton kernels run compiled.
    # The whole suite takes about 6 minutes on 2 CPU cores: on the GPU machine's 16 it runs on 8
    # pytest-xdist workers (in its image), and a failure does not stop the others.
    tests)
      workers=$(python3 -c 'import xdist' 2>/dev/null && echo "-n 8")
      timeout 500 python3 -m pytest -q -p no:cacheprovider --maxfail=25 $workers tests 2>&1 \
        | tee "$out/tests.log" | tail -40 ;;
    neighbors) timeout 150 python3 benchmarks/bench_neighbors.py --device cuda 2>&1 | tee "$out/bench_neighbors_cuda.md" ;;
    gaussian) timeout 100 python3 benchmarks/bench_gaussian.py --device cuda 2>&1 | tee "$out/bench_gaussian_cuda.md" ;;
    sparse)  # spconv-cu126 only here (the parity tests with spconv run on CPU, in the CI)
      if [ -f .gpu_carry/spconv_site.tar.xz ]; then
        mkdir -p /tmp/spconv_site && tar -xJf .gpu_carry/spconv_site.tar.xz -C /tmp/spconv_site
      fi
      export PYTHONPATH=src:/tmp/spconv_site
      python3 -c 'import spconv, cumm; print("spconv", spconv.__version__, "cumm", cumm.__version__)' 2>&1 | tail -3
      timeout 90 python3 benchmarks/bench_sparse.py --device cuda 2>&1 | tee "$out/bench_sparse_a_cuda.md"
      timeout 240 python3 benchmarks/bench_sparse.py --device cuda --net 2>&1 | tee "$out/bench_sparse_b_cuda.md" ;;
    pointconv) timeout 120 python3 benchmarks/bench_pointconv.py --device cuda 2>&1 | tee "$out/bench_pointconv_cuda.md" ;;
    *) echo "unknown part $part (tests neighbors gaussian sparse pointconv)"; exit 2 ;;
  esac
done

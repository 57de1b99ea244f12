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
for part in $parts; do  # a misspelled part stops the call before any work, not after the others ran
  case $part in tests|neighbors|gaussian|sparse|pointconv) ;; *) echo "unknown part $part (tests neighbors gaussian sparse pointconv)"; exit 2 ;; esac
done
# run LIMIT LOG COMMAND...: the command's output to LOG (and the screen); a command stopped at its
# limit says so at the end of its log, which would otherwise end in a cut-off table
run() {
  local limit=$1 log=$2
  shift 2
  timeout "$limit" "$@" 2>&1 | tee "$log"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -eq 124 ]; then echo "** stopped at the $limit s limit: cut off above" | tee -a "$log"; fi
  return "$rc"
}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; python3 -m pointconv info; } 2>&1 | tee "$out/info.txt"
for part in $parts; do
  case $part in
    # GPU tests: every device-parametrized test runs on cuda too, and the Triton kernels run compiled.
    # The whole suite takes about 6 minutes on 2 CPU cores: on the GPU machine's 16 it runs on 8
    # pytest-xdist workers (in its image), and a failure does not stop the others.
    tests)
      workers=$(python3 -c 'import xdist' 2>/dev/null && echo "-n 8")
      run 500 "$out/tests.log" python3 -m pytest -q -p no:cacheprovider --maxfail=25 $workers tests | tail -40 ;;
    neighbors) run 150 "$out/bench_neighbors_cuda.md" python3 benchmarks/bench_neighbors.py --device cuda ;;
    gaussian) run 100 "$out/bench_gaussian_cuda.md" python3 benchmarks/bench_gaussian.py --device cuda ;;
    sparse)  # spconv-cu126 only here (the parity tests with spconv run on CPU, in the CI)
      if [ -f .gpu_carry/spconv_site.tar.xz ]; then
        mkdir -p /tmp/spconv_site && tar -xJf .gpu_carry/spconv_site.tar.xz -C /tmp/spconv_site
      fi
      export PYTHONPATH=src:/tmp/spconv_site
      python3 -c 'import spconv, cumm; print("spconv", spconv.__version__, "cumm", cumm.__version__)' 2>&1 | tail -3
      run 90 "$out/bench_sparse_a_cuda.md" python3 benchmarks/bench_sparse.py --device cuda
      run 240 "$out/bench_sparse_b_cuda.md" python3 benchmarks/bench_sparse.py --device cuda --net ;;
    pointconv) run 120 "$out/bench_pointconv_cuda.md" python3 benchmarks/bench_pointconv.py --device cuda ;;
  esac
done

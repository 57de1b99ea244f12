#!/usr/bin/env bash
# Everything a GPU session should run, in three device calls of under 10 minutes each (the device
# README: few, full calls), from the repository root on the GPU machine:
#   bash benchmarks/run_gpu.sh tests neighbors gaussian   # then
#   bash benchmarks/run_gpu.sh sparse pointconv           # carry .gpu_carry (below)
#   bash benchmarks/run_gpu.sh sweep profile              # settings to choose from; where time goes
# (no arguments: all five parts, which pass one call's 600 s limit; the limits below add up to
# 550 s and 450 s for these two calls, so a device session's 30 minutes also leave time to re-run).
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
  case $part in tests|neighbors|gaussian|sparse|sparse_a|sparse_b|pointconv|sweep|profile) ;; *) echo "unknown part $part (tests neighbors gaussian sparse sparse_a sparse_b pointconv sweep profile)"; exit 2 ;; esac
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
    # On 8 pytest-xdist workers (in the GPU image) of 2 threads each: with torch's 16 threads each,
    # the first GPU session's whole suite passed 300 s at 80% (2026-11-23). -v names each failure
    # as it happens (a run stopped at its limit prints no summary); a failure does not stop the
    # others; pytest-timeout (also in the image) stops a hung test after 120 s, not the whole part.
    tests)
      workers=$(python3 -c 'import xdist' 2>/dev/null && echo "-n 8")
      per_test=$(python3 -c 'import pytest_timeout' 2>/dev/null && echo "--timeout=120")
      OMP_NUM_THREADS=2 run 300 "$out/tests.log" python3 -m pytest -v -p no:cacheprovider -rfE --maxfail=25 \
        $workers $per_test tests > /dev/null
      grep -E "FAILED|ERROR|passed|failed|stopped at" "$out/tests.log" | tail -60 ;;
    neighbors) run 150 "$out/bench_neighbors_cuda.md" python3 benchmarks/bench_neighbors.py --device cuda ;;
    gaussian) run 100 "$out/bench_gaussian_cuda.md" python3 benchmarks/bench_gaussian.py --device cuda ;;
    sparse|sparse_a|sparse_b)  # spconv-cu126 only here (its parity tests run on CPU, in the CI); the
      # table (a) alone or the network (b) alone as sparse_a / sparse_b, to fit other parts in a call
      if [ -f .gpu_carry/spconv_site.tar.xz ] && [ ! -d /tmp/spconv_site ]; then
        mkdir -p /tmp/spconv_site && tar -xJf .gpu_carry/spconv_site.tar.xz -C /tmp/spconv_site
      fi
      export PYTHONPATH=src:/tmp/spconv_site
      python3 -c 'import spconv, cumm; print("spconv", spconv.__version__, "cumm", cumm.__version__)' 2>&1 | tail -3
      [ "$part" = sparse_b ] || run 90 "$out/bench_sparse_a_cuda.md" python3 benchmarks/bench_sparse.py --device cuda
      [ "$part" = sparse_a ] || run 240 "$out/bench_sparse_b_cuda.md" python3 benchmarks/bench_sparse.py --device cuda --net ;;
    pointconv) run 120 "$out/bench_pointconv_cuda.md" python3 benchmarks/bench_pointconv.py --device cuda ;;
    # each setting against the current one (sweep_gpu_configs.py's docstring): the Gaussian grid
    # against brute force, the GEMM's column order and tiles, Pointwise lookups per step
    sweep) run 400 "$out/sweep_gpu_configs.md" python3 benchmarks/sweep_gpu_configs.py gaussian sparse pointwise ;;
    # kernels' time against wall time, launches and synchronizations per run (profile_gpu.py)
    profile) run 150 "$out/profile_gpu.md" python3 benchmarks/profile_gpu.py ;;
  esac
done

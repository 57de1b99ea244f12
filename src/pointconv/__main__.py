"""``python -m pointconv demo [neighbors] | bench | info``.

``demo``: the main job, a neural SDF fitted with anisotropic Gaussian kNN aggregation
(``pointconv.demos.sdf``); ``demo neighbors``: the neighbor-search tour (``pointconv.demos.neighbors``).
"""
from __future__ import annotations

import argparse
import pathlib
import runpy
import sys

import torch

import pointconv
from pointconv._backend import (MIN_TRITON, backend_for, dotted, forced_backend, triton_available, triton_version,
                                triton_version_string)


def info() -> None:
    import numpy
    import scipy

    triton_text = triton_version_string() or "not installed"
    if triton_version() is not None and not triton_available():
        triton_text += (f" (the kernels need >= {dotted(MIN_TRITON)}: "
                        "CUDA tensors take the torch backend)")
    print(f"pointconv {pointconv.__version__}")
    print(f"torch {torch.__version__}, triton {triton_text}, numpy {numpy.__version__}, scipy {scipy.__version__}")
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
        print(f"CUDA: {torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})")
    else:
        print("CUDA: not available")
    print(f"forced backend: {forced_backend() or 'none'} (POINTCONV_BACKEND or pointconv.use_backend)")
    print()
    print("| op | " + " | ".join(str(d) for d in devices) + " |")
    print("|---|" + "---|" * len(devices))
    for op, impl in _OPS:
        cells = []
        for d in devices:
            try:
                cells.append(impl(backend_for(d), d))
            except RuntimeError as e:
                cells.append(f"unavailable ({e})")
        print(f"| {op} | " + " | ".join(cells) + " |")


def _search_impl(backend, device, *, d3_float32=True):
    if backend == "reference":
        return "reference (dense)"
    if backend == "triton" and d3_float32:
        return "triton (brute force <= 2048 points, else uniform grid)"
    if device.type == "cpu":
        return "torch (scipy cKDTree for D <= 8, one shared by a batch's clouds under 20K points; else chunked brute force)"
    return "torch (chunked brute force)"


_OPS = [
    ("knn / ball_query / NeighborIndex, float32", lambda b, d: _search_impl(b, d)),
    ("knn / ball_query / NeighborIndex, float64", lambda b, d: _search_impl(b, d, d3_float32=False)),
    ("farthest_point_sample, float32", lambda b, d: {
        "triton": "triton", "reference": "reference (the torch loop)"}.get(
        b, "torch (the reference loop, in NumPy)" if d.type == "cpu" else "torch (the reference loop)")),
    ("grid_subsample", lambda b, d: "torch (unique + index_add)" if d.type == "cpu" else "torch (unique + index_put)"),
    ("knn_aggregate_aniso / _iso, float32", lambda b, d: {
        "reference": "reference (dense)",
        "triton": "triton (one fused kernel without autograd; else selection + weighted-sum kernels, "
                  "2 backward and 2 double-backward kernels)",
    }.get(b, "torch (GEMM-ranked exact selection; kd-tree on large, not too anisotropic CPU clouds; chunked weighted sums)")),
    ("gather", lambda b, d: "torch (indexing)"),
    ("sparse convolution (pointconv.sparse)", lambda b, d: (
        "triton (implicit GEMM over the kernel map; torch ops for groups > 1)" if b == "triton"
        else "torch (kernel maps + per-offset gather-GEMM-scatter)")),
    ("pointwise_conv, float32", lambda b, d: {
        "reference": "reference (dense membership)",
        "triton": "triton (fused per-cell means + GEMM kernels)",
    }.get(b, "torch (CSR per-cell means + GEMM, in row blocks)")),
]


def bench(argv) -> None:
    script = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "bench_neighbors.py"
    if not script.exists():
        sys.exit("the benchmarks ship with the source tree: run from a git checkout of pointconv")
    module = runpy.run_path(str(script), run_name="pointconv_bench")  # (defines main, runs nothing)
    sys.argv[0] = "python -m pointconv bench"  # argparse's prog, in usage and errors
    module["main"](argv)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(
        prog="python -m pointconv", usage="python -m pointconv [-h] {demo [neighbors],bench,info} ...",
        description="demo: fit a neural SDF; demo neighbors: the neighbor-search tour; bench: the neighbor "
                    "benchmarks; info: versions and backends. 'python -m pointconv COMMAND --help' lists "
                    "the options of a command.")
    ap.add_argument("command", choices=["demo", "bench", "info"])
    # only the first word is the top-level parser's: the rest, -h included, goes to the command's parser
    args = ap.parse_args(argv[:1])
    rest = argv[1:]
    if args.command == "info":
        if rest in (["-h"], ["--help"]):
            print("usage: python -m pointconv info\n\nVersions, and the backend each op runs on per device.")
            return
        if rest:
            ap.error(f"info takes no arguments, got {' '.join(rest)}")
        try:
            forced_backend()
        except ValueError as e:  # a bad POINTCONV_BACKEND: the diagnostic command says so plainly
            ap.error(str(e))
        info()
    elif args.command == "demo":
        if rest[:1] == ["neighbors"]:
            from pointconv.demos.neighbors import main as demo

            demo(rest[1:])
        else:
            from pointconv.demos.sdf import main as demo

            demo(rest)
    else:
        bench(rest)


if __name__ == "__main__":
    main()

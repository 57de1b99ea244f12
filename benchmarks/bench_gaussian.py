"""Anisotropic Gaussian kNN aggregation: pointconv against the plain-PyTorch reference, one run.

The cuda_knn_aggregate package's table: B=2, Q=12288, P=4096, F=64, K=16, float32. Three tasks:
  forward        f_out, w_out, dists, idxs = knn_aggregate_aniso(q, p, f, sigma, R, K)
  backward       forward + backward of a loss on f_out and w_out to q, p, f, sigma, R
  2nd order      forward + g = grad(sdf, q, create_graph=True) + backward of an Eikonal loss on g
Each (method, task) runs in its own process so its peak memory is its own: the peak resident set
on CPU (above the inputs), torch.cuda.max_memory_allocated on CUDA. The original reports on an
RTX 3080: plain PyTorch 23.6 / 57.1 / 78.6 ms, its CUDA kernels 3.0 / 20.8 / 29.8 ms.

``--selection`` times instead the two exact strategies of the CPU selection (``select="aniso"``),
the GEMM over quadratic features and the kd-tree with an eigenvalue bound, on one cloud per size
and width range, and shows which one ``_tree_pays`` picks (the kd-tree's candidates grow with the
anisotropy as K (1 + spread^1.5), the GEMM's work with the cloud).

    python benchmarks/bench_gaussian.py --device cpu
    python benchmarks/bench_gaussian.py --selection
    python benchmarks/bench_gaussian.py --anisotropy --Q 1000

``--anisotropy`` times the GEMM selection against the dense exact pass on precisions up to 1e6
times larger on one axis (where the GEMM's certificate needs more candidates than K + 4).

``--small-clouds`` times the forward on batches of many small ragged clouds (the CPU path ranks
clouds of up to 64 points by every exponent, many clouds per pass) against the same op with
that pass off (each cloud on its own GEMM selection, as before it) and the reference.

    python benchmarks/bench_gaussian.py --small-clouds
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

import pointconv
from pointconv.demos._cli import check_device, positive_int
from pointconv._timing import provenance
from pointconv.gaussian import knn_aggregate_aniso_reference

METHODS = {"reference": knn_aggregate_aniso_reference, "pointconv": pointconv.knn_aggregate_aniso,
           # CUDA only: the same op on the torch backend (torch ops and no Triton kernels), to measure the
           # kernels' gain in the same run
           "torch-ops": pointconv.knn_aggregate_aniso}
TASKS = ("forward", "backward", "2nd order")


def make_inputs(B, Q, P, F, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(B, Q, 3, generator=g)
    p = torch.rand(B, P, 3, generator=g)
    f = torch.randn(B, P, F, generator=g)
    sigma = 200 + 800 * torch.rand(B, P, 3, generator=g)  # Gaussian widths 0.02-0.05: about the point spacing
    R = torch.linalg.qr(torch.randn(B, P, 3, 3, generator=g))[0]
    return [t.to(device) for t in (q, p, f, sigma, R)]


def run_task(fn, inputs, K, task):
    leaves = [t.detach().requires_grad_(task != "forward") for t in inputs]
    if task == "forward":
        with torch.no_grad():
            return fn(*leaves, K)
    f_out, w, d, i = fn(*leaves, K)
    if task == "backward":
        (f_out.square().sum() + w.sum()).backward()
        return leaves
    sdf = (f_out / (w.sum(-1, keepdim=True) + 1e-6)).sum(-1)
    (g,) = torch.autograd.grad(sdf.sum(), leaves[0], create_graph=True)
    ((g.norm(dim=-1) - 1) ** 2).mean().backward()
    return leaves


def worker(args):
    device = torch.device(args.device)
    inputs = make_inputs(args.B, args.Q, args.P, args.F, device)
    fn = METHODS[args.method]
    if args.method == "torch-ops":
        pointconv.use_backend("torch").__enter__()  # for the whole process: forward and backward
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    run_task(fn, inputs, args.K, args.task)  # warm-up (and the peak-memory run on CPU)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(args.repeat):
        sync()
        t0 = time.perf_counter()
        run_task(fn, inputs, args.K, args.task)
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - args.base_rss
    print(json.dumps({"ms": statistics.median(times), "peak_mb": peak / 2**20}))


# per-axis precisions drawn from these ranges (the cuda_knn_aggregate table's is 200-1000)
SELECTION_PRECISIONS = [(100.0, 100.0), (200.0, 1000.0), (50.0, 1000.0), (1.0, 1000.0)]


def selection_table(args):
    from pointconv.gaussian import select
    from pointconv.gaussian._exponent import exponent_bounds

    print(provenance("bench_gaussian --selection", "cpu"))
    print(f"> the CPU selection's two exact strategies: Q={args.Q} uniform queries, K={args.K}, float32, "
          f"one run each; the picked one in bold")
    print()
    print("| P | precisions | spread | GEMM ms | kd-tree ms | picked | picked / faster | same indices |")
    print("|---:|---|---:|---:|---:|---|---:|---|")
    g = torch.Generator().manual_seed(0)
    for lo, hi in SELECTION_PRECISIONS:
        for P in args.selection_sizes:
            q, p = torch.rand(args.Q, 3, generator=g), torch.rand(P, 3, generator=g)
            sigma = lo + (hi - lo) * torch.rand(P, 3, generator=g)
            R = torch.linalg.qr(torch.randn(P, 3, 3, generator=g))[0]
            bound, spread = exponent_bounds(sigma, R)
            t0 = time.perf_counter()
            by_gemm = select._select_gemm(q, p, sigma, R, args.K)
            t1 = time.perf_counter()
            by_tree = select._select_tree(q, p, sigma, R, args.K, bound, spread)
            t2 = time.perf_counter()
            ms = {"GEMM": (t1 - t0) * 1e3, "kd-tree": (t2 - t1) * 1e3}
            picked = "kd-tree" if bound > 0 and select._tree_pays(P, args.K, spread) else "GEMM"
            shown = {m: (f"**{v:.0f}**" if m == picked else f"{v:.0f}") for m, v in ms.items()}
            print(f"| {P:,} | {lo:g}-{hi:g} | {spread:.1f} | {shown['GEMM']} | {shown['kd-tree']} | {picked} | "
                  f"{ms[picked] / min(ms.values()):.2f}x | {'yes' if torch.equal(by_gemm, by_tree) else 'NO'} |",
                  flush=True)


ANISOTROPY_RATIOS = [1.0, 100.0, 1e3, 1e6]


def anisotropy_table(args):
    """The GEMM selection on very anisotropic precisions (100 on two axes, 100 x ratio on the
    third, random rotations) against the exact dense pass, which it used to fall back to."""
    from pointconv.gaussian import select

    P, Q = args.anisotropy_points, args.Q
    print(provenance("bench_gaussian --anisotropy", "cpu"))
    print(f"> the CPU GEMM selection against the dense exact pass: P={P:,}, Q={Q:,} uniform points, K={args.K}, "
          "one run each, in turns")
    print()
    print("| dtype | precision ratio | GEMM selection ms | dense pass ms | dense / GEMM | same indices |")
    print("|---|---:|---:|---:|---:|---|")
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float64, torch.float32):
        for ratio in ANISOTROPY_RATIOS:
            q, p = torch.rand(Q, 3, generator=g, dtype=dtype), torch.rand(P, 3, generator=g, dtype=dtype)
            sigma = torch.tensor([100.0, 100.0, 100.0 * ratio], dtype=dtype).expand(P, 3).contiguous()
            R = torch.linalg.qr(torch.randn(P, 3, 3, generator=g, dtype=torch.float64))[0].to(dtype)
            t0 = time.perf_counter()
            by_gemm = select._select_gemm(q, p, sigma, R, args.K)
            t1 = time.perf_counter()
            by_dense = select._select_dense(q, p, sigma, R, args.K)
            t2 = time.perf_counter()
            print(f"| {str(dtype).split('.')[1]} | {ratio:g} | {(t1 - t0) * 1e3:.0f} | {(t2 - t1) * 1e3:.0f} | "
                  f"{(t2 - t1) / (t1 - t0):.1f}x | {'yes' if torch.equal(by_gemm, by_dense) else 'NO'} |", flush=True)


SMALL_CLOUDS = [(2000, 8, 8, 4), (500, 64, 48, 16), (200, 256, 64, 16)]  # (clouds, queries, points, K)


def small_clouds_table(args):
    """The forward on many small clouds of random lengths up to the given size (float32, F = 4)."""
    from pointconv.gaussian import knn_aggregate_aniso_reference, select

    def per_cloud(*a, **kw):
        saved, select._SMALL_CLOUD = select._SMALL_CLOUD, 0
        try:
            return pointconv.knn_aggregate_aniso(*a, **kw)
        finally:
            select._SMALL_CLOUD = saved

    print(provenance("bench_gaussian --small-clouds", "cpu"))
    print("> the forward on batches of small clouds (lengths uniform in 0..points), float32, F=4, "
          f"median of {args.repeat} runs, methods in turns")
    print()
    print("| clouds x queries x points | K | pointconv ms | per-cloud GEMM ms | reference ms | "
          "per-cloud / pointconv | reference / pointconv | same idx, w, dists |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    g = torch.Generator().manual_seed(0)
    methods = {"pointconv": pointconv.knn_aggregate_aniso, "per-cloud": per_cloud,
               "reference": knn_aggregate_aniso_reference}
    for B, Q, P, K in SMALL_CLOUDS:
        q, p, f = torch.rand(B, Q, 3, generator=g), torch.rand(B, P, 3, generator=g), torch.randn(B, P, 4, generator=g)
        sigma = 1 + 10 * torch.rand(B, P, 3, generator=g)
        R = torch.linalg.qr(torch.randn(B, P, 3, 3, generator=g))[0]
        lengths = torch.randint(0, P + 1, (B,), generator=g)
        times = {m: [] for m in methods}
        outs = {}
        for _ in range(args.repeat):
            for name, fn in methods.items():
                t0 = time.perf_counter()
                outs[name] = fn(q, p, f, sigma, R, K, p_lengths=lengths)
                times[name].append((time.perf_counter() - t0) * 1e3)
        ms = {m: statistics.median(t) for m, t in times.items()}
        same = all(torch.equal(a, b) for a, b in zip(outs["pointconv"][1:], outs["per-cloud"][1:])) and all(
            torch.equal(a, b) for a, b in zip(outs["pointconv"][1:], outs["reference"][1:]))
        print(f"| {B:,} x {Q} x {P} | {K} | {ms['pointconv']:.0f} | {ms['per-cloud']:.0f} | {ms['reference']:.0f} | "
              f"{ms['per-cloud'] / ms['pointconv']:.1f}x | {ms['reference'] / ms['pointconv']:.1f}x | "
              f"{'yes' if same else 'NO'} |", flush=True)


def baseline_rss(args):
    """Resident set of a process that made the inputs and did nothing else (bytes)."""
    code = (f"import resource, torch, pointconv, sys; sys.path.insert(0, {repr(sys.path[0])});"
            f"from bench_gaussian import make_inputs; x = make_inputs({args.B}, {args.Q}, {args.P}, {args.F}, 'cpu');"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--B", type=positive_int, default=2)
    ap.add_argument("--Q", type=positive_int, default=12288)
    ap.add_argument("--P", type=positive_int, default=4096)
    ap.add_argument("--F", type=positive_int, default=64)
    ap.add_argument("--K", type=positive_int, default=16)
    ap.add_argument("--repeat", type=positive_int, default=3, help="timed runs of pointconv (after one warm-up)")
    ap.add_argument("--ref-repeat", type=positive_int, default=1, help="timed runs of the reference (seconds each on CPU)")
    ap.add_argument("--selection", action="store_true",
                    help="time the CPU selection's GEMM and kd-tree strategies instead (--selection-sizes, --Q, --K)")
    ap.add_argument("--selection-sizes", nargs="+", type=positive_int, default=[4096, 16384, 65536, 131072])
    ap.add_argument("--anisotropy", action="store_true",
                    help="time the CPU GEMM selection against the dense pass on very anisotropic precisions instead "
                         "(--anisotropy-points, --Q, --K)")
    ap.add_argument("--anisotropy-points", type=positive_int, default=20000)
    ap.add_argument("--small-clouds", action="store_true",
                    help="time the CPU forward on batches of many small clouds instead (--repeat)")
    ap.add_argument("--worker", nargs=2, metavar=("METHOD", "TASK"), help=argparse.SUPPRESS)
    ap.add_argument("--base-rss", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    try:  # before any work: a clear error, not a traceback from the first CUDA call
        check_device(args.device)
    except ValueError as e:
        ap.error(str(e))
    if args.worker:
        args.method, args.task = args.worker
        return worker(args)
    if args.selection:
        return selection_table(args)
    if args.anisotropy:
        return anisotropy_table(args)
    if args.small_clouds:
        return small_clouds_table(args)

    device_type = torch.device(args.device).type  # ("cpu:0" is a CPU too)
    base = baseline_rss(args) if device_type == "cpu" else 0
    print(provenance("bench_gaussian", args.device))
    print(f"> B={args.B} Q={args.Q} P={args.P} F={args.F} K={args.K}, float32, median of {args.repeat} runs "
          f"(reference: {args.ref_repeat}); peak memory above the inputs")
    print()
    methods = ["reference", "pointconv"] + (["torch-ops"] if device_type == "cuda" else [])
    extra = " torch-ops ms | kernels' gain |" if "torch-ops" in methods else ""
    print("| task | reference ms | pointconv ms | speed-up | reference peak MiB | pointconv peak MiB | memory ratio |"
          + extra)
    print("|---|---:|---:|---:|---:|---:|---:|" + "---:|---:|" * bool(extra))
    for task in TASKS:
        res = {}
        for method in methods:
            cmd = [sys.executable, __file__, "--device", args.device, "--B", str(args.B), "--Q", str(args.Q),
                   "--P", str(args.P), "--F", str(args.F), "--K", str(args.K),
                   "--repeat", str(args.ref_repeat if method == "reference" else args.repeat),
                   "--worker", method, task, "--base-rss", str(base)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{method} {task} failed:\n{out.stderr[-3000:]}")
            res[method] = json.loads(out.stdout.strip().splitlines()[-1])
        r, c = res["reference"], res["pointconv"]
        row = (f"| {task} | {r['ms']:.1f} | {c['ms']:.2f} | {r['ms'] / c['ms']:.1f}x | {r['peak_mb']:.0f} | "
               f"{c['peak_mb']:.0f} | {r['peak_mb'] / max(c['peak_mb'], 1e-9):.1f}x |")
        if extra:
            t = res["torch-ops"]
            row += f" {t['ms']:.2f} | {t['ms'] / c['ms']:.1f}x |"
        print(row, flush=True)


if __name__ == "__main__":
    main()

"""Where a call's time goes: device kernels, host launches and host-device synchronizations.

For a GPU session with little time: one run of this names the gap between a wall-clock time and
the kernels' time. Per case (after warm-up runs), over ``--runs`` runs under ``torch.profiler``:
wall ms per run, device (kernel) ms per run, kernel launches per run, synchronizations per run
(``cudaStreamSynchronize`` / ``cudaDeviceSynchronize`` / blocking ``cudaMemcpy``), then the
operators with the most host time and the kernels with the most device time.

  sparse_a   bench_sparse (a): SubMConv3d 64 -> 64 forward on the 182K-voxel shell, map built each run
  sparse_b   bench_sparse (b): spconv's benchmark network, forward, fp32
  gaussian   bench_gaussian's forward: B = 2, Q = 12,288, P = 4,096, F = 64, K = 16
  knn        self-kNN of 1M uniform points, k = 16 (bench_neighbors' target size)

On CPU the same runs are profiled without device columns (a check of the script, and of the
host operators' counts).

  PYTHONPATH=src python benchmarks/profile_gpu.py [sparse_a sparse_b gaussian knn] [--runs 5]
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import pointconv
from pointconv._timing import provenance, timed_ms

_SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy ", "cudaMemcpy(")
_LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")


def _case(name, device, small):
    """``(description, run)``: a callable doing one run of the case."""
    import bench_gaussian
    import bench_sparse
    import pointconv.sparse as sp

    if name == "sparse_a":
        idx = bench_sparse.sphere_shell(radius=12.0, size=32, device=device) if small else \
            bench_sparse.sphere_shell(device=device)
        feats = torch.randn(len(idx), 64, device=device)
        conv = sp.SubMConv3d(64, 64, 3, bias=False).to(device)
        size = 32 if small else 256

        def run():
            with torch.no_grad():
                return conv(sp.SparseConvTensor(feats, idx, [size] * 3, 1)).features
        return f"SubMConv3d 64 -> 64 forward, {len(idx):,} voxels, map built each run", run
    if name == "sparse_b":
        shape = [64, 400, 400] if small else [80, 1600, 1600]
        idx = bench_sparse.street_scene(n_voxels=3000 if small else 120_000, shape=shape, device=device)
        feats = torch.randn(len(idx), 3, device=device)
        net = bench_sparse.benchmark_net(sp).to(device)

        def run():
            with torch.no_grad():
                return net(sp.SparseConvTensor(feats, idx, shape, 1)).features
        return f"spconv's benchmark network forward, {len(idx):,} voxels, fp32", run
    if name == "gaussian":
        B, Q, P, F, K = (2, 64, 4096, 8, 16) if small else (2, 12288, 4096, 64, 16)
        q, p, f, sigma, R = bench_gaussian.make_inputs(B, Q, P, F, device)

        def run():
            return pointconv.knn_aggregate_aniso(q, p, f, sigma, R, K)[0]
        return f"knn_aggregate_aniso forward, B = {B}, Q = {Q:,}, P = {P:,}, F = {F}, K = {K}", run
    if name == "knn":
        n = 20_000 if small else 1_000_000
        pts = torch.rand(1, n, 3, device=device)

        def run():
            return pointconv.knn(pts, pts, 16).idx
        return f"self-kNN, {n:,} uniform points, k = 16", run
    raise ValueError(name)


def _count(events, names):
    return sum(e.count for e in events if any(e.key.startswith(n) or n in e.key for n in names))


def profile_case(name, device, runs, small=False):
    what, run = _case(name, device, small)
    for _ in range(2):  # warm-up: compilation, caches, allocator
        run()
    wall = timed_ms(run, device, repeat=runs)[0]  # (without the profiler, which slows the host)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(runs):
            run()
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    print(f"### {name}: {what}\n")
    line = f"wall {wall:.2f} ms per run (median, no profiler)"
    if cuda:
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        device_ms = sum(e.self_device_time_total for e in kernels) / 1e3 / runs
        line += (f"; kernels {device_ms:.2f} ms; launches {_count(events, _LAUNCHES) / runs:.0f}; "
                 f"synchronizations {_count(events, _SYNCS) / runs:.0f} per run")
    ops = [e for e in events if e.key.startswith("aten::")]
    line += f"; aten operators {sum(e.count for e in ops) / runs:.0f} per run"
    print(line + "\n")
    print("| operator (host) | calls / run | host ms / run |")
    print("|---|---:|---:|")
    for e in sorted(ops, key=lambda e: -e.self_cpu_time_total)[:12]:
        print(f"| {e.key} | {e.count / runs:.0f} | {e.self_cpu_time_total / 1e3 / runs:.3f} |")
    if cuda:
        print("\n| kernel (device) | calls / run | device ms / run |")
        print("|---|---:|---:|")
        for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:12]:
            print(f"| {e.key[:90]} | {e.count / runs:.0f} | {e.self_device_time_total / 1e3 / runs:.3f} |")
    print(flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cases = ["sparse_a", "sparse_b", "gaussian", "knn"]
    ap.add_argument("cases", nargs="*", help=f"any of {cases} (default: all)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="small sizes (a quick check of the script)")
    args = ap.parse_args(argv)
    unknown = [c for c in args.cases if c not in cases]
    if unknown:
        ap.error(f"unknown cases {unknown}: choose from {cases}")
    device = torch.device(args.device)
    print(provenance("profile_gpu", device))
    print()
    for name in args.cases or cases:
        profile_case(name, device, args.runs, args.small)


if __name__ == "__main__":
    main()

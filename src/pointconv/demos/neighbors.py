"""Neighbor-search demo: search a generated cloud and print what each op took.

A noisy torus of ``--points`` points (float32) stands in for a scan. The table lists each op, its
sizes, the wall time and the backend that ran it.
"""
from __future__ import annotations

import argparse
import math

import torch

import pointconv
from pointconv._backend import backend_for
from pointconv._timing import timed_ms
from pointconv.demos._cli import check_device, positive_int, seed_int


def torus(n: int, generator: torch.Generator) -> torch.Tensor:
    u = torch.rand(n, generator=generator) * 2 * math.pi
    v = torch.rand(n, generator=generator) * 2 * math.pi
    x = torch.stack([(1 + 0.35 * v.cos()) * u.cos(), (1 + 0.35 * v.cos()) * u.sin(), 0.35 * v.sin()], 1)
    return x + 0.005 * torch.randn(n, 3, generator=generator)


def _timed(fn, device):
    ms, out = timed_ms(fn, device)
    return out, ms


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pointconv demo neighbors", description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--points", type=positive_int, default=100_000, help="points in the generated cloud (>= 1)")
    ap.add_argument("--k", type=positive_int, default=16, help="neighbors per point (>= 1)")
    ap.add_argument("--seed", type=seed_int, default=0, help="random seed")
    args = ap.parse_args(argv)
    try:
        device = check_device(args.device)
    except ValueError as e:
        ap.error(str(e))
    if args.k >= args.points:
        ap.error(f"--k ({args.k}) must be smaller than --points ({args.points})")
    g = torch.Generator().manual_seed(args.seed)
    pts = torch.stack([torus(args.points, g), torus(args.points, g)]).to(device)  # B = 2 clouds
    m = max(1, args.points // 4)  # queries per cloud
    queries = torch.stack([torus(m, g), torus(m, g)]).to(device)
    backend = backend_for(device)
    n, k = args.points, args.k
    rows = []

    res, ms = _timed(lambda: pointconv.knn(pts, pts, k, exclude_self=True), device)
    rows.append(("knn (self, exclude_self)", f"2 x {n:,}", k, ms, backend))
    mean_nn = res.dists[..., 0].sqrt().mean().item()
    radius = 3 * mean_nn
    res, ms = _timed(lambda: pointconv.ball_query(queries, pts, radius, k), device)
    filled = (res.idx >= 0).float().mean().item()
    rows.append((f"ball_query (r = {radius:.4f})", f"2 x {m:,} -> {n:,}", k, ms, backend))
    index, ms = _timed(lambda: pointconv.NeighborIndex(pts), device)
    rows.append(("NeighborIndex build", f"2 x {n:,}", "", ms, backend))
    _, ms = _timed(lambda: index.knn(queries, k), device)
    rows.append(("NeighborIndex.knn", f"2 x {m:,} -> {n:,}", k, ms, backend))
    n_fps = min(1024, n)
    fps, ms = _timed(lambda: pointconv.farthest_point_sample(pts, n_fps), device)
    rows.append(("farthest_point_sample", f"2 x {n:,} -> {n_fps:,}", "", ms, backend))
    sub, ms = _timed(lambda: pointconv.grid_subsample(pts, 0.05), device)
    rows.append(("grid_subsample (0.05)", f"2 x {n:,} -> {int(sub.lengths.max()):,}", "", ms, backend))
    nbr, ms = _timed(lambda: pointconv.gather(pts, res.idx), device)
    rows.append(("gather", f"2 x {m:,} x {k}", k, ms, "torch"))

    print(f"pointconv {pointconv.__version__} neighbor demo on {device}: a noisy torus, 2 clouds")
    print()
    print("| op | points | k | ms | backend |")
    print("|---|---:|---:|---:|---|")
    for op, size, kk, ms, be in rows:
        print(f"| {op} | {size} | {kk} | {ms:.1f} | {be} |")
    print()
    distinct = "all" if all(len(set(row.tolist())) == n_fps for row in fps.cpu()) else "NOT all"
    print(f"mean nearest-neighbor distance {mean_nn:.5f}; ball query slots filled {100 * filled:.1f}%; "
          f"FPS picked {n_fps:,} points per cloud, {distinct} distinct")


if __name__ == "__main__":
    main()

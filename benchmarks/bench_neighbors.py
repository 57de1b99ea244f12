"""Neighbor-search benchmark: pointconv kNN against its baselines, in one run on one device.

Self-kNN (queries = points) and query kNN (a second cloud of the same size), k = 16, uniform
points in the unit cube, one cloud (B = 1), float32. Baselines measured in the same run:
  * torch ``cdist`` + ``topk`` on the same device, chunked over queries so a chunk's distance
    matrix stays under --chunk-bytes (skipped above --max-pairs Q x P pairs: it would take minutes);
  * scipy ``cKDTree`` (build + query, ``workers=-1``), on CPU.
pointconv is timed as ``pointconv.knn`` (index build included) and as a query on a prebuilt
``NeighborIndex``. Every pointconv result is checked against cKDTree's distances.

A second table times self-kNN on batches of small clouds (``--batches``, B x N: the deep-learning
case) against cKDTree built and queried per cloud (``workers=-1``) and batched ``cdist`` + ``topk``.
A third times self-kNN on clouds that are hard for a kd-tree (``--hard``): voxel centers of a sphere
shell (integer coordinates: the k-th neighbor ties with many points), half the points at the origin
(zero padding counted as points), and 1,000 sites repeated 100 times each, against cKDTree.
A fourth times farthest point sampling (``--fps``, B x N -> n) against the plain vectorized torch
loop (``_fps_torch``, also its reference), the two timed in turns; the indices must be equal.
A fifth times self-kNN in more dimensions than the kd-tree takes (``--dims``, B x N x D: feature
space, as DGCNN's EdgeConv searches it; ``--dims-zeroed``: every other point zero, as feature
vectors after a ReLU) against batched ``cdist`` + ``topk`` and the literal exact
method (``exact_rows_search``: every distance with ``sq_dist``, each row sorted; skipped above
--literal-max-pairs), whose answer ours must equal bitwise.

    python benchmarks/bench_neighbors.py --device cpu
    python benchmarks/bench_neighbors.py --device cuda --sizes 1000 10000 100000 1000000
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
from scipy.spatial import cKDTree

import pointconv
from pointconv.demos._cli import check_device, positive_int, shape_spec
from pointconv._timing import provenance, timed_ms


def timed(fn, device, repeat, warmup=1):
    """Median wall time in ms of ``fn()`` (after ``warmup`` calls) and its last result."""
    return timed_ms(fn, device, repeat, warmup)


def cdist_topk(q, p, k, chunk_bytes):
    chunk = max(1, chunk_bytes // (4 * p.shape[0]))
    d_out, i_out = [], []
    for s in range(0, q.shape[0], chunk):
        d = torch.cdist(q[s:s + chunk], p).square_()
        d, i = torch.topk(d, k, dim=1, largest=False, sorted=True)
        d_out.append(d)
        i_out.append(i)
    return torch.cat(d_out), torch.cat(i_out)


def ckdtree_knn(q, p, k):
    tree = cKDTree(p)
    return tree.query(q, k=k, workers=-1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", type=positive_int, nargs="*", default=[1_000, 10_000, 100_000, 1_000_000],
                    help="N of the single-cloud table (none: skip it)")
    ap.add_argument("--k", type=positive_int, default=16)
    ap.add_argument("--repeat", type=positive_int, default=3)
    ap.add_argument("--max-pairs", type=float, default=None,
                    help="largest Q*P for cdist+topk (default 1e10 on CPU, 1e12 on CUDA)")
    ap.add_argument("--chunk-bytes", type=int, default=1 << 30)
    ap.add_argument("--batches", nargs="*", type=shape_spec(2), default=["32x1024", "128x512", "8x4096", "16x2048"],
                    help="B x N of the batched table (none: skip it)")
    ap.add_argument("--hard", nargs="*", default=list(HARD_CLOUDS), choices=list(HARD_CLOUDS),
                    help="clouds of the hard-cloud table (none: skip it)")
    ap.add_argument("--fps", nargs="*", type=shape_spec(3), default=["32x1024x512", "16x4096x1024", "8x8192x2048", "1x100000x4096"],
                    help="B x N x n of the farthest-point-sampling table (none: skip it)")
    ap.add_argument("--dims", nargs="*", type=shape_spec(3), default=["2x6000x16", "2x6000x64", "1x20000x32"],
                    help="B x N x D of the high-dimensional table (none: skip it)")
    ap.add_argument("--dims-zeroed", nargs="*", type=shape_spec(3), default=["1x20000x16"],
                    help="B x N x D of high-dimensional clouds whose every other point is zero (as "
                         "feature vectors after a ReLU), in the same table (none: skip them)")
    ap.add_argument("--literal-max-pairs", type=float, default=1e8,
                    help="largest B*N*N for the literal method in the high-dimensional table")
    args = ap.parse_args(argv)
    try:  # before any work: a clear error, not a traceback from the first CUDA call
        check_device(args.device)
    except ValueError as e:
        ap.error(str(e))
    smallest = min([*args.sizes, *(int(s.split("x")[1]) for s in [*args.batches, *args.dims, *args.dims_zeroed])],
                   default=args.k)
    if args.k > smallest:  # (cdist + topk, the baseline, needs k points)
        ap.error(f"--k {args.k} is larger than the smallest cloud ({smallest} points)")
    device = torch.device(args.device)
    max_pairs = args.max_pairs if args.max_pairs is not None else (1e12 if device.type == "cuda" else 1e10)

    print(provenance("bench_neighbors", device))
    gen = torch.Generator().manual_seed(0)
    if args.sizes:
        single_cloud_table(args, device, gen, max_pairs)
    if args.batches:
        batched_table(args, device, gen)
    if args.hard:
        hard_table(args, device)
    if args.fps:
        fps_table(args, device, gen)
    if args.dims or args.dims_zeroed:
        dims_table(args, device, gen)


def single_cloud_table(args, device, gen, max_pairs):
    k = args.k
    print(f"> k = {k}, float32 uniform points in the unit cube, B = 1, median of {args.repeat} runs")
    print()
    print("| N | task | method | ms | ms / pointconv.knn ms | matches cKDTree |")
    print("|---:|---|---|---:|---:|---|")
    for n in args.sizes:
        p = torch.rand(1, n, 3, generator=gen)
        qs = {"self": p, "query": torch.rand(1, n, 3, generator=gen)}
        p_dev = p.to(device)
        for task, q in qs.items():
            q_dev = q.to(device)
            q64, p64 = q[0].double().numpy(), p[0].double().numpy()
            repeat = args.repeat if n <= 100_000 else 1
            rows = []
            t_pc, res = timed(lambda: pointconv.knn(q_dev, p_dev, k), device, repeat)
            ref_d, _ = ckdtree_knn(q64, p64, k)
            ok = np.allclose(res.dists[0].cpu().double().numpy(), ref_d ** 2, rtol=1e-5, atol=1e-10)
            rows.append(("pointconv.knn (build + query)", t_pc, ok))
            index = pointconv.NeighborIndex(p_dev)
            t_idx, res = timed(lambda: index.knn(q_dev, k), device, repeat)
            ok = np.allclose(res.dists[0].cpu().double().numpy(), ref_d ** 2, rtol=1e-5, atol=1e-10)
            rows.append(("pointconv NeighborIndex.knn (query only)", t_idx, ok))
            if device.type == "cpu":
                t, _ = timed(lambda: ckdtree_knn(q64, p64, k), device, repeat)
                rows.append(("scipy cKDTree (build + query, workers=-1)", t, None))
            if float(n) * n <= max_pairs:
                t, _ = timed(lambda: cdist_topk(q_dev[0], p_dev[0], k, args.chunk_bytes), device,
                             repeat if n <= 10_000 else 1, warmup=1 if n <= 10_000 else 0)
                rows.append(("torch cdist + topk (chunked)", t, None))
            else:
                rows.append(("torch cdist + topk (chunked)", None, None))
            for method, t, ok in rows:
                ms = "skipped (too slow)" if t is None else f"{t:.2f}"
                ratio = "" if t is None else f"{t / t_pc:.2f}x"
                check = "" if ok is None else ("yes" if ok else "NO")
                print(f"| {n:,} | {task} | {method} | {ms} | {ratio} | {check} |", flush=True)


def voxel_shell(gen):
    v = torch.randn(400_000, 3, generator=gen)
    return torch.unique((v / v.norm(dim=1, keepdim=True) * 120).round(), dim=0)


def half_at_origin(gen):
    p = torch.rand(100_000, 3, generator=gen)
    p[::2] = 0
    return p


def repeated_sites(gen):
    return torch.rand(1_000, 3, generator=gen)[torch.randint(0, 1_000, (100_000,), generator=gen)]


HARD_CLOUDS = {"voxel-shell": ("voxel centers of a sphere shell of radius 120", voxel_shell),
               "half-origin": ("100,000 uniform points, every other one moved to the origin", half_at_origin),
               "repeated": ("1,000 sites repeated 100 times each (100,000 points)", repeated_sites)}


def hard_table(args, device):
    k = args.k
    print()
    print(f"> clouds hard for a kd-tree: self-kNN, k = {k}, float32, median of {args.repeat} runs")
    print()
    print("| cloud | N | method | ms | ms / pointconv.knn ms | matches cKDTree |")
    print("|---|---:|---|---:|---:|---|")
    for name in args.hard:
        title, make = HARD_CLOUDS[name]
        p = make(torch.Generator().manual_seed(0))
        p_dev = p[None].to(device)
        p64 = p.double().numpy()
        t_pc, res = timed(lambda: pointconv.knn(p_dev, p_dev, k), device, args.repeat)
        ref_d, _ = ckdtree_knn(p64, p64, k)
        ok = np.allclose(res.dists[0].cpu().double().numpy(), ref_d ** 2, rtol=1e-5, atol=1e-10)
        t_tree, _ = timed(lambda: ckdtree_knn(p64, p64, k), device, args.repeat)
        for method, t, check in (("pointconv.knn (build + query)", t_pc, "yes" if ok else "NO"),
                                 ("scipy cKDTree (build + query, workers=-1)", t_tree, "")):
            print(f"| {title} | {len(p):,} | {method} | {t:.1f} | {t / t_pc:.2f}x | {check} |", flush=True)


def fps_table(args, device, gen):
    from pointconv.neighbors.sampling import _fps_torch

    print()
    print(f"> farthest point sampling, float32 uniform points, start 0, median of {args.repeat} runs, timed in turns")
    print()
    print("| B x N -> n | pointconv ms | torch loop ms | torch loop / pointconv | same indices |")
    print("|---|---:|---:|---:|---|")
    for spec in args.fps:
        B, n_points, n = (int(v) for v in spec.lower().split("x"))
        p = torch.rand(B, n_points, 3, generator=gen).to(device)
        lengths = torch.full((B,), n_points, device=device)
        start = torch.zeros(B, dtype=torch.long, device=device)
        ours, loop = [], []
        for _ in range(args.repeat):  # in turns: the machine's drift hits both
            t, a = timed(lambda: pointconv.farthest_point_sample(p, n), device, 1)
            ours.append(t)
            t, b = timed(lambda: _fps_torch(p, n, lengths, start), device, 1)
            loop.append(t)
        t_ours, t_loop = float(np.median(ours)), float(np.median(loop))
        same = "yes" if torch.equal(a.cpu(), b.cpu()) else "NO"
        print(f"| {B} x {n_points:,} -> {n:,} | {t_ours:.1f} | {t_loop:.1f} | {t_loop / t_ours:.2f}x | {same} |",
              flush=True)


def dims_table(args, device, gen):
    from pointconv.neighbors._brute_force import exact_rows_search

    k = args.k
    print()
    print(f"> more dimensions than the kd-tree takes: self-kNN, k = {k}, float32 normal points, "
          f"median of {args.repeat} runs")
    print()
    print("| B x N x D | method | ms | ms / pointconv.knn ms | equals the literal method |")
    print("|---|---|---:|---:|---|")
    for spec, zeroed in [(s, False) for s in args.dims] + [(s, True) for s in args.dims_zeroed]:
        B, n, D = (int(v) for v in spec.lower().split("x"))
        p = torch.randn(B, n, D, generator=gen)
        if zeroed:  # the repeated point: one group searched once, then expanded
            p[:, ::2] = 0
        p = p.to(device)
        label = f"{B} x {n:,} x {D}" + (", every other point zero" if zeroed else "")
        literal = None
        rows = []
        t_pc, res = timed(lambda: pointconv.knn(p, p, k), device, args.repeat)
        rows.append(("pointconv.knn", t_pc))
        if B * n * n <= args.literal_max_pairs:
            t, literal = timed(lambda: [exact_rows_search(x, x, k, None, False) for x in p], device, 1, warmup=0)
            rows.append(("literal exact method (sq_dist, sorted rows)", t))
        t, _ = timed(lambda: cdist_topk_batched(p, k, args.chunk_bytes), device, args.repeat)
        rows.append(("torch cdist + topk (batched, not exact)", t))
        same = "" if literal is None else ("yes" if all(
            torch.equal(res.dists[b], d) and torch.equal(res.idx[b], i) for b, (d, i) in enumerate(literal)) else "NO")
        for method, t in rows:
            print(f"| {label} | {method} | {t:.1f} | {t / t_pc:.2f}x | {same if method == 'pointconv.knn' else ''} |",
                  flush=True)


def ckdtree_per_cloud(p64, k):
    return [cKDTree(x).query(x, k=k, workers=-1) for x in p64]


def cdist_topk_batched(p, k, chunk_bytes):
    B, N, _ = p.shape
    chunk = max(1, chunk_bytes // (4 * N * N))
    out = [torch.cdist(p[s:s + chunk], p[s:s + chunk]).square_().topk(k, dim=2, largest=False)
           for s in range(0, B, chunk)]
    return torch.cat([d for d, _ in out]), torch.cat([i for _, i in out])


def batched_table(args, device, gen):
    k = args.k
    print()
    print(f"> batches of small clouds: self-kNN, k = {k}, float32 uniform points, median of {args.repeat} runs")
    print()
    print("| B x N | method | ms | ms / pointconv.knn ms | matches cKDTree |")
    print("|---|---|---:|---:|---|")
    for spec in args.batches:
        B, n = (int(v) for v in spec.lower().split("x"))
        p = torch.rand(B, n, 3, generator=gen)
        p_dev = p.to(device)
        p64 = p.double().numpy()
        ref_d = np.stack([d for d, _ in ckdtree_per_cloud(p64, k)]) ** 2
        rows = []
        t_pc, res = timed(lambda: pointconv.knn(p_dev, p_dev, k), device, args.repeat)
        rows.append(("pointconv.knn (build + query)", t_pc, np.allclose(res.dists.cpu().double().numpy(), ref_d,
                                                                         rtol=1e-5, atol=1e-10)))
        index = pointconv.NeighborIndex(p_dev)
        t, res = timed(lambda: index.knn(p_dev, k), device, args.repeat)
        rows.append(("pointconv NeighborIndex.knn (query only)", t,
                     np.allclose(res.dists.cpu().double().numpy(), ref_d, rtol=1e-5, atol=1e-10)))
        if device.type == "cpu":
            t, _ = timed(lambda: ckdtree_per_cloud(p64, k), device, args.repeat)
            rows.append(("scipy cKDTree per cloud (build + query, workers=-1)", t, None))
        t, _ = timed(lambda: cdist_topk_batched(p_dev, k, args.chunk_bytes), device, args.repeat)
        rows.append(("torch cdist + topk (batched)", t, None))
        for method, t, ok in rows:
            check = "" if ok is None else ("yes" if ok else "NO")
            print(f"| {B} x {n:,} | {method} | {t:.2f} | {t / t_pc:.2f}x | {check} |", flush=True)


if __name__ == "__main__":
    main()

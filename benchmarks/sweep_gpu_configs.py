"""Launch settings of three CUDA hot spots, each timed against the setting pointconv uses now, in
one run (CUDA only; for a GPU session, to choose defaults from measurements):

  gaussian   the fused forward kernel and the selection kernel of knn_aggregate_aniso
             (bench_gaussian's forward sizes: B = 2, Q = 12,288, P = 4,096, F = 64, K = 16):
             queries per program (BQ) x warps of the brute-force kernels, and the grid selection
             (kernels/gaussian_grid.py, which these sizes take) against them
  sparse     the implicit-GEMM kernel of SubMConv3d 64 -> 64: its tables' columns grouped by their
             offsets or in site order, on bench_sparse (a)'s sphere shell and (b)'s street scene;
             then on (a): BLOCK_M x BLOCK_K x warps x stages
  pointwise  PointwiseCNN.neighbors on bench_pointconv's batch (128 clouds x 2,048 points): the
             centers per step of the window lookups on CUDA (_pointwise_pairs._CENTERS_CUDA), a Python loop
             of small launches on CUDA

Every setting's outputs are checked against the current one's (bitwise for indices and for the
pointwise logits, allclose for the sums). Kernel times: triton.testing.do_bench medians (ms).

  PYTHONPATH=src python benchmarks/sweep_gpu_configs.py [gaussian sparse pointwise]
"""
from __future__ import annotations

import itertools
import sys
import traceback

import torch

import pointconv
from pointconv._timing import provenance, timed_ms


def _bench(fn):
    import triton

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _row(name, setting, ms, base_ms, ok):
    print(f"| {name} | {setting} | {ms:.3f} | {base_ms / ms:.2f}x | {'yes' if ok else 'NO'} |", flush=True)


def sweep_gaussian(dev):
    import triton
    from bench_gaussian import make_inputs
    from pointconv.kernels import channel_block, gaussian as G
    from pointconv.kernels.knn import _kp

    B, Q, P, F, K = 2, 12288, 4096, 64, 16
    q, p, f, s, R = (t.contiguous() for t in make_inputs(B, Q, P, F, dev))
    plen = torch.full((B,), P, dtype=torch.int64, device=dev)
    KP = _kp(K)
    # the grid selection (what clouds past G._BRUTE_MAX_POINTS take) against the brute-force
    # kernels below, whole calls (the grid's build and the bound's eigenvalues included)
    brute_max = G._BRUTE_MAX_POINTS
    calls = {}
    for name, limit in (("brute force", P), ("grid", brute_max)):
        G._BRUTE_MAX_POINTS = limit
        try:
            calls[name] = (_bench(lambda: G.aggregate_aniso(q, p, f, s, R, K, plen)),
                           _bench(lambda: G.select_aniso(q, p, s, R, K, plen)), G.aggregate_aniso(q, p, f, s, R, K, plen))
        finally:
            G._BRUTE_MAX_POINTS = brute_max
    for name, (fused_ms, select_ms, out) in calls.items():
        base_fused, base_select, want = calls["brute force"]
        ok = torch.equal(out[3], want[3]) and torch.equal(out[2], want[2])
        _row("aggregate_aniso (no grad)", name + (" (now)" if name == "grid" else ""), fused_ms, base_fused, ok)
        _row("select_aniso", name + (" (now)" if name == "grid" else ""), select_ms, base_select, ok)
    G._BRUTE_MAX_POINTS = P  # the launch settings below are the brute-force kernels'
    want_f, _, _, want_i = G.aggregate_aniso(q, p, f, s, R, K, plen)
    out_m = torch.empty((B, Q, K), device=dev)
    out_i = torch.empty((B, Q, K), dtype=torch.int64, device=dev)
    out_f = torch.empty((B, Q, F), device=dev)
    for name in ("fused forward", "selection"):
        base = None
        for BQ, warps in [G._launch(KP)] + list(itertools.product((32, 16, 64), (4, 1, 2, 8))):
            grid = (triton.cdiv(Q, BQ), B)
            if name == "fused forward":
                def go():
                    G._aniso_aggregate_kernel[grid](q, p, s, R, plen, f, out_m, out_i, out_f, Q, P, F, K=K, KP=KP,
                                                    BQ=BQ, BF=channel_block(F, 64), enable_fp_fusion=False,
                                                    num_warps=warps)
            else:
                def go():
                    G._aniso_select_kernel[grid](q, p, s, R, plen, out_m, out_i, Q, P, K=K, KP=KP, BQ=BQ,
                                                 enable_fp_fusion=False, num_warps=warps)
            out_i.fill_(-2)
            out_f.fill_(float("nan"))
            go()
            ok = torch.equal(out_i, want_i) and (name == "selection" or torch.allclose(out_f, want_f))
            ms = _bench(go)
            base = base or ms  # the first setting is the current one
            _row(name, f"BQ {BQ}, {warps} warps{' (now)' if ms is base else ''}", ms, base, ok)
    G._BRUTE_MAX_POINTS = brute_max


def sweep_sparse(dev):
    from bench_sparse import sphere_shell, street_scene
    from pointconv.kernels import accumulator, channel_block
    from pointconv.kernels import sparse_conv as SK
    from pointconv.sparse import _implicit_gemm
    from pointconv.sparse.kernel_map import build_subm

    # the gather tables' columns grouped by their offsets (now) or in site order: the GEMM alone,
    # and the tables' build (with the sort), on (a)'s shell and (b)'s street scene (64 -> 64)
    sort_now = _implicit_gemm._SORT_COLUMNS
    for scene, idx, shape in (("(a) shell", sphere_shell(device=dev), [256] * 3),
                              ("(b) scene", street_scene(device=dev), [80, 1600, 1600])):
        kmap = build_subm(idx, shape, (3, 3, 3), (1, 1, 1))
        lookup = kmap._gather  # (the one-pass build's table, which tables() takes and drops)
        x = torch.randn(len(idx), 64, device=dev)
        w = torch.randn(27, 64, 64, device=dev) / 40
        want = base = None
        for sort in (sort_now, not sort_now):
            _implicit_gemm._SORT_COLUMNS = sort
            try:
                def build():
                    kmap._tables, kmap._gather = None, lookup
                    return kmap.tables()
                build_ms = _bench(build)
                T = build()
                out = SK.gather_gemm(T.gather, T.rows, x, w)
                want = out if want is None else want
                ms = _bench(lambda: SK.gather_gemm(T.gather, T.rows, x, w))
            finally:
                _implicit_gemm._SORT_COLUMNS = sort_now
            base = base or ms
            setting = f"{scene}: columns {'by offsets' if sort else 'in site order'}{' (now)' if ms is base else ''}"
            _row("gather_gemm", setting, ms, base, torch.allclose(out, want, rtol=1e-4, atol=1e-4))
            print(f"|   tables' build | {setting} | {build_ms:.3f} | | |", flush=True)

    # launch settings on (a)'s tables
    idx = sphere_shell(device=dev)
    T = build_subm(idx, [256] * 3, (3, 3, 3), (1, 1, 1)).tables()
    xx = torch.randn(len(idx), 64, device=dev)
    w = (torch.randn(27, 64, 64, device=dev) / 40).contiguous()
    table, rows = T.gather, T.rows
    V, M = table.shape
    want = SK.gather_gemm(table, rows, xx, w)
    out = torch.empty_like(want)
    precision = SK._precision(xx.dtype)
    base = None
    for BM, BK, warps, stages in itertools.product((64, 32, 128), (32, 64), (4, 8), (3, 2, 4)):
        def go():
            SK._gather_gemm_kernel[(-(-M // BM), 1)](table, rows, xx, w, out, M, 64, 64, V, BLOCK_M=BM, BLOCK_K=BK,
                                                    BLOCK_N=channel_block(64, 64), ACC=accumulator(xx.dtype),
                                                    PRECISION=precision, num_warps=warps, num_stages=stages)
        out.fill_(float("nan"))
        try:
            go()
        except Exception as e:  # noqa: BLE001 - a setting past the chip's shared memory: say so, go on
            print(f"| gather_gemm | BM {BM}, BK {BK}, {warps} warps, {stages} stages | failed: {str(e)[:60]} | | |")
            continue
        ok = torch.allclose(out, want, rtol=1e-3, atol=1e-3)
        ms = _bench(go)
        base = base or ms
        _row("gather_gemm", f"BM {BM}, BK {BK}, {warps} warps, {stages} stages{' (now)' if ms is base else ''}",
             ms, base, ok)


def sweep_pointwise(dev):
    from bench_pointconv import clouds
    from pointconv.conv import _pointwise_pairs as pairs

    model = pointconv.nn.PointwiseCNN(10).to(dev)
    points, _ = clouds(128, 2048, dev)
    now = pairs._CENTERS_CUDA
    want = None
    base = None
    for centers in (now, 1 << 13, 1 << 15, 1 << 19):
        pairs._CENTERS_CUDA = centers
        try:
            ms, nbrs = timed_ms(lambda: model.neighbors(points), dev, repeat=3, warmup=1)
            with torch.no_grad():
                logits = model(points, neighbors=nbrs)
        finally:
            pairs._CENTERS_CUDA = now
        want = logits if want is None else want
        base = base or ms
        _row("PointwiseCNN.neighbors", f"_CENTERS_CUDA {centers:,}{' (now)' if centers == now else ''}", ms, base,
             torch.equal(logits, want))


def main(argv=None):
    parts = (sys.argv[1:] if argv is None else argv) or ["gaussian", "sparse", "pointwise"]
    dev = torch.device("cuda")
    print(provenance("sweep_gpu_configs", dev))
    print("\n| spot | setting | ms | current / this | same outputs |\n|---|---|---:|---:|---|")
    for part in parts:
        try:  # one part's failure (a setting the compiler rejects, say) leaves the others' rows
            {"gaussian": sweep_gaussian, "sparse": sweep_sparse, "pointwise": sweep_pointwise}[part](dev)
        except Exception:  # noqa: BLE001
            traceback.print_exc()


if __name__ == "__main__":
    main()

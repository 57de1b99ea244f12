"""Sparse convolution: pointconv.sparse against spconv 2.3.8 in the same run.

(a) one SubMConv3d, 64 -> 64 channels, on a voxelized sphere shell (about 175K voxels in a 256^3
    grid), forward and backward, kernel-map build included (a fresh tensor each run).
(b) ``--net``: spconv's benchmark network (spconv/benchmark/basic.py): 14 SubMConv3d with channels
    3, 64, 64, 96, 96, 128, 128, 160, 160, 192, 192, 224, 224, 256, 256 and 6 SparseMaxPool3d(2, 2)
    between the pairs, no BatchNorm, on ~120K voxels of a generated street scene in an
    [80, 1600, 1600] grid, batch 1; forward and backward, fp32 (and fp16 on CUDA).

(c) ``--dense-block``: a strided SparseConv3d (3, stride 2, padding 1, 16 -> 16 channels) and a
    SparseMaxPool3d of the same geometry on a fully occupied 64^3 block (262,144 voxels), forward,
    kernel-map build included: 27 candidate pairs per voxel, the kernel map's worst case.

(d) ``--tile-work``: no timing, a count of the CUDA implicit GEMM's work (any device): per
    submanifold map of (a) and of (b)'s network, the kernel offsets a block of 64 output rows runs
    (each a 64-row product; an offset that feeds no row of the block is skipped) with the table's
    columns in site order and grouped by their offsets (``_implicit_gemm._sorted_columns``), and
    the pairs' own share (pairs / 64 per block, the floor).

On CUDA pointconv runs its Triton implicit GEMM (the default backend there); the row "pointconv
(torch ops)" is the same layer on the torch backend (gather, GEMM and ``index_put_`` scatter per
kernel offset), for the kernels' gain in the same run. "tf32" rows let float32 products run in
TF32 (``torch.backends.cuda.matmul.allow_tf32``).

spconv runs on the CPU wheel (``spconv``) or, on a GPU machine, ``spconv-cu126``. Its CPU kernels
race when torch uses more than one thread, so the table lists spconv with all threads (its
default, results vary) and with one thread (correct); pointconv uses all threads and is
deterministic. spconv 2.3.8's backward fails with a CPU-only torch (it asks for a CUDA stream),
so on CPU only the forward is compared with it.

The methods of a row group run in turns (one run of each per round, the median over rounds): on a
machine whose load drifts during the run, all of them see the same drift.

    python benchmarks/bench_sparse.py --device cpu
    python benchmarks/bench_sparse.py --dense-block
    python benchmarks/bench_sparse.py --tile-work
"""
from __future__ import annotations

import argparse

import torch

import pointconv
from pointconv.demos._cli import check_device, positive_int
import pointconv.sparse as ours
from pointconv._timing import provenance, timed_ms_alternating


def sphere_shell(radius=120.0, size=256, device="cpu"):
    """Integer sites within half a voxel of a sphere of radius 120: a one-voxel shell (~181K sites)."""
    t = torch.arange(size, dtype=torch.float32, device=device) - size / 2 + 0.5
    sites = []
    for z in range(size):  # one slice at a time keeps memory small
        zz = t[z]
        r = torch.sqrt(zz * zz + t[:, None] ** 2 + t[None, :] ** 2)
        yx = torch.nonzero((r - radius).abs() < 0.5)
        sites.append(torch.cat([torch.full((len(yx), 1), z, device=device), yx], 1))
    zyx = torch.cat(sites).int()
    return torch.cat([torch.zeros(len(zyx), 1, dtype=torch.int32, device=device), zyx], 1).contiguous()


def street_scene(n_voxels=120_000, shape=(80, 1600, 1600), device="cpu", seed=0):
    """~n_voxels distinct sites of a lidar-like scene: a ground plane, walls and box objects."""
    g = torch.Generator().manual_seed(seed)
    Z, Y, X = shape
    n = int(n_voxels * 1.25)
    parts = []
    ground = torch.stack([torch.randint(0, 4, (n // 2,), generator=g), torch.randint(0, Y, (n // 2,), generator=g),
                          torch.randint(0, X, (n // 2,), generator=g)], 1)
    parts.append(ground)
    walls = torch.stack([torch.randint(0, Z // 2, (n // 4,), generator=g), torch.randint(0, 2, (n // 4,), generator=g) * (Y - 9) + torch.randint(0, 8, (n // 4,), generator=g),
                         torch.randint(0, X, (n // 4,), generator=g)], 1)
    parts.append(walls)
    centers = torch.stack([torch.randint(0, Y, (200,), generator=g), torch.randint(0, X, (200,), generator=g)], 1)
    pick = torch.randint(0, 200, (n // 4,), generator=g)
    boxes = torch.stack([torch.randint(0, 20, (n // 4,), generator=g),
                         (centers[pick, 0] + torch.randint(-20, 20, (n // 4,), generator=g)).clamp(0, Y - 1),
                         (centers[pick, 1] + torch.randint(-20, 20, (n // 4,), generator=g)).clamp(0, X - 1)], 1)
    parts.append(boxes)
    zyx = torch.unique(torch.cat(parts), dim=0)
    zyx = zyx[torch.randperm(len(zyx), generator=g)[:n_voxels]]
    idx = torch.cat([torch.zeros(len(zyx), 1, dtype=torch.long), zyx], 1).int().contiguous()
    return idx.to(device)


def benchmark_net(cls, algo_kwargs=None):
    chans = [3, 64, 64, 96, 96, 128, 128, 160, 160, 192, 192, 224, 224, 256, 256]
    layers = []
    for i in range(14):  # 7 pairs of SubM convolutions, a max pool between pairs
        layers.append(cls.SubMConv3d(chans[i], chans[i + 1], 3, bias=False, indice_key=f"c{i // 2}"))
        if i % 2 == 1 and i < 13:
            layers.append(cls.SparseMaxPool3d(2, 2))
    return cls.SparseSequential(*layers)


def print_header(label, device, detail):
    print(provenance(f"bench_sparse {label}", device))
    print(f"> {detail}")
    print()


def with_backend(name, fn):
    """``fn`` run under ``pointconv.use_backend(name)``."""
    def call():
        with pointconv.use_backend(name):
            return fn()
    return call


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeat", type=positive_int, default=3)
    ap.add_argument("--net", action="store_true", help="(b) spconv's benchmark network instead of (a)")
    ap.add_argument("--dense-block", action="store_true",
                    help="(c) strided convolution and max pooling on a full 64^3 block instead of (a)")
    ap.add_argument("--tile-work", action="store_true",
                    help="(d) count the implicit GEMM's block products per kernel map instead of timing")
    args = ap.parse_args(argv)
    try:  # before any work: a clear error, not a traceback from the first CUDA call
        check_device(args.device)
    except ValueError as e:
        ap.error(str(e))
    if args.net:
        return main_net(args)
    if args.dense_block:
        return main_dense_block(args)
    if args.tile_work:
        return main_tile_work(args)
    device = torch.device(args.device)
    try:
        import spconv.pytorch as spconv
    except ImportError:
        spconv = None
    idx = sphere_shell(device=device)
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(len(idx), 64, generator=g).to(device)
    conv_ours = ours.SubMConv3d(64, 64, 3, bias=False).to(device)
    print_header("(a)", device, f"SubMConv3d 64 -> 64, k = 3, {len(idx):,} voxels of a sphere shell in a 256^3 grid, "
                 f"float32, kernel-map build included in every run, median of {args.repeat}, methods timed in turns")
    print("| task | method | threads | ms | ms / pointconv ms |")
    print("|---|---|---:|---:|---:|")

    def run(module, cls, backward):
        def step():
            x = cls.SparseConvTensor(feats.clone().requires_grad_(backward), idx.clone(), [256, 256, 256], 1)
            y = module(x)
            if backward:
                y.features.square().sum().backward()
        return step

    threads0 = torch.get_num_threads()

    def with_threads(threads, fn):
        def call():
            torch.set_num_threads(threads)
            try:
                return fn()
            finally:
                torch.set_num_threads(threads0)
        return call

    conv_sp = None
    if spconv is not None:
        conv_sp = spconv.SubMConv3d(64, 64, 3, bias=False).to(device)
        conv_sp.load_state_dict(conv_ours.state_dict())
    for task, backward in (("forward", False), ("forward + backward", True)):
        # (method, threads) -> step, timed in turns
        steps = {("pointconv.sparse", threads0): run(conv_ours, ours, backward)}
        if device.type == "cuda":
            steps[("pointconv (torch ops)", threads0)] = with_backend("torch", run(conv_ours, ours, backward))
        if conv_sp is not None:
            for threads in [threads0] + ([1] if device.type == "cpu" and threads0 > 1 else []):
                steps[("spconv 2.3.8", threads)] = with_threads(threads, run(conv_sp, spconv, backward))
        times = timed_ms_alternating(steps, device, args.repeat)
        base = times[("pointconv.sparse", threads0)]
        for (method, threads), ms in times.items():
            cell = f"{ms:.1f} | {ms / base:.2f}x" if isinstance(ms, float) else f"fails: {str(ms).splitlines()[0][:60]} | "
            print(f"| {task} | {method} | {threads} | {cell} |", flush=True)
    if spconv is None:
        print("\n(spconv is not installed: pip install spconv==2.3.8 for the baseline)")


def main_net(args):
    device = torch.device(args.device)
    try:
        import spconv.pytorch as spconv
    except ImportError:
        spconv = None
    idx = street_scene(device=device)
    feats = torch.randn(len(idx), 3, generator=torch.Generator().manual_seed(1)).to(device)
    net_ours = benchmark_net(ours).to(device)
    print_header("(b)", device, f"spconv's benchmark network (14 SubMConv3d, 6 SparseMaxPool3d), {len(idx):,} voxels "
                 f"in [80, 1600, 1600], batch 1, median of {args.repeat}, methods timed in turns")
    print("| dtype | task | method | ms | ms / pointconv ms |")
    print("|---|---|---|---:|---:|")
    dtypes = [("float32", torch.float32)]
    if device.type == "cuda":
        dtypes += [("tf32", torch.float32), ("float16", torch.float16)]

    def step(net, cls, dtype, backward):
        def run():
            x = cls.SparseConvTensor(feats.clone().requires_grad_(backward), idx.clone(), [80, 1600, 1600], 1)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                y = net(x)
            if backward:
                y.features.float().square().sum().backward()
        return run

    tf32 = torch.backends.cuda.matmul.allow_tf32
    net_sp = None
    if spconv is not None:
        net_sp = benchmark_net(spconv).to(device)
        net_sp.load_state_dict(net_ours.state_dict())
    for label, dtype in dtypes:
        torch.backends.cuda.matmul.allow_tf32 = label == "tf32"
        for task, backward in (("forward", False), ("forward + backward", True)):
            steps = {"pointconv.sparse": step(net_ours, ours, dtype, backward)}  # timed in turns
            if device.type == "cuda":
                steps["pointconv (torch ops)"] = with_backend("torch", step(net_ours, ours, dtype, backward))
            if net_sp is not None:
                steps["spconv 2.3.8"] = step(net_sp, spconv, dtype, backward)
            times = timed_ms_alternating(steps, device, args.repeat)
            base = times["pointconv.sparse"]
            for method, ms in times.items():
                cell = f"{ms:.1f} | {ms / base:.2f}x" if isinstance(ms, float) else f"fails: {str(ms).splitlines()[0][:60]} | "
                print(f"| {label} | {task} | {method} | {cell} |", flush=True)
    torch.backends.cuda.matmul.allow_tf32 = tf32


def main_dense_block(args, n=64, channels=16):
    device = torch.device(args.device)
    try:
        import spconv.pytorch as spconv
    except ImportError:
        spconv = None
    g = torch.arange(n, device=device)
    cells = torch.stack(torch.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    idx = torch.cat([torch.zeros_like(cells[:, :1]), cells], 1).int()
    feats = torch.randn(len(idx), channels, generator=torch.Generator().manual_seed(2)).to(device)
    print_header("(c)", device, f"a fully occupied {n}^3 block ({len(idx):,} voxels), {channels} channels, kernel 3, "
                 f"stride 2, padding 1, forward, kernel-map build included, median of {args.repeat}, methods timed in turns")
    print("| layer | method | threads | ms | ms / pointconv ms |")
    print("|---|---|---:|---:|---:|")
    threads0 = torch.get_num_threads()

    def layer(cls, lib):
        if cls == "SparseConv3d":
            return getattr(lib, cls)(channels, channels, 3, stride=2, padding=1, bias=False).to(device)
        return getattr(lib, cls)(3, stride=2, padding=1)

    def step(module, lib, threads):
        def run():
            torch.set_num_threads(threads)
            try:
                with torch.no_grad():
                    return module(lib.SparseConvTensor(feats, idx, [n] * 3, 1))
            finally:
                torch.set_num_threads(threads0)
        return run

    for cls in ("SparseConv3d", "SparseMaxPool3d"):
        ours_layer = layer(cls, ours)
        steps = {("pointconv.sparse", threads0): step(ours_layer, ours, threads0)}
        if spconv is not None:
            sp_layer = layer(cls, spconv)
            if cls == "SparseConv3d":
                sp_layer.load_state_dict(ours_layer.state_dict())
            for threads in [threads0] + ([1] if device.type == "cpu" and threads0 > 1 else []):
                steps[("spconv 2.3.8", threads)] = step(sp_layer, spconv, threads)
        times = timed_ms_alternating(steps, device, args.repeat)
        base = times[("pointconv.sparse", threads0)]
        for (method, threads), ms in times.items():
            cell = f"{ms:.1f} | {ms / base:.2f}x" if isinstance(ms, float) else f"fails: {str(ms).splitlines()[0][:60]} | "
            print(f"| {cls} | {method} | {threads} | {cell} |", flush=True)


def _block_products(table, block=64):
    """Offsets run per block of ``block`` columns of a ``(V, M)`` gather table: sum over blocks of
    the offsets that feed at least one of its columns."""
    V, M = table.shape
    hit = torch.nn.functional.pad(table >= 0, (0, -M % block)).view(V, -1, block)
    return int(hit.any(2).sum())


def main_tile_work(args):
    from pointconv.sparse import _implicit_gemm
    from pointconv.sparse.kernel_map import build_subm

    device = torch.device(args.device)
    print_header("(d)", device, "the implicit GEMM's 64-row block products per submanifold map (3^3 kernels), the "
                 "table's columns in site order and grouped by their offsets; no timing")
    print("| map | sites | pairs / site | blocks | products / block, site order | grouped | floor (pairs / 64) |"
          " grouped / site order |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    chans = [3, 64, 64, 96, 96, 128, 128, 160, 160, 192, 192, 224, 224, 256, 256]
    maps = [("(a) sphere shell", sphere_shell(device=device), [256] * 3, None)]
    x = ours.SparseConvTensor(torch.zeros(120_000, 1, device=device), street_scene(device=device), [80, 1600, 1600], 1)
    for level in range(7):
        # the level's two convolutions' multiply-adds per row of a product
        macs = chans[2 * level] * chans[2 * level + 1] + chans[2 * level + 1] * chans[2 * level + 2]
        maps.append((f"(b) level {level}", x.indices, x.spatial_shape, macs))
        if level < 6:
            x = ours.SparseMaxPool3d(2, 2)(x)
    sort_now = _implicit_gemm._SORT_COLUMNS
    totals = [0, 0]
    for name, idx, shape, macs in maps:
        kmap = build_subm(idx, shape, (3, 3, 3), (1, 1, 1))
        _implicit_gemm._SORT_COLUMNS = False
        try:
            site_order = kmap.tables().gather
        finally:
            _implicit_gemm._SORT_COLUMNS = sort_now
        grouped = _implicit_gemm._sorted_columns(site_order)[0]
        blocks = -(-site_order.shape[1] // 64)
        a, b = _block_products(site_order), _block_products(grouped)
        pairs = int((site_order >= 0).sum())
        if macs:
            totals[0] += a * macs
            totals[1] += b * macs
        print(f"| {name} | {len(idx):,} | {pairs / len(idx):.2f} | {blocks:,} | {a / blocks:.1f} | {b / blocks:.1f} | "
              f"{pairs / 64 / blocks:.1f} | {b / a:.2f} |", flush=True)
    print(f"\n(b)'s network, products weighted by their layers' multiply-adds: grouped / site order "
          f"{totals[1] / totals[0]:.2f}")


if __name__ == "__main__":
    main()

"""The uniform grid the grid kernels search (``kernels/grid.py``), built on the device: every
valid point once, in the cell its coordinates give; the cell bounds held; the cell size adapted
to the cloud's shape; queries sorted with their invalid slots marked; and no read of the device
(on CUDA, where the build runs ahead of the host). In Triton's interpreter on CPU at small sizes."""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from clouds import make_cloud
from needs_triton import require_triton

require_triton()
DEV = "cuda" if torch.cuda.is_available() else "cpu"
from pointconv.kernels import grid as grid_kernels  # noqa: E402  (after TRITON_INTERPRET is set)
from pointconv.kernels import knn as knn_kernels  # noqa: E402
from pointconv.neighbors._reference import search_reference  # noqa: E402


def _cell_coords(grid, pos):
    """``(cloud, (n, 3) cell coordinates)`` of the sorted rows ``pos``, read from ``cell_start``."""
    cell = torch.searchsorted(grid.cell_start, pos, right=True) - 1
    cloud = cell // grid.cells_per_cloud
    local = cell - grid.base[cloud]
    dims = grid.dims[cloud]
    x = local % dims[:, 0]
    y = (local // dims[:, 0]) % dims[:, 1]
    z = local // (dims[:, 0] * dims[:, 1])
    return cloud, torch.stack([x, y, z], 1)


def check_grid(points, lengths, grid):
    B, P, _ = points.shape
    C = grid.cells_per_cloud
    n = int(lengths.sum())
    assert grid.cell_start.shape == (B * C + 1,)
    assert int(grid.cell_start[0]) == 0 and int(grid.cell_start[-1]) == n  # the valid points, then the rest
    assert bool((grid.cell_start[1:] >= grid.cell_start[:-1]).all())
    assert bool((grid.dims >= 1).all()) and int(grid.dims.max()) <= grid_kernels._AXIS_CELLS
    assert bool((grid.dims.prod(1) <= C).all())
    assert torch.equal(grid.base, torch.arange(B, device=points.device) * C)
    # every valid (cloud, index) exactly once, with its own coordinates
    pos = torch.arange(n, device=points.device)
    cloud, cell = _cell_coords(grid, pos)
    idx = grid.point_idx[:n]
    assert torch.equal(torch.sort(cloud * P + idx).values,
                       torch.cat([b * P + torch.arange(int(lengths[b]), device=points.device) for b in range(B)]))
    assert torch.equal(grid.xyz[:n], points[cloud, idx])
    # in its cloud's box, and in the cell its coordinates give (within a rounding of the cell's faces)
    valid = torch.arange(P, device=points.device)[None] < lengths[:, None]
    for b in range(B):
        if int(lengths[b]):
            assert torch.equal(grid.lo[b], points[b][valid[b]].amin(0))
    h = grid.h[cloud, None]
    lo = grid.lo[cloud] + cell * h
    slack = 1e-5 * (grid.xyz[:n].abs() + grid.lo[cloud].abs() + h * grid.dims[cloud])
    inner_low, inner_high = cell > 0, cell < grid.dims[cloud] - 1  # (edge cells hold what lies past the box)
    assert bool(((grid.xyz[:n] >= lo - slack) | ~inner_low).all())
    assert bool(((grid.xyz[:n] <= lo + h + slack) | ~inner_high).all())
    # within a cell, by index (a stable sort)
    same = (cloud[1:] == cloud[:-1]) & (cell[1:] == cell[:-1]).all(1)
    assert bool((idx[1:][same] > idx[:-1][same]).all())


@pytest.mark.parametrize("kind", ["uniform", "clustered", "duplicated", "lattice", "surface"])
def test_grid_holds_every_valid_point_in_its_cell(kind):
    points = make_cloud(kind, 3, 700, seed=11, device=DEV)
    lengths = torch.tensor([700, 0, 251], device=DEV)
    check_grid(points, lengths, grid_kernels.Grid(points, lengths, k_hint=16))


def test_grid_cell_size_follows_the_occupied_cells():
    # A sphere's surface fills few cells of its box: cells sized from the box's volume would hold
    # about 30 points each; the occupancy corrections bring that near the target of 4 (k = 16).
    points = make_cloud("surface", 1, 3000, seed=3, device=DEV)
    lengths = torch.tensor([3000], device=DEV)
    grid = grid_kernels.Grid(points, lengths, k_hint=16)
    check_grid(points, lengths, grid)
    occupied = int((grid.cell_start[1:] > grid.cell_start[:-1]).sum())
    assert 2.0 <= 3000 / occupied <= 8.0
    box_cells = 3000 / 4.0  # the first guess's cell count
    assert int(grid.dims.prod()) > 3 * box_cells


@pytest.mark.parametrize("case", ["flat", "far clusters", "one point", "wide"])
def test_grid_bounds_hold_on_awkward_clouds(case):
    g = torch.Generator().manual_seed(5)
    if case == "flat":  # a plane: its thin axis keeps one cell, the others share the cell budget
        points = torch.cat([torch.rand(1, 2000, 2, generator=g), torch.zeros(1, 2000, 1)], 2)
    elif case == "far clusters":  # two tight clusters 1e6 apart: at most 1024 cells along the axis
        points = torch.randn(1, 2000, 3, generator=g) * 1e-3
        points[:, 1000:, 0] += 1e6
    elif case == "one point":
        points = torch.full((1, 1, 3), 2.5)
    else:  # a 1e30-wide cloud: its volume overflows float64's exponent range less than float32's
        points = torch.rand(1, 500, 3, generator=g) * 1e30
    points = points.to(DEV)
    lengths = torch.tensor([points.shape[1]], device=DEV)
    grid = grid_kernels.Grid(points, lengths, k_hint=8)
    check_grid(points, lengths, grid)
    assert bool(torch.isfinite(grid.h).all()) and bool((grid.h > 0).all())


def test_grid_of_no_points_and_of_no_clouds():
    for B, P in [(2, 0), (0, 5)]:
        points = torch.zeros(B, P, 3, device=DEV)
        lengths = torch.zeros(B, dtype=torch.int64, device=DEV)
        grid = grid_kernels.Grid(points, lengths)
        assert grid.xyz.shape == (0, 3) and int(grid.cell_start[-1]) == 0
        q = torch.rand(B, 4, 3, device=DEV)
        d, i = knn_kernels.search_grid(q, grid, 3, None, torch.full((B,), 4, device=DEV), False)
        assert bool((i == -1).all()) and bool(torch.isinf(d).all())


def test_sorted_queries_mark_the_slots_past_each_length():
    points = make_cloud("uniform", 2, 300, seed=1, device=DEV)
    grid = grid_kernels.Grid(points, torch.tensor([300, 120], device=DEV))
    query = make_cloud("clustered", 2, 50, seed=2, device=DEV)
    qlen = torch.tensor([7, 50], device=DEV)
    xyz, cloud, row = grid_kernels.sort_queries(query, qlen, grid)
    valid = row >= 0
    assert int(valid.sum()) == 57 and bool(valid[:57].all())  # the invalid slots last
    assert torch.equal(torch.sort(cloud[valid] * 50 + row[valid]).values,
                       torch.cat([torch.arange(7, device=DEV), 50 + torch.arange(50, device=DEV)]))
    assert torch.equal(xyz[valid], query[cloud[valid], row[valid]])
    # and the search answers the valid queries only
    d, i = knn_kernels.search_grid(query, grid, 5, None, qlen, False)
    rd, ri = search_reference(query, points, 5, radius2=None, query_lengths=qlen,
                              points_lengths=torch.tensor([300, 120], device=DEV), exclude_self=False)
    assert torch.equal(i, ri) and torch.equal(d, rd)


class _Reads(TorchDispatchMode):
    """The operations run, and those that read the device (a stall of the host on CUDA); not
    those Triton's interpreter runs inside a launch (``paused``)."""

    READS = ("nonzero", "_local_scalar_dense", "item", "unique", "tolist")

    def __init__(self):
        super().__init__()
        self.ops, self.reads, self.paused = [], [], False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if self.paused:
            return func(*args, **(kwargs or {}))
        self.ops.append(name)
        if any(r in name for r in self.READS):
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


def test_grid_build_and_search_never_read_the_device(monkeypatch):
    seen = _Reads()
    if DEV == "cpu":  # the interpreter's own operations inside a launch are not the host's work
        from triton.runtime.interpreter import InterpretedFunction

        launch = InterpretedFunction.run

        def run(self, *args, **kwargs):
            seen.paused = True
            try:
                return launch(self, *args, **kwargs)
            finally:
                seen.paused = False
        monkeypatch.setattr(InterpretedFunction, "run", run)
    points = make_cloud("surface", 2, 400, seed=4, device=DEV)
    lengths = torch.tensor([400, 333], device=DEV)
    query = make_cloud("uniform", 2, 30, seed=5, device=DEV)
    with seen:
        grid = grid_kernels.Grid(points, lengths, k_hint=8)
        knn_kernels.search_grid(query, grid, 8, None, torch.tensor([30, 11], device=DEV), False)
    assert seen.reads == []
    # a fixed count of torch operations, whatever the sizes (the kernels' launches aside)
    launching = [op for op in seen.ops if not any(v in op for v in ("view", "empty", "detach", "slice"))]
    assert len(launching) <= 25, launching
    assert math.isfinite(float(grid.h.sum()))


def test_knn_on_the_grid_reads_the_device_once(monkeypatch):
    # the checks read max |x| of each cloud (finite, and squared distances within range) and
    # whether given lengths lie in [0, N], all in one transfer; the grid and the search read nothing
    import pointconv
    from pointconv import _device_transfers
    from test_kernel_map_one_pass import SyncingOps

    monkeypatch.setattr(knn_kernels, "_BRUTE_MAX_POINTS", 0)
    reads = []
    real = _device_transfers.host_floats
    monkeypatch.setattr(_device_transfers, "host_floats", lambda v: reads.append(v.numel()) or real(v))
    points = make_cloud("clustered", 2, 200, seed=8, device=DEV)
    query = make_cloud("uniform", 2, 40, seed=9, device=DEV)
    lengths = torch.tensor([200, 150], device=DEV)
    # the values read: max |x| per distinct tensor, one flag per lengths tensor given
    runs = {"query": lambda: pointconv.knn(query, points, 6),
            "query, lengths": lambda: pointconv.knn(query, points, 6, points_lengths=lengths,
                                                    query_lengths=torch.tensor([40, 7], device=DEV)),
            "self": lambda: pointconv.knn(points, points, 6, exclude_self=True),
            "ball, self, lengths": lambda: pointconv.ball_query(points, points, 0.3, 6, points_lengths=lengths,
                                                                query_lengths=lengths)}
    read_sizes = {"query": 2, "query, lengths": 4, "self": 1, "ball, self, lengths": 3}
    for name, run in runs.items():
        reads.clear()
        with pointconv.use_backend("triton"), SyncingOps() as ops:
            got = run()
        assert ops.seen == [] and reads == [read_sizes[name]], name
        with pointconv.use_backend("reference"):
            want = run()
        assert torch.equal(got.idx, want.idx) and torch.equal(got.dists, want.dists), name


@pytest.mark.skipif(DEV != "cuda", reason="CUDA's limit of 65,535 programs on launch axes 1 and 2 (a review's find)")
def test_more_clouds_than_a_launch_axis_holds():
    # the grid's kernels launch clouds x blocks on axis 0: 70,000 clouds on axis 1 would not launch
    points = make_cloud("uniform", 70_000, 5, seed=12, device=DEV)
    lengths = torch.full((70_000,), 5, device=DEV)
    grid = grid_kernels.Grid(points, lengths, k_hint=2)
    d, i = knn_kernels.search_grid(points, grid, 2, None, lengths, True)
    rd, ri = search_reference(points, points, 2, radius2=None, query_lengths=lengths, points_lengths=lengths,
                              exclude_self=True)
    assert torch.equal(i, ri) and torch.equal(d, rd)

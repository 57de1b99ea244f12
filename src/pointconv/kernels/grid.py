"""Uniform grids over padded point clouds for the grid kernels (``knn``, ``gaussian_grid``), built
on the device with no host round trip and a fixed handful of launches.

Per cloud ``b`` (its first ``lengths[b]`` points): origin ``lo[b]`` (the box's low corner), cell
size ``h[b]``, ``dims[b]`` cells per axis (x, y, z) and cells numbered
``base[b] + (z * dims_y + y) * dims_x + x`` with ``base[b] = b * C``, ``C = 4 P + 64`` for the
padded size ``P``: every cloud's cells fit its fixed stretch, so no cumulative count has to be
read back to size anything. A point's cell is ``floor((p - lo) / h)`` per axis, clamped into the
grid. The cell size aims at ``target = max(2, k_hint / 4)`` points per occupied cell: a first
guess from the box's volume, then two corrections by the measured occupancy (a surface or a
cluster fills little of its box), each capped so that a cloud has at most about four cells per
point and at most 1024 cells along an axis, and always at most ``C`` cells.

The build, in launches: one kernel for the boxes and first cell sizes; per correction one kernel
for the points' cell keys, a sort, a zero fill, one kernel counting the occupied cells (atomic
integer adds: exact, order-free) and one for the new cell sizes; then the final keys, a stable
sort, the sorted points, their indices and the cells' start offsets (``searchsorted``). The
previous build (torch ops on masks and ``nonzero``) took about 180 operations and three reads of
the device per grid.

Points are sorted by (cloud, cell), stably: within a cell by index. Slots past a cloud's length
get the key ``B * C``, which sorts after every cell, so the ``B * P`` sorted rows end with them and
no cell's range reaches them. ``sort_queries`` orders queries the same way for the kernels (a
block of neighboring queries scans the same cells); its invalid slots carry row -1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import on_tensor_device

_BLOCK = 1024
_AXIS_CELLS = 1024  # cells along one axis at most
_REFINEMENTS = 2


def cells_per_cloud(P: int) -> int:
    """``C``: the cells a cloud of at most ``P`` points may have, and the stride of ``base``."""
    return 4 * P + 64


@triton.jit
def _capped(h, ex, ey, ez, n, C, AXIS_CELLS: tl.constexpr):
    """The cell size ``h`` (float32) raised until the grid has at most about 4 cells per point
    (``n`` points, float64), at most AXIS_CELLS per axis, and at most ``C`` in all."""
    gx = tl.floor(ex / h) + 1.0
    gy = tl.floor(ey / h) + 1.0
    gz = tl.floor(ez / h) + 1.0
    cells = gx.to(tl.float64) * gy.to(tl.float64) * gz.to(tl.float64)
    grow = tl.maximum(cells / (4.0 * n + 64.0), 1.0)
    h = (h.to(tl.float64) * tl.exp(tl.log(grow) / 3.0)).to(tl.float32)
    h = tl.maximum(h, tl.maximum(tl.maximum(ex, ey), ez) / (AXIS_CELLS - 1.0))
    h = tl.maximum(h, 1e-12)
    # the formula's bound holds up to floor effects and roundings; these ones must hold exactly
    gx = tl.floor(ex / h) + 1.0
    gy = tl.floor(ey / h) + 1.0
    gz = tl.floor(ez / h) + 1.0
    over = (gx.to(tl.float64) * gy.to(tl.float64) * gz.to(tl.float64) > C) | (tl.maximum(tl.maximum(gx, gy), gz)
                                                                              > AXIS_CELLS)
    while over:
        h = h * 1.0625
        gx = tl.floor(ex / h) + 1.0
        gy = tl.floor(ey / h) + 1.0
        gz = tl.floor(ez / h) + 1.0
        over = (gx.to(tl.float64) * gy.to(tl.float64) * gz.to(tl.float64) > C) | (tl.maximum(tl.maximum(gx, gy), gz)
                                                                                  > AXIS_CELLS)
    return h


@triton.jit
def _store_frame(b, h, ex, ey, ez, h_ptr, dims_ptr):
    tl.store(h_ptr + b, h)
    tl.store(dims_ptr + b * 3, (tl.floor(ex / h) + 1.0).to(tl.int64))
    tl.store(dims_ptr + b * 3 + 1, (tl.floor(ey / h) + 1.0).to(tl.int64))
    tl.store(dims_ptr + b * 3 + 2, (tl.floor(ez / h) + 1.0).to(tl.int64))


@triton.jit
def _frame_kernel(p_ptr, len_ptr, lo_ptr, ext_ptr, h_ptr, dims_ptr, base_ptr, P, C, target,
                  BLOCK: tl.constexpr, AXIS_CELLS: tl.constexpr):
    """Per cloud: its box (``lo``, per-axis ``ext``), the first cell size and the cells per axis."""
    b = tl.program_id(0).to(tl.int64)
    n = tl.load(len_ptr + b)
    inf = float("inf")
    lox = tl.full((), inf, tl.float32)
    loy = tl.full((), inf, tl.float32)
    loz = tl.full((), inf, tl.float32)
    hix = tl.full((), -inf, tl.float32)
    hiy = tl.full((), -inf, tl.float32)
    hiz = tl.full((), -inf, tl.float32)
    cols = tl.arange(0, BLOCK)
    for start in range(0, n, BLOCK):
        rows = start + cols
        m = rows < n
        base = p_ptr + (b * P + rows) * 3
        x = tl.load(base, mask=m, other=0.0)
        y = tl.load(base + 1, mask=m, other=0.0)
        z = tl.load(base + 2, mask=m, other=0.0)
        lox = tl.minimum(lox, tl.min(tl.where(m, x, inf)))
        loy = tl.minimum(loy, tl.min(tl.where(m, y, inf)))
        loz = tl.minimum(loz, tl.min(tl.where(m, z, inf)))
        hix = tl.maximum(hix, tl.max(tl.where(m, x, -inf)))
        hiy = tl.maximum(hiy, tl.max(tl.where(m, y, -inf)))
        hiz = tl.maximum(hiz, tl.max(tl.where(m, z, -inf)))
    empty = n == 0  # (an empty cloud: a one-cell grid at the origin)
    lox = tl.where(empty, 0.0, lox)
    loy = tl.where(empty, 0.0, loy)
    loz = tl.where(empty, 0.0, loz)
    ex = tl.maximum(tl.where(empty, 0.0, hix) - lox, 1e-12)
    ey = tl.maximum(tl.where(empty, 0.0, hiy) - loy, 1e-12)
    ez = tl.maximum(tl.where(empty, 0.0, hiz) - loz, 1e-12)
    tl.store(lo_ptr + b * 3, lox)
    tl.store(lo_ptr + b * 3 + 1, loy)
    tl.store(lo_ptr + b * 3 + 2, loz)
    tl.store(ext_ptr + b * 3, ex)
    tl.store(ext_ptr + b * 3 + 1, ey)
    tl.store(ext_ptr + b * 3 + 2, ez)
    tl.store(base_ptr + b, b * C)
    # the first guess: `target` points per cell of the box, its axes at least 1e-3 of the longest
    # (a flat cloud), its volume in float64 (in float32 it overflows past extents of ~7e12)
    nf = tl.maximum(n, 1).to(tl.float64)
    floor_ext = tl.maximum(tl.maximum(ex, ey), ez) * 1e-3
    vol = (tl.maximum(ex, floor_ext).to(tl.float64) * tl.maximum(ey, floor_ext).to(tl.float64)
           * tl.maximum(ez, floor_ext).to(tl.float64))
    h = tl.exp(tl.log(vol / nf * target) / 3.0).to(tl.float32)
    h = _capped(h, ex, ey, ez, nf, C, AXIS_CELLS)
    _store_frame(b, h, ex, ey, ez, h_ptr, dims_ptr)


@triton.jit
def _keys_kernel(x_ptr, len_ptr, lo_ptr, h_ptr, dims_ptr, key_ptr, N, C, n_clouds, blocks_per_cloud,
                 BLOCK: tl.constexpr):
    """The cell key ``b * C + cell`` of each slot of cloud ``b``, or ``n_clouds * C`` past the
    cloud's length. (Clouds and blocks share program axis 0: axis 1 stops at 65,535 programs.)"""
    pid = tl.program_id(0).to(tl.int64)
    b = pid // blocks_per_cloud
    rows = (pid % blocks_per_cloud) * BLOCK + tl.arange(0, BLOCK)
    in_range = rows < N
    valid = rows < tl.load(len_ptr + b)
    base = x_ptr + (b * N + rows) * 3
    lox = tl.load(lo_ptr + b * 3)
    loy = tl.load(lo_ptr + b * 3 + 1)
    loz = tl.load(lo_ptr + b * 3 + 2)
    h = tl.load(h_ptr + b)
    gx = tl.load(dims_ptr + b * 3)
    gy = tl.load(dims_ptr + b * 3 + 1)
    gz = tl.load(dims_ptr + b * 3 + 2)
    x = tl.load(base, mask=valid, other=0.0)
    y = tl.load(base + 1, mask=valid, other=0.0)
    z = tl.load(base + 2, mask=valid, other=0.0)
    cx = tl.minimum(tl.maximum(tl.floor((x - lox) / h), 0.0), (gx - 1).to(tl.float32)).to(tl.int64)
    cy = tl.minimum(tl.maximum(tl.floor((y - loy) / h), 0.0), (gy - 1).to(tl.float32)).to(tl.int64)
    cz = tl.minimum(tl.maximum(tl.floor((z - loz) / h), 0.0), (gz - 1).to(tl.float32)).to(tl.int64)
    key = tl.where(valid, b * C + (cz * gy + cy) * gx + cx, n_clouds.to(tl.int64) * C)
    tl.store(key_ptr + b * N + rows, key, mask=in_range)


@triton.jit
def _count_occupied_kernel(key_ptr, occ_ptr, total, C, n_clouds, BLOCK: tl.constexpr):
    """``occ[b] +=`` the distinct cells of cloud ``b`` among the sorted keys (first of each run)."""
    pos = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = pos < total
    key = tl.load(key_ptr + pos, mask=m, other=0)
    prev = tl.load(key_ptr + pos - 1, mask=m & (pos > 0), other=-1)
    first = m & (key != prev) & (key < n_clouds.to(tl.int64) * C)
    tl.atomic_add(occ_ptr + key // C, 1, mask=first)


@triton.jit
def _refine_kernel(len_ptr, ext_ptr, occ_ptr, h_ptr, dims_ptr, C, target, AXIS_CELLS: tl.constexpr):
    """Per cloud: scale the cell size toward ``target`` points per occupied cell (by at most 2x
    and at least 0.22x a step), capped again."""
    b = tl.program_id(0).to(tl.int64)
    nf = tl.maximum(tl.load(len_ptr + b), 1).to(tl.float32)
    occ = tl.maximum(tl.load(occ_ptr + b), 1).to(tl.float32)
    ex = tl.load(ext_ptr + b * 3)
    ey = tl.load(ext_ptr + b * 3 + 1)
    ez = tl.load(ext_ptr + b * 3 + 2)
    h = tl.load(h_ptr + b)
    h = h * tl.sqrt(tl.minimum(tl.maximum(target / (nf / occ), 0.05), 4.0))
    h = _capped(h, ex, ey, ez, nf.to(tl.float64), C, AXIS_CELLS)
    _store_frame(b, h, ex, ey, ez, h_ptr, dims_ptr)


@on_tensor_device
def _keys(x, lengths, lo, h, dims, C):
    """``(B * N,)`` int64 cell keys of the slots of ``x (B, N, 3)`` float32."""
    B, N, _ = x.shape
    keys = torch.empty(B * N, dtype=torch.int64, device=x.device)
    if keys.numel():
        blocks = triton.cdiv(N, _BLOCK)
        _keys_kernel[(blocks * B,)](x, lengths, lo, h, dims, keys, N, C, B, blocks, BLOCK=_BLOCK)
    return keys


class Grid:
    """Points of a padded batch ``(B, P, 3)`` (float32) sorted into per-cloud uniform grids (see
    the module docstring).

    ``xyz (B * P, 3)`` and ``point_idx (B * P,)`` are the slots sorted by (cloud, cell), with each
    one's index into its padded cloud (the slots past a cloud's length last, in no cell);
    ``cell_start (B * C + 1,)`` is where each cell's points begin (and the last one's end); cloud
    ``b``'s grid has origin ``lo[b]``, cell size ``h[b]``, ``dims[b]`` cells (x, y, z) and its
    first cell at ``base[b]``.
    """

    def __init__(self, points: torch.Tensor, lengths: torch.Tensor, k_hint: int = 16):
        B, P, _ = points.shape
        dev = points.device
        self.lengths, self.cells_per_cloud = lengths.contiguous(), cells_per_cloud(P)
        self.lo = torch.empty((B, 3), dtype=torch.float32, device=dev)
        self.h = torch.empty((B,), dtype=torch.float32, device=dev)
        self.dims = torch.empty((B, 3), dtype=torch.int64, device=dev)
        self.base = torch.empty((B,), dtype=torch.int64, device=dev)
        if B == 0:
            self.xyz = torch.empty((0, 3), dtype=torch.float32, device=dev)
            self.point_idx = torch.empty(0, dtype=torch.int64, device=dev)
            self.cell_start = torch.zeros(1, dtype=torch.int64, device=dev)
        else:
            _build(self, points.float().contiguous(), max(2.0, k_hint / 4.0))


@on_tensor_device
def _build(grid: Grid, points: torch.Tensor, target: float) -> None:
    """Fill in ``grid``'s frames, cell sizes, sorted points and cell starts (B >= 1)."""
    B, P, _ = points.shape
    C, lengths = grid.cells_per_cloud, grid.lengths
    extent = torch.empty((B, 3), dtype=torch.float32, device=points.device)
    _frame_kernel[(B,)](points, lengths, grid.lo, extent, grid.h, grid.dims, grid.base, P, C, target,
                        BLOCK=_BLOCK, AXIS_CELLS=_AXIS_CELLS)
    for _ in range(_REFINEMENTS):
        keys = torch.sort(_keys(points, lengths, grid.lo, grid.h, grid.dims, C))[0]
        occupied = torch.zeros(B, dtype=torch.int32, device=points.device)
        if P:
            _count_occupied_kernel[(triton.cdiv(B * P, _BLOCK),)](keys, occupied, B * P, C, B, BLOCK=_BLOCK)
        _refine_kernel[(B,)](lengths, extent, occupied, grid.h, grid.dims, C, target, AXIS_CELLS=_AXIS_CELLS)
    keys, order = torch.sort(_keys(points, lengths, grid.lo, grid.h, grid.dims, C), stable=True)
    grid.xyz = points.view(B * P, 3).index_select(0, order)
    grid.point_idx = order % P
    grid.cell_start = torch.searchsorted(keys, torch.arange(B * C + 1, device=points.device))


def sort_queries(query: torch.Tensor, lengths: torch.Tensor, grid: Grid):
    """Queries ``(B, Q, 3)`` float32 in the order of their cells in ``grid``: ``(xyz (B * Q, 3),
    cloud (B * Q,), row (B * Q,))``, the slots past a cloud's length last with row -1."""
    B, Q, _ = query.shape
    query = query.float().contiguous()
    C = grid.cells_per_cloud
    keys, order = torch.sort(_keys(query, lengths.contiguous(), grid.lo, grid.h, grid.dims, C), stable=True)
    row = torch.where(keys < B * C, order % Q, -1)
    return query.view(B * Q, 3).index_select(0, order).contiguous(), order // Q, row

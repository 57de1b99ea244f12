"""Triton kernels for exact k-nearest-neighbor and ball search.

Two kernels share one top-k routine:

* ``_knn_brute_kernel``: a program per block of queries scans every point of its cloud in tiles.
  Any dimension D. Used for small clouds and D != 3.
* ``_knn_grid_kernel``: points are sorted into a uniform grid (cell start offsets); a program per
  block of queries (sorted by cell) scans rings of cells around each query until the k-th
  neighbor is closer than every unscanned cell. D = 3.

Top-k: each candidate is packed into one int64 key ``(float32 bits of the squared distance) << 32
| index``. Non-negative floats order like their bit patterns, so ascending keys are ascending
distances with ties broken by the lower index, the library's order. A block keeps the KP best
keys per query (sorted); a tile of KP new keys is merged by sorting the 2*KP keys and keeping the
first half (``tl.sort`` sorts values only, hence the packing). Tiles that cannot improve any
query's k-th neighbor are skipped.

Distances: ``(q - p)**2`` per coordinate, summed in coordinate order, launched with
``enable_fp_fusion=False`` so no FMA changes the rounding: bitwise the reference's distances.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from . import on_tensor_device
from .grid import Grid, sort_queries

INF_BITS = 0x7F800000  # float32 +inf
INF_KEY = tl.constexpr((INF_BITS << 32) | 0x7FFFFFFF)  # an empty slot: +inf, largest index
_BRUTE_MAX_POINTS = 2048  # above this, D = 3 clouds use the grid kernel


@triton.jit
def _pack(dist, idx):
    return (dist.to(tl.int32, bitcast=True).to(tl.int64) << 32) | idx.to(tl.int64)


@triton.jit
def _column(tile, k, KP: tl.constexpr):
    """Column ``k`` of a (BQ, KP) tile (registers cannot be indexed: a masked row sum)."""
    cols = tl.arange(0, KP)[None, :]
    return tl.sum(tl.where(cols == k, tile, 0), axis=1)


@triton.jit
def _kth_key(best, K: tl.constexpr, KP: tl.constexpr):
    """Column K-1 of the sorted (BQ, KP) buffer: each query's current k-th key."""
    return _column(best, K - 1, KP)


@triton.jit
def _merge(best, keys, K: tl.constexpr, KP: tl.constexpr, BQ: tl.constexpr):
    """Merge a tile of keys (BQ, KP) into the sorted best keys (BQ, KP)."""
    kth = _kth_key(best, K, KP)
    if tl.sum((keys < kth[:, None]).to(tl.int32)) > 0:
        both = tl.reshape(tl.join(best, keys), (BQ, 2 * KP))
        both = tl.sort(both, dim=1)
        halves = tl.permute(tl.reshape(both, (BQ, 2, KP)), (0, 2, 1))
        best, _ = tl.split(halves)
    return best


@triton.jit
def _store(best, out_d_ptr, out_i_ptr, rows, row_mask, K: tl.constexpr, KP: tl.constexpr):
    """Write the first K keys of each query as (squared distance, index); inf -> index -1."""
    cols = tl.arange(0, KP)
    dist = (best >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    idx = (best & 0xFFFFFFFF).to(tl.int64)
    idx = tl.where(dist == float("inf"), -1, idx)
    offs = rows.to(tl.int64)[:, None] * K + cols[None, :]
    mask = row_mask[:, None] & (cols[None, :] < K)
    tl.store(out_d_ptr + offs, dist, mask=mask)
    tl.store(out_i_ptr + offs, idx, mask=mask)


@triton.jit
def _knn_brute_kernel(
    q_ptr, p_ptr, qlen_ptr, plen_ptr, out_d_ptr, out_i_ptr,
    Q, P, radius2,
    D: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, BQ: tl.constexpr,
    EXCLUDE_SELF: tl.constexpr, USE_RADIUS: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    nq = tl.load(qlen_ptr + b)
    npts = tl.load(plen_ptr + b)
    rows = pid * BQ + tl.arange(0, BQ)
    row_mask = rows < nq
    q_base = q_ptr + b * Q * D + rows.to(tl.int64) * D
    best = tl.full((BQ, KP), INF_KEY, tl.int64)
    cols = tl.arange(0, KP)
    if pid * BQ < nq:
        for start in range(0, npts, KP):
            offs_p = start + cols
            p_mask = offs_p < npts
            p_base = p_ptr + b * P * D + offs_p.to(tl.int64) * D
            for c in tl.static_range(D):
                qc = tl.load(q_base + c, mask=row_mask, other=0.0)
                pc = tl.load(p_base + c, mask=p_mask, other=0.0)
                diff = qc[:, None] - pc[None, :]
                if c == 0:
                    dist = diff * diff
                else:
                    dist = dist + diff * diff
            invalid = (~p_mask)[None, :] | (~row_mask)[:, None]
            if EXCLUDE_SELF:
                invalid = invalid | (rows[:, None] == offs_p[None, :])
            if USE_RADIUS:
                invalid = invalid | (dist > radius2)
            dist = tl.where(invalid, float("inf"), dist)
            best = _merge(best, _pack(dist, offs_p[None, :]), K, KP, BQ)
        _store(best, out_d_ptr + b * Q * K, out_i_ptr + b * Q * K, rows, row_mask, K, KP)


@triton.jit
def _scan_cells(
    best, qx, qy, qz, qrow, lo_cell, hi_cell, ok, active, start_ptr, xyz_ptr, pid_ptr, radius2,
    K: tl.constexpr, KP: tl.constexpr, BQ: tl.constexpr, EXCLUDE_SELF: tl.constexpr,
    USE_RADIUS: tl.constexpr,
):
    """Scan the contiguous cell range [lo_cell, hi_cell] of each active query."""
    use = ok & active
    seg_start = tl.load(start_ptr + lo_cell, mask=use, other=0)
    seg_end = tl.load(start_ptr + hi_cell + 1, mask=use, other=0)
    n_max = tl.max(seg_end - seg_start)
    cols = tl.arange(0, KP)
    for j in range(0, n_max, KP):
        pos = seg_start[:, None] + j + cols[None, :]
        m = pos < seg_end[:, None]
        px = tl.load(xyz_ptr + pos * 3, mask=m, other=0.0)
        py = tl.load(xyz_ptr + pos * 3 + 1, mask=m, other=0.0)
        pz = tl.load(xyz_ptr + pos * 3 + 2, mask=m, other=0.0)
        pidx = tl.load(pid_ptr + pos, mask=m, other=0)
        dx = qx[:, None] - px
        dy = qy[:, None] - py
        dz = qz[:, None] - pz
        dist = dx * dx
        dist = dist + dy * dy
        dist = dist + dz * dz
        invalid = ~m
        if EXCLUDE_SELF:
            invalid = invalid | (pidx == qrow[:, None])
        if USE_RADIUS:
            invalid = invalid | (dist > radius2)
        dist = tl.where(invalid, float("inf"), dist)
        best = _merge(best, _pack(dist, pidx), K, KP, BQ)
    return best


@triton.jit
def _grid_queries(q_ptr, qbatch_ptr, qrow_ptr, lo_ptr, h_ptr, dims_ptr, base_ptr, slots64, qmask):
    """A block of cell-sorted queries (``grid.sort_queries``): which slots hold one (row >= 0),
    coordinates, cloud and row; their cloud's grid (origin, cell size, cells per axis, first
    cell); the query's cell, clamped into the grid (queries may lie outside the points' box); and
    the rounding slack of ``_unscanned_distance``."""
    qmask = qmask & (tl.load(qrow_ptr + slots64, mask=qmask, other=-1) >= 0)
    qx = tl.load(q_ptr + slots64 * 3, mask=qmask, other=0.0)
    qy = tl.load(q_ptr + slots64 * 3 + 1, mask=qmask, other=0.0)
    qz = tl.load(q_ptr + slots64 * 3 + 2, mask=qmask, other=0.0)
    qb = tl.load(qbatch_ptr + slots64, mask=qmask, other=0)
    qrow = tl.load(qrow_ptr + slots64, mask=qmask, other=0)
    lox = tl.load(lo_ptr + qb * 3, mask=qmask, other=0.0)
    loy = tl.load(lo_ptr + qb * 3 + 1, mask=qmask, other=0.0)
    loz = tl.load(lo_ptr + qb * 3 + 2, mask=qmask, other=0.0)
    h = tl.load(h_ptr + qb, mask=qmask, other=1.0)
    gx = tl.load(dims_ptr + qb * 3, mask=qmask, other=1)
    gy = tl.load(dims_ptr + qb * 3 + 1, mask=qmask, other=1)
    gz = tl.load(dims_ptr + qb * 3 + 2, mask=qmask, other=1)
    base = tl.load(base_ptr + qb, mask=qmask, other=0)
    cx = tl.minimum(tl.maximum(tl.floor((qx - lox) / h), 0.0), (gx - 1).to(tl.float32)).to(tl.int64)
    cy = tl.minimum(tl.maximum(tl.floor((qy - loy) / h), 0.0), (gy - 1).to(tl.float32)).to(tl.int64)
    cz = tl.minimum(tl.maximum(tl.floor((qz - loz) / h), 0.0), (gz - 1).to(tl.float32)).to(tl.int64)
    slack = 1e-4 * h + 1e-6 * (tl.abs(qx) + tl.abs(qy) + tl.abs(qz) + tl.abs(lox) + tl.abs(loy)
                                + tl.abs(loz) + h * (gx + gy + gz).to(tl.float32))
    return qmask, qx, qy, qz, qb, qrow, lox, loy, loz, h, gx, gy, gz, base, cx, cy, cz, slack


@triton.jit
def _unscanned_distance(qx, qy, qz, cx, cy, cz, r, lox, loy, loz, h, gx, gy, gz, slack, BQ: tl.constexpr):
    """A lower bound (less the rounding ``slack``) on the distance from each query to any point
    outside the block of cells within ``r`` of its cell; sides that reach the grid's edge hide
    nothing, so a block covering the grid gives inf."""
    inf = float("inf")
    bd = tl.full((BQ,), inf, tl.float32)
    bd = tl.minimum(bd, tl.where(cx - r > 0, qx - (lox + (cx - r).to(tl.float32) * h), inf))
    bd = tl.minimum(bd, tl.where(cy - r > 0, qy - (loy + (cy - r).to(tl.float32) * h), inf))
    bd = tl.minimum(bd, tl.where(cz - r > 0, qz - (loz + (cz - r).to(tl.float32) * h), inf))
    bd = tl.minimum(bd, tl.where(cx + r < gx - 1, lox + (cx + r + 1).to(tl.float32) * h - qx, inf))
    bd = tl.minimum(bd, tl.where(cy + r < gy - 1, loy + (cy + r + 1).to(tl.float32) * h - qy, inf))
    bd = tl.minimum(bd, tl.where(cz + r < gz - 1, loz + (cz + r + 1).to(tl.float32) * h - qz, inf))
    # (inf stays inf: were the slack inf too, inf - inf = NaN would read as 0 and no ring would end)
    return tl.where(bd < inf, tl.maximum(bd - slack, 0.0), inf)


@triton.jit
def _knn_grid_kernel(
    q_ptr, qbatch_ptr, qrow_ptr, nq_total,
    xyz_ptr, pid_ptr, start_ptr,
    lo_ptr, h_ptr, dims_ptr, base_ptr,
    out_d_ptr, out_i_ptr, Q, radius2,
    K: tl.constexpr, KP: tl.constexpr, BQ: tl.constexpr,
    EXCLUDE_SELF: tl.constexpr, USE_RADIUS: tl.constexpr,
):
    slots = tl.program_id(0) * BQ + tl.arange(0, BQ)
    qmask = slots < nq_total
    qmask, qx, qy, qz, qb, qrow, lox, loy, loz, h, gx, gy, gz, base, cx, cy, cz, slack = _grid_queries(
        q_ptr, qbatch_ptr, qrow_ptr, lo_ptr, h_ptr, dims_ptr, base_ptr, slots.to(tl.int64), qmask)

    best = tl.full((BQ, KP), INF_KEY, tl.int64)
    active = qmask
    r = 0
    while tl.sum(active.to(tl.int32)) > 0:
        for oz in range(-r, r + 1):
            for oy in range(-r, r + 1):
                y = cy + oy
                z = cz + oz
                ok = (y >= 0) & (y < gy) & (z >= 0) & (z < gz)
                row = base + (z * gy + y) * gx
                if (oy == r) | (oy == -r) | (oz == r) | (oz == -r):
                    # A full row of 2r+1 cells: contiguous in the sorted points.
                    xl = tl.maximum(cx - r, 0)
                    xh = tl.minimum(cx + r, gx - 1)
                    best = _scan_cells(best, qx, qy, qz, qrow, row + xl, row + xh, ok, active,
                                       start_ptr, xyz_ptr, pid_ptr, radius2,
                                       K, KP, BQ, EXCLUDE_SELF, USE_RADIUS)
                else:
                    # Inside the shell's faces only the two end cells of the row are new.
                    xl = cx - r
                    best = _scan_cells(best, qx, qy, qz, qrow, row + xl, row + xl, ok & (xl >= 0),
                                       active, start_ptr, xyz_ptr, pid_ptr, radius2,
                                       K, KP, BQ, EXCLUDE_SELF, USE_RADIUS)
                    xh = cx + r
                    best = _scan_cells(best, qx, qy, qz, qrow, row + xh, row + xh, ok & (xh < gx),
                                       active, start_ptr, xyz_ptr, pid_ptr, radius2,
                                       K, KP, BQ, EXCLUDE_SELF, USE_RADIUS)
        bd = _unscanned_distance(qx, qy, qz, cx, cy, cz, r, lox, loy, loz, h, gx, gy, gz, slack, BQ)
        kth = (_kth_key(best, K, KP) >> 32).to(tl.int32).to(tl.float32, bitcast=True)
        if USE_RADIUS:
            kth = tl.minimum(kth, radius2)
        active = active & ~(kth < bd * bd) & (bd < float("inf"))
        r += 1
    out_rows = qb * Q + qrow
    _store(best, out_d_ptr, out_i_ptr, out_rows, qmask, K, KP)


def _kp(k: int) -> int:
    return max(16, triton.next_power_of_2(k))


def _out(B, Q, K, dtype, device):
    return (torch.full((B, Q, K), float("inf"), dtype=dtype, device=device),
            torch.full((B, Q, K), -1, dtype=torch.int64, device=device))


@on_tensor_device
def search_brute(query, points, k, radius2, query_lengths, points_lengths, exclude_self):
    """Brute-force kNN / ball search of padded float32 clouds, any D."""
    B, Q, D = query.shape
    P = points.shape[1]
    out_d, out_i = _out(B, Q, k, query.dtype, query.device)
    if B == 0 or Q == 0 or P == 0:
        return out_d, out_i
    KP = _kp(k)
    BQ = 32 if KP <= 32 else 16
    grid = (triton.cdiv(Q, BQ), B)
    _knn_brute_kernel[grid](
        query.contiguous(), points.contiguous(), query_lengths.contiguous(), points_lengths.contiguous(),
        out_d, out_i, Q, P, 0.0 if radius2 is None else radius2,
        D=D, K=k, KP=KP, BQ=BQ, EXCLUDE_SELF=exclude_self, USE_RADIUS=radius2 is not None,
        enable_fp_fusion=False,
    )
    return out_d, out_i


@on_tensor_device
def search_grid(query, grid, k, radius2, query_lengths, exclude_self):
    """Grid kNN / ball search of padded float32 queries against a prebuilt ``Grid`` (D = 3)."""
    B, Q, _ = query.shape
    out_d, out_i = _out(B, Q, k, query.dtype, query.device)
    if B == 0 or Q == 0:
        return out_d, out_i
    q, qb, qrow = sort_queries(query, query_lengths, grid)
    KP = _kp(k)
    BQ = 32 if KP <= 32 else 16
    n = q.shape[0]
    _knn_grid_kernel[(triton.cdiv(n, BQ),)](
        q, qb, qrow, n, grid.xyz, grid.point_idx, grid.cell_start,
        grid.lo, grid.h, grid.dims, grid.base,
        out_d, out_i, Q, 0.0 if radius2 is None else radius2,
        K=k, KP=KP, BQ=BQ, EXCLUDE_SELF=exclude_self, USE_RADIUS=radius2 is not None,
        enable_fp_fusion=False,
    )
    return out_d, out_i


def search(query, points, k, radius2, query_lengths, points_lengths, exclude_self, grid=None):
    """Dispatch between the brute-force and grid kernels (float32 coordinates)."""
    D = query.shape[-1]
    if D != 3 or (grid is None and points.shape[1] <= _BRUTE_MAX_POINTS):
        return search_brute(query, points, k, radius2, query_lengths, points_lengths, exclude_self)
    if grid is None:
        grid = Grid(points, points_lengths, k_hint=k)
    return search_grid(query, grid, k, radius2, query_lengths, exclude_self)

"""Neighbor pairs of Pointwise convolution without a dense or Chebyshev-ball candidate search.

Coordinates are snapped to fixed point: ``U = round(x * 2^20 / cell_size)`` (int64, 2^-20 of a cell),
and every rule of DESIGN.md 5.2 is then evaluated exactly in integers, on every backend:

    D = U_j - U_i + (2s + 1) * 2^19        (x_j - lo_i, in units of 2^-20 cells)
    inside  <=>  0 <= D <= (2s + 1) * 2^20  (the closed cube)
    c = min(2s, D >> 20); kept when c % s == 0, cell c // s.

Snapping to 2^-20 of a cell (about float32's resolution at 1) makes points that lie on a cell
border up to representation error behave as if exactly on it, and makes the rule one integer
formula that the reference, the CPU path and the CUDA path share bit for bit.

Search. Write ``L_i = U_i - 2^19`` (the cube's lower corner shifted by s cells), ``A_i = L_i >> 20``
its grid cell and ``phi_i = L_i & (2^20 - 1)`` its offset inside it; points sit in grid cells
``G_j = U_j >> 20`` at offsets ``f_j``. Then ``c = s + (G_j - A_i) - [f_j < phi_i]`` (non-strict on
the cube's top face), so along one axis a kept cell ``c = s + k`` (k in {-s, 0, s}) draws from the
two grid cells ``A_i + k`` (needs f_j >= phi_i) and ``A_i + k + 1`` (needs f_j < phi_i): the search
visits 4 cells per axis for s = 1 and 6 for s >= 2, whatever the dilation, never the holes. Centers
sharing an anchor ``A`` share those cells, and the three per-axis offset tests of a candidate run as
one int64 subtraction (three 21-bit fields, each with a guard bit that holds the comparison).
"""
from __future__ import annotations

import itertools
import math

import torch

from ..sparse.kernel_map import SiteIndex, linearize

FRAC_BITS = 20
ONE = 1 << FRAC_BITS
_FIELD = FRAC_BITS + 1  # 20 offset bits and a guard bit per axis
_SHIFTS = (2 * _FIELD, _FIELD, 0)  # x, y, z
_GUARD = [1 << (FRAC_BITS + sh) for sh in _SHIFTS]
_MAX_ABS_CELLS = float(1 << 40)  # |x| / cell_size: keeps every int64 below 2^61
_CHUNK = 1 << 20  # candidates per step
_ALL_GUARDS = sum(_GUARD)


def quantize(points: torch.Tensor, cell_size: float) -> torch.Tensor:
    """``(..., 3)`` coordinates -> int64 fixed point in units of ``cell_size / 2^20``."""
    u = torch.round(points.detach().double() * (ONE / cell_size))
    if u.numel() and float(u.abs().max()) > _MAX_ABS_CELLS * ONE:
        raise ValueError(f"points / cell_size must stay below 2^40 in magnitude (cell_size={cell_size})")
    return u.long()


def cell_of(ui: torch.Tensor, uj: torch.Tensor, s: int) -> torch.Tensor:
    """Cell 0..26 of neighbor ``uj`` around center ``ui`` (quantized, ``(..., 3)``), -1 when outside
    the closed cube or in a hole: the formula of the module docstring, evaluated directly."""
    d = uj - ui + (2 * s + 1) * (ONE // 2)
    inside = ((d >= 0) & (d <= (2 * s + 1) * ONE)).all(-1)
    c = torch.clamp(d >> FRAC_BITS, min=0, max=2 * s)
    ok = inside & (c % s == 0).all(-1)
    c = c // s
    return torch.where(ok, (c[..., 0] * 3 + c[..., 1]) * 3 + c[..., 2], -1)


def _pack(offsets: torch.Tensor) -> torch.Tensor:
    """``(M, 3)`` in [0, 2^20) -> one int64 with x, y, z in their fields (guard bits clear)."""
    return (offsets[:, 0] << _SHIFTS[0]) | (offsets[:, 1] << _SHIFTS[1]) | offsets[:, 2]


def _take(values: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``values[idx]`` for 1-D tensors (``gather`` is about twice as fast as indexing on CPU)."""
    return torch.gather(values, 0, idx)


def _expand(counts: torch.Tensor):
    """For segments of the given sizes: (segment of each element, element index inside its segment)."""
    seg = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
    first = torch.cumsum(counts, 0) - counts
    return seg, torch.arange(seg.numel(), device=counts.device) - _take(first, seg)


def neighbor_pairs(U: torch.Tensor, batch: torch.Tensor, dilation: int):
    """All kept (center, neighbor, cell) triples among the quantized points ``U (M, 3)`` of clouds
    ``batch (M,)`` (points of different clouds never pair). Returns three int64 ``(P,)`` tensors,
    rows into ``U``; the order is deterministic."""
    s = dilation
    dev = U.device
    empty = torch.zeros(0, dtype=torch.int64, device=dev)
    if U.shape[0] == 0:
        return empty, empty, empty
    L = U - ONE // 2
    A, phi = L >> FRAC_BITS, L & (ONE - 1)
    G, frac = U >> FRAC_BITS, U & (ONE - 1)
    deltas = [-1, 0, 1, 2] if s == 1 else [-s, -s + 1, 0, 1, s, s + 1]  # grid cell - anchor, per axis
    lo = torch.minimum(G.min(0).values, A.min(0).values + deltas[0])
    hi = torch.maximum(G.max(0).values, A.max(0).values + deltas[-1])
    ext = (hi - lo + 1).tolist()
    nb = int(batch.max()) + 1
    if math.prod(ext) * nb >= 1 << 62:
        raise ValueError("points span too many cells of cell_size for one grid (more than 2^62 in all)")
    strides = [ext[1] * ext[2], ext[2], 1]

    # points sorted by grid cell, the occupied cells indexed; centers grouped by anchor cell
    pkey = linearize(batch, G - lo, ext)
    order_p = torch.argsort(pkey, stable=True)
    cell_keys, cell_count = torch.unique_consecutive(_take(pkey, order_p), return_counts=True)
    cell_start = torch.cumsum(cell_count, 0) - cell_count
    first = _take(order_p, cell_start)
    cells = SiteIndex(torch.cat([batch[first, None], (G - lo)[first]], 1), ext, nb)
    frac_sorted = _pack(frac)[order_p]
    akey = linearize(batch, A - lo, ext)
    order_c = torch.argsort(akey, stable=True)
    anchors, anchor_count = torch.unique_consecutive(akey[order_c], return_counts=True)
    anchor_start = torch.cumsum(anchor_count, 0) - anchor_count
    # offsets as "2^20 + phi - 1" per field: the guard bit of (that - f) is set <=> f < phi
    phi_sorted = _pack(phi[order_c]) + _ALL_GUARDS - ((1 << _SHIFTS[0]) | (1 << _SHIFTS[1]) | 1)

    # per visited cell offset (delta_x, delta_y, delta_z): its key offset, the required comparison
    # bits (guard set <=> f_j < phi_i, or <= on the top face), which axes are tested, and the cell
    combos = list(itertools.product(deltas, repeat=3))
    off_key, strict_fix, mask, want, cell_base = [], [], [], [], []
    for combo in combos:
        off_key.append(sum(d * st for d, st in zip(combo, strides)))
        fix = m = w = 0
        cb = 0
        for axis, d in enumerate(combo):
            top = d == s + 1
            fix += (1 << _SHIFTS[axis]) if top else 0  # non-strict on the top face
            if s == 1:
                # c = 1 + d - flag must lie in [0, 2]: forced for d = -1 (flag 0) and d = 2 (flag 1)
                if d in (-1, 2):
                    m |= _GUARD[axis]
                    w |= _GUARD[axis] if d == 2 else 0
                cb = cb * 3 + (1 + d)
            else:
                # d = k (flag 0) or k + 1 (flag 1) for the kept k in {-s, 0, s}: cell (k + s) / s
                k = d if d in (-s, 0, s) else d - 1
                m |= _GUARD[axis]
                w |= _GUARD[axis] if d != k else 0
                cb = cb * 3 + (k + s) // s
        strict_fix.append(fix)
        mask.append(m)
        want.append(w)
        cell_base.append(cb)
    as_t = lambda v: torch.tensor(v, dtype=torch.int64, device=dev)  # noqa: E731
    off_key, strict_fix, mask, want, cell_base = map(as_t, (off_key, strict_fix, mask, want, cell_base))

    # blocks: (anchor, visited cell) with >= 1 point
    visited = (anchors[:, None] + off_key[None, :]).reshape(-1)
    ordinal = cells.lookup(visited, torch.ones_like(visited, dtype=torch.bool))
    blk = torch.nonzero(ordinal >= 0).squeeze(1)
    ordinal = _take(ordinal, blk)
    blk_anchor, blk_combo = blk // len(combos), blk % len(combos)
    n_centers, n_points = _take(anchor_count, blk_anchor), _take(cell_count, ordinal)
    blocks = (_take(anchor_start, blk_anchor), n_centers, _take(cell_start, ordinal), n_points, blk_combo)
    rule = (strict_fix, mask, want, cell_base)

    # in chunks of whole blocks of about _CHUNK candidate pairs each, so the temporaries stay in cache
    work = torch.cumsum(n_centers * n_points, 0)
    total = int(work[-1]) if work.numel() else 0
    marks = torch.arange(_CHUNK, max(total, _CHUNK), _CHUNK, device=dev, dtype=torch.int64)
    cuts = torch.searchsorted(work, marks, right=True).tolist()
    parts = [_pairs_of_blocks([x[b0:b1] for x in blocks], rule, phi_sorted, frac_sorted, s)
             for b0, b1 in zip([0] + cuts, cuts + [blk.numel()]) if b1 > b0]
    if not parts:
        return empty, empty, empty
    ctr, nbr, cell = (torch.cat(x) for x in zip(*parts))
    return _take(order_c, ctr), _take(order_p, nbr), cell


def _pairs_of_blocks(blocks, rule, phi_sorted, frac_sorted, s):
    """The kept pairs of (group of centers, grid cell) blocks: every candidate pair is tested by one
    subtraction of packed offsets. Returns positions in the anchor- and cell-sorted orders, cells."""
    center_start, n_centers, point_start, n_points, combo = blocks
    strict_fix, mask, want, cell_base = rule
    # rows: one center and one block
    row_blk, i = _expand(n_centers)
    row_center = _take(center_start, row_blk) + i
    row_combo = _take(combo, row_blk)
    row_phi = _take(phi_sorted, row_center) + _take(strict_fix, row_combo)
    row_count = _take(n_points, row_blk)
    # candidates: one row and one point of its block's cell
    pair_row = torch.repeat_interleave(torch.arange(row_count.numel(), device=row_count.device), row_count)
    shift = _take(point_start, row_blk) - (torch.cumsum(row_count, 0) - row_count)
    pair_point = torch.arange(pair_row.numel(), device=row_count.device) + _take(shift, pair_row)
    flags = _take(row_phi, pair_row) - _take(frac_sorted, pair_point)
    tested = flags & (_take(_take(mask, row_combo), pair_row) if s == 1 else _ALL_GUARDS)
    kept = torch.nonzero(tested == _take(_take(want, row_combo), pair_row)).squeeze(1)
    rows = _take(pair_row, kept)
    cell = _take(cell_base, _take(row_combo, rows))
    if s == 1:  # the flag picks cell 1 + d - flag along each axis
        flags = _take(flags, kept)
        bit = lambda axis: (flags >> (FRAC_BITS + _SHIFTS[axis])) & 1  # noqa: E731
        cell = cell - bit(0) * 9 - bit(1) * 3 - bit(2)
    return _take(row_center, rows), _take(pair_point, kept), cell

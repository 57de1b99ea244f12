"""Neighbor pairs of Pointwise convolution without a dense or Chebyshev-ball candidate search.

Coordinates are snapped to fixed point: ``U = round(x * 2^19 / cell_size)`` (int64, 2^-19 of a cell),
and every rule of DESIGN.md 5.2 is then evaluated exactly in integers, on every backend:

    D = U_j - U_i + (2s + 1) * 2^18        (x_j - lo_i, in units of 2^-19 cells)
    inside  <=>  0 <= D <= (2s + 1) * 2^19  (the closed cube)
    c = min(2s, D >> 19); kept when c % s == 0, cell c // s.

Snapping to 2^-19 of a cell (about float32's resolution at 1) makes points that lie on a cell
border up to representation error behave as if exactly on it, and makes the rule one integer
formula that the reference, the CPU path and the CUDA path share bit for bit.

Search. Write ``L_i = U_i - 2^18`` (the cube's lower corner shifted by s cells), ``A_i = L_i >> 19``
its grid cell and ``phi_i = L_i & (2^19 - 1)`` its offset inside it; points sit in grid cells
``G_j = U_j >> 19`` at offsets ``f_j``. Along one axis ``c = s + (G_j - A_i) - flag`` with
``flag = [f_j < phi_i]`` (``[f_j <= phi_i]`` on the cube's top face, ``G_j - A_i = s + 1``). So
the points of a kept cell ``k s`` (k in {0, 1, 2}) lie in the two grid cells ``A_i + (k - 1) s + b``
with ``b = flag``, and for s = 1 the four grid cells ``A_i - 1 .. A_i + 2`` hold every neighbor,
``c = 2 sigma + b - flag`` in the grid cell ``A_i + 2 sigma - 1 + b``. The search therefore
indexes *windows*: 2 x 2 x 2 blocks of grid cells keyed by their lowest cell, each listing its
points (every point is in 8 windows) with their corner ``b``; they depend on the points only, so
one ``Windows`` serves the searches of several dilations. Each center visits 27 windows (s >= 2:
one per kept cell, whatever the dilation, never the holes) or 8 (s = 1: the 4 x 4 x 4 cells
around it), centers in order, so for s >= 2 the pairs come out sorted by (center, cell) with no
sort at all; for s = 1 each chunk of whole centers is sorted by (center, cell) on its own (small
sorts in cache, not one of every pair).

Along x a window's points are grouped into 16 bins of an eighth of a cell (``b_x * 8 + (f_x >>
16)``), in ascending order within a bin, and a center reads only the bins that its cube's x
extent overlaps (in cells from the window's lower edge): for s >= 2 the kept cell's ``[phi, phi +
1]`` (9 bins of the 16), for s = 1 ``[phi, 2)`` of the lower window and ``[0, 1 + phi]`` of the
upper one. The bins holding the ends
are read whole and every candidate is still tested on all three axes, so this only skips points
that cannot match: 38% fewer candidates on the ``bench_pointconv`` clouds.

The three per-axis flag tests of a candidate are one int64 subtraction: three 21-bit fields of
doubled offsets, each with a guard bit that holds the comparison ``2 f + 1 - b <= 2 phi - 1 + t``
(``t`` = top face), which folds the strict and non-strict cases into one threshold. Per field,
``x = 2^20 + 2 phi - 1 + t - (2 f + 1 - b)`` lies in [0, 2^21) with guard bit ``flag``. Where the
flags alone matter (s >= 2: every axis needs ``flag == b``), the corner rides along in the guard
bits of the entry, ``e = 2 f + 1 - b + b 2^20``, and ``V - e`` is tested as a whole: a field with
``flag == b`` is ``x - b 2^20`` in [0, 2^20), guard clear, no borrow; one with flag 1, b 0 keeps
its guard bit; one with flag 0, b 1 borrows from the field above and reads ``x + 2^20``, guard
set. A borrow can hide a guard bit only in a field above a mismatch, so the lowest mismatching
field always shows its guard: all flags match exactly when ``(V - e) & guards == 0``.
"""
from __future__ import annotations

import itertools
import math

import torch

from .._index1d import flatnonzero, take
from .._threads import map_ordered
from ..sparse.kernel_map import SiteIndex, linearize

FRAC_BITS = 19
ONE = 1 << FRAC_BITS
_FIELD = FRAC_BITS + 2  # a doubled offset (FRAC_BITS + 1 bits) and a guard bit per axis
_SHIFTS = (2 * _FIELD, _FIELD, 0)  # x, y, z: 63 bits in all
_LOW = sum(1 << sh for sh in _SHIFTS)  # 1 in every field
_GUARDS = _LOW << (FRAC_BITS + 1)  # the guard bit of every field
_MAX_ABS_CELLS = float(1 << 40)  # |x| / cell_size: keeps every int64 below 2^61
_CENTERS = 1 << 13  # centers per step of the window lookups
# on CUDA a step is a dozen small launches whatever its size: 16x more centers per step built
# PointwiseCNN's neighbors (128 clouds x 2,048 points) 2.6x faster on an H100
# (benchmarks/sweep_gpu_configs.py, RESULTS.md), the lookups' temporaries still a few hundred MB
_CENTERS_CUDA = 1 << 17
_CHUNK = 1 << 20  # candidates per step
_X_BINS = 8  # bins per grid cell along x (module docstring): 16 per window; a power of two
_X_BIN_SHIFT = FRAC_BITS - (_X_BINS.bit_length() - 1)  # an offset's bin in its cell: f >> shift
_WINDOW_BIN_BITS = _X_BINS.bit_length()  # an entry's bin in its window, below its window's key
_CELL_WEIGHTS = (9, 3, 1)  # cell = 9 cx + 3 cy + cz
_CORNERS = list(itertools.product((0, 1), repeat=3))  # b of a window's 8 grid cells, x major


def quantize(points: torch.Tensor, cell_size: float) -> torch.Tensor:
    """``(..., 3)`` coordinates -> int64 fixed point in units of ``cell_size / 2^19``."""
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


def _pack(fields: torch.Tensor) -> torch.Tensor:
    """``(..., 3)`` values in [0, 2^21) -> one int64 with x, y, z in their fields."""
    return (fields[..., 0] << _SHIFTS[0]) | (fields[..., 1] << _SHIFTS[1]) | fields[..., 2]


def _guard_code(q: torch.Tensor) -> torch.Tensor:
    """The guard bits of packed values as a 3-bit number, x the high bit."""
    g = FRAC_BITS + 1
    return ((q >> (g + _SHIFTS[0] - 2)) & 4) | ((q >> (g + _SHIFTS[1] - 1)) & 2) | ((q >> g) & 1)


def _s1_cells() -> torch.Tensor:
    """For s = 1, the cell at index ``8 sigma + q`` (sigma: the window's 3 bits, q: the axes whose
    flag differs from the corner b, as ``_guard_code`` numbers them): per axis ``c = 2 sigma + b -
    flag``, which is the middle cell 1 where flag != b (only possible where b != sigma: the other
    axes are tested for flag == b) and ``2 sigma`` elsewhere."""
    cells = []
    for sigma in _CORNERS:
        for q in _CORNERS:
            cells.append(sum(w * (1 if qa else 2 * sa) for w, sa, qa in zip(_CELL_WEIGHTS, sigma, q)))
    return torch.tensor(cells, dtype=torch.int32)


def _slots(s: int):
    """Per window a center visits: its offset from the anchor, the cell it fills (for s = 1, where
    the flags pick the cell, its index base ``8 sigma`` into ``_s1_cells``), top-face bits ``t``
    (low bit per field) and ``sigma`` (guard bits; 0 for s >= 2)."""
    def packed(bits):
        return sum(b << sh for b, sh in zip(bits, _SHIFTS))

    slots = []
    for k in (_CORNERS if s == 1 else itertools.product(range(3), repeat=3)):
        if s == 1:  # k = sigma: the lower or upper pair of the 4 x 4 x 4 grid cells, per axis
            slots.append(([2 * a - 1 for a in k], 8 * _CORNERS.index(k), packed(k), packed(k) << (FRAC_BITS + 1)))
        else:  # k = kappa: the kept cell k s per axis
            slots.append(([(a - 1) * s for a in k], sum(w * a for w, a in zip(_CELL_WEIGHTS, k)),
                          packed([int(a == 2) for a in k]), 0))
    return [torch.tensor(list(x)) for x in zip(*slots)]


class Windows:
    """The 2 x 2 x 2 windows of grid cells over quantized points ``U (M, 3)`` of clouds ``batch``
    (see the module docstring), with what every center needs to visit them: per window its
    entries (``start``, ``count``) and where its x bins start among them (``bin_start``, 2 X + 1
    per window). They depend on the points only: one ``Windows`` serves the searches of every
    dilation up to ``reach``."""

    def __init__(self, U: torch.Tensor, batch: torch.Tensor, reach: int):
        dev = U.device
        self.reach = reach
        L = U - ONE // 2
        self.anchor, phi = L >> FRAC_BITS, L & (ONE - 1)  # A and phi of every center
        G, frac = U >> FRAC_BITS, U & (ONE - 1)
        # the grid covers the points' cells and every window a center visits at dilations <= reach
        self.lo = torch.minimum(G.min(0).values - 1, self.anchor.min(0).values - reach)
        hi = torch.maximum(G.max(0).values, self.anchor.max(0).values + reach)
        self.ext = (hi - self.lo + 1).tolist()
        nb = int(batch.max()) + 1
        if math.prod(self.ext) * nb * 2 * _X_BINS >= 1 << 62:  # the keys of (window, x bin)
            raise ValueError(f"the points and the windows of dilation {reach} around them span too many cells of "
                             "cell_size for one grid (more than 2^58 in all): use a larger cell_size or a smaller "
                             "dilation")
        # every point in the 8 windows whose lowest cell is G - b. Linear keys are additive (G - b
        # stays inside the grid): a window's key is its point's cell key minus b's. Within a window
        # the points are grouped by x bin (b_x X + f_x in X-ths of a cell: 2 X bins from the
        # window's lower edge), in ascending order within a bin (generated point-major, sorted
        # stably): a center then reads only the bins its cube's x extent overlaps.
        corners = torch.tensor(_CORNERS, device=dev)
        wkey = (linearize(batch, G - self.lo, self.ext)[:, None]
                - linearize(torch.zeros(8, dtype=torch.int64, device=dev), corners, self.ext))
        xbin = corners[:, 0] * _X_BINS + (frac[:, :1] >> _X_BIN_SHIFT)
        key = (wkey * (2 * _X_BINS) + xbin).reshape(-1)
        if math.prod(self.ext) * nb * 2 * _X_BINS < 1 << 31:
            key = key.int()  # sorts faster
        key, order = torch.sort(key, stable=True)
        wkey, xbin = key >> _WINDOW_BIN_BITS, key & (2 * _X_BINS - 1)
        self.count = torch.unique_consecutive(wkey, return_counts=True)[1]
        self.start = torch.cumsum(self.count, 0) - self.count
        self.index = SiteIndex.from_keys(take(wkey, self.start), self.ext, nb)
        # per window, where each x bin starts among its entries (2 X + 1 bounds, row-major)
        n_windows = self.count.numel()
        window = torch.repeat_interleave(torch.arange(n_windows, device=dev), self.count)
        in_bin = torch.bincount(window * (2 * _X_BINS) + xbin, minlength=n_windows * 2 * _X_BINS)
        self.bin_start = torch.zeros((n_windows, 2 * _X_BINS + 1), dtype=torch.int32, device=dev)
        torch.cumsum(in_bin.view(n_windows, 2 * _X_BINS), 1, out=self.bin_start[:, 1:])
        self.bin_start = self.bin_start.view(-1)
        self.center_bin = phi[:, 0] >> _X_BIN_SHIFT  # the x bin of each center's phi
        self.entry_point, corner = order >> 3, order & 7
        # per entry: doubled offsets 2 f + 1 - b in the fields, b in the guard bits (see the docstring)
        corner_term = (_pack(corners) << (FRAC_BITS + 1)) - _pack(corners)
        self.entry = take(_pack(2 * frac + 1), self.entry_point) + take(corner_term, corner)
        # per center: 2^20 + 2 phi - 1 in the fields (+ t per window)
        self.center_base = _pack(2 * phi + (2 * ONE - 1))


def neighbor_pairs(U: torch.Tensor, batch: torch.Tensor, dilation: int, windows: Windows | None = None):
    """All kept (center, neighbor, cell) triples among the quantized points ``U (M, 3)`` of clouds
    ``batch (M,)`` (points of different clouds never pair). Returns three ``(P,)`` tensors (int32
    when ``27 M < 2^31``, else int64), rows into ``U``, sorted by center, then cell; within a
    (center, cell) the neighbors come in a fixed order (the windows', by x bin, then index).
    ``windows``: a ``Windows`` of these points with ``reach >= dilation``, to share between
    dilations (built here if None)."""
    key, neighbor = neighbor_entries(U, batch, dilation, windows)
    return key // 27, neighbor, key % 27


def neighbor_entries(U: torch.Tensor, batch: torch.Tensor, dilation: int, windows: Windows | None = None):
    """``neighbor_pairs`` as the entries of the per-cell mean matrix: ``(center * 27 + cell,
    neighbor)``, in the same order (the rows ascending)."""
    search = PairSearch(U, batch, dilation, windows)
    return search.finish(map_ordered(search.step, search.starts, U.device))


class PairSearch:
    """The search of one dilation in independent steps of ``centers`` centers (``starts``):
    ``finish([step(c0) for c0 in starts])`` is ``neighbor_entries``; the steps may run on
    several threads (``_threads``), even interleaved with other searches' steps."""

    def __init__(self, U: torch.Tensor, batch: torch.Tensor, dilation: int, windows: Windows | None = None):
        s = self.dilation = dilation
        dev = self.device = U.device
        M = self.M = U.shape[0]
        self.itype = torch.int32 if 27 * M < 1 << 31 else torch.int64
        self.centers = _CENTERS_CUDA if dev.type == "cuda" else _CENTERS
        self.starts = range(0, M, self.centers)
        if M == 0:
            return
        if windows is None:
            windows = Windows(U, batch, s)
        elif windows.reach < s:
            raise ValueError(f"windows reach dilation {windows.reach}, not {s}")
        self.windows = windows
        offset, slot_cell, self.slot_top, self.slot_sigma = (x.to(dev) for x in _slots(s))
        self.slot_upper_x = (self.slot_sigma >> (_SHIFTS[0] + FRAC_BITS + 1)) & 1 == 1  # s = 1: sigma_x
        # s >= 2: a slot's cell; s = 1: the index base of its cells in s1_cells (the flags pick the cell)
        self.slot_cell = slot_cell.to(self.itype if s > 1 else torch.int64)
        self.s1_cells = _s1_cells().to(dev) if s == 1 else None
        self.nslots = offset.shape[0]
        # window keys are linear in the cell: a center's anchor key plus a key offset per slot (the
        # grid has room for every offset, so no key wraps into another row)
        self.anchor_key = linearize(batch, windows.anchor - windows.lo, windows.ext)
        self.slot_key = linearize(torch.zeros_like(offset[:, 0]), offset, windows.ext)

    def step(self, c0: int) -> list:
        """The pairs of centers ``c0 .. c0 + centers``, as pieces of ``_pairs_of_rows``."""
        s, w, dev, itype = self.dilation, self.windows, self.device, self.itype
        c1 = min(self.M, c0 + self.centers)
        found = w.index.lookup((self.anchor_key[c0:c1, None] + self.slot_key).reshape(-1))
        rows = flatnonzero(found >= 0)  # (center, slot), centers ascending, slots in cell order
        win = take(found, rows)
        row_center, row_slot = rows // self.nslots + c0, rows % self.nslots
        # the x bins of the window that the cube overlaps, [lo, hi): for s >= 2 the kept cell, from
        # the center's phi bin to the bin of phi + 1 cell; for s = 1 the lower window (sigma_x = 0)
        # from phi's bin to its top, the upper one from its bottom to the bin of phi + 1 cell
        phi_bin = take(w.center_bin, row_center)
        lo, hi = phi_bin, phi_bin + (_X_BINS + 1)
        if s == 1:
            upper = take(self.slot_upper_x, row_slot)
            lo, hi = torch.where(upper, 0, lo), torch.where(upper, hi, 2 * _X_BINS)
        bins = win.long() * (2 * _X_BINS + 1)
        first, last = take(w.bin_start, bins + lo), take(w.bin_start, bins + hi)
        nonempty = flatnonzero(last > first)
        row_center, row_slot = take(row_center, nonempty), take(row_slot, nonempty)
        row_start = take(w.start, take(win, nonempty)) + take(first, nonempty)
        row_count = take(last, nonempty) - take(first, nonempty)
        row_value = take(w.center_base, row_center) + take(self.slot_top, row_slot)
        # s >= 2: the row's matrix row center * 27 + cell; s = 1: center * 64 + its index base
        row_key = (row_center.to(itype) * 27 if s > 1 else row_center * 64) + take(self.slot_cell, row_slot)
        row_sigma = take(self.slot_sigma, row_slot)
        work = torch.cumsum(row_count, 0)
        total = int(work[-1]) if work.numel() else 0
        marks = torch.arange(_CHUNK, max(total, _CHUNK), _CHUNK, device=dev, dtype=torch.int64)
        cuts = torch.searchsorted(work, marks, right=True)
        if s == 1:  # chunks of whole centers: each is then sorted by (center, cell) on its own
            cuts = torch.searchsorted(row_center, take(row_center, cuts))
        cuts = cuts.tolist()
        return [_pairs_of_rows(row_key[r0:r1], row_value[r0:r1], row_start[r0:r1], row_count[r0:r1],
                               row_sigma[r0:r1], w.entry, w.entry_point, self.s1_cells, itype)
                for r0, r1 in zip([0] + cuts, cuts + [row_center.numel()]) if r1 > r0]

    def finish(self, steps: list) -> tuple:
        """``(center * 27 + cell, neighbor)`` of every step's pieces, in step order."""
        pieces = [piece for step in steps for piece in step]
        if not pieces:
            empty = torch.zeros(0, dtype=self.itype, device=self.device)
            return empty, empty
        return tuple(torch.cat(x) for x in zip(*pieces))


def _pairs_of_rows(key, value, start, count, sigma, entry, entry_point, s1_cells, itype):
    """The kept pairs of rows (one center, one window; per row ``center * 27 + cell`` (s >= 2) or
    ``center * 64 +`` an index base into ``s1_cells`` (s = 1, ``s1_cells`` given), packed ``2^20 +
    2 phi - 1 + t``, window entries ``start`` and ``count``, sigma bits): every candidate is tested
    by one subtraction of packed offsets. Returns (center * 27 + cell, neighbor) as ``itype``, in
    row order and the window's order; for s = 1 sorted by (center, cell) (the rows must hold whole
    centers)."""
    dev = count.device
    ends = torch.cumsum(count, 0)
    num = int(ends[-1])
    firsts = ends - count  # each row's first candidate (every window holds a point: all distinct)
    # per candidate its row and its entry, both running sums (cheaper than gathers per candidate):
    # the row steps by one at each row's first candidate, the entry by one within a row and jumps
    # to the row's window at its first candidate; int32 where it fits, which gathers faster
    etype = torch.int32 if entry.numel() < 1 << 31 else torch.int64
    row_step = torch.zeros(num, dtype=torch.int32, device=dev).index_fill_(0, firsts[1:], 1)
    cand_row = torch.cumsum(row_step, 0, dtype=torch.int32)
    entry_step = start.clone()
    entry_step[1:] -= start[:-1] + count[:-1] - 1
    entry_steps = torch.ones(num, dtype=etype, device=dev).index_copy_(0, firsts, entry_step.to(etype))
    cand_entry = torch.cumsum(entry_steps, 0, dtype=etype)
    e = entry.index_select(0, cand_entry)
    if s1_cells is None:
        # every axis's flag must equal its b: V - e (b in e's guard bits) has no guard bit set
        # exactly then (see the module docstring)
        mismatch = (value.index_select(0, cand_row) - e) & _GUARDS
    else:
        # the guard bits of x hold the flags, those of e the corner b: they differ in (x ^ e) &
        # guards, tested only on the axes with b == sigma (the outer cells of the 4 x 4 x 4 block)
        x = value.index_select(0, cand_row) - (e & ~_GUARDS)
        differ = (x ^ e) & _GUARDS
        mismatch = differ & ~(e ^ sigma.index_select(0, cand_row))
    kept = flatnonzero(mismatch == 0)
    rows = cand_row.index_select(0, kept)
    neighbor = entry_point.index_select(0, cand_entry.index_select(0, kept)).to(itype)
    if s1_cells is None:
        return key.index_select(0, rows), neighbor
    # s = 1: key holds center * 64 + base; the flags pick the cell s1_cells[base + guard code]
    base = key.index_select(0, rows)
    center = base >> 6
    cell = s1_cells.index_select(0, (base & 63) + _guard_code(differ.index_select(0, kept)))
    # the flags spread a window over cells: a stable sort by (center, cell), on small int32 keys
    first = center[0] * 27
    local, order = torch.sort((center * 27 - first).to(torch.int32) + cell.to(torch.int32), stable=True)
    return (local + first).to(itype), neighbor.index_select(0, order)


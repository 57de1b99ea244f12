"""Pointwise convolution (Hua, Tran, Yeung, CVPR 2018) with a-trous dilation, as in the authors' code.

Semantics (DESIGN.md 5.2), per center point i, cell size ``vs``, dilation ``s``:
``F = 2s + 1``; ``lo = x_i - F * vs / 2``, ``hi = x_i + F * vs / 2`` per axis; a point j (the center
included) is a neighbor when ``lo <= x_j <= hi`` on all three axes (closed cube). Its cell index
per axis is ``c = min(F - 1, floor((x_j - lo) / vs))``; ``c % s != 0`` is a hole (ignored), else the
cell is ``c // s`` in {0, 1, 2}. ``out_i[o] = sum_cells sum_cin W[o, cin, cx, cy, cz] * mean_{j in cell} f_j[cin]``;
empty cells add nothing. Coordinates are not differentiated; features and weights are, to any order.

Every path snaps coordinates to 2^-19 of a cell and evaluates these rules exactly in integers
(``_pointwise_pairs``), so all agree bit for bit on which neighbor falls in which cell; the literal
float loops (``pointwise_reference_loops``) agree wherever no point lies within 2^-19 cells of a
border that it is not on.

Fast path: the neighbor pairs and their cells are found once per cloud (``pointwise_neighbors``,
reusable by every layer with the same cell size and dilation) and stored as sparse per-cell mean
matrices; a convolution is then a per-(center, cell) segment mean (a CSR product) and one GEMM with
inner size 27 x Cin, in row blocks (``_cell_means``). The reference evaluates the same formulas densely.
"""
from __future__ import annotations

import contextlib
import math

import torch

from .. import _checks
from .._rows import repeat_cost, sorted_row_hashes, unique_rows
from .._backend import backend_for
from .._dtypes import accumulation_dtype
from .._func_transforms import outside_func_transforms
from .._index1d import flatnonzero, take
from .._matmul_precision import no_autocast
from .._threads import imap_ordered
from .._weighted_sum import gather_sum, scatter_sum
from ._cell_means import CellMeans, pointwise_linear, weight_matrix
from .._graph_zeros import zeros_like_graph
from ._pointwise_pairs import PairSearch, Windows, cell_of, quantize


class PointwiseNeighbors:
    """The kept pairs (center i, neighbor j, cell c) over the flattened valid points ``b * N + i``,
    as two ``CellMeans`` matrices with weights ``1 / count(i, c)`` (the mean's denominator):
    ``gather`` (row ``i * 27 + c``, column j) computes the per-cell means of the forward,
    ``scatter`` (row ``j * 27 + c``, column i) those of its adjoint (the feature gradient). The
    scatter matrix is built on first use: a layer whose input needs no gradient never builds it.

    It keeps what it was built for: ``lengths (B,)`` and a copy of the valid points ``(B, N, 3)``
    (padding zeroed), so ``pointwise_conv`` can tell that it is given the structure of other
    points (an O(N) comparison; the structure itself holds about 27 pairs per point).

    ``groups``: None, or ``SnappedGroups`` when many points share their (snapped) coordinates: then
    the matrices are over the groups (``gather.num_rows`` of them), each column standing for all
    the points of its group (entries ``1 / count`` with ``count`` the points in the cell, so that
    the group sums of the features give the means), and every point takes its group's output.
    ``num_rows``: the flattened padded points ``B * N`` either way."""

    def __init__(self, gather: CellMeans, gather_rows: torch.Tensor, cell_size: float, dilation: int,
                 points: torch.Tensor | None = None, lengths: torch.Tensor | None = None,
                 groups: "SnappedGroups | None" = None):
        self.gather = gather
        self.groups = groups
        self.num_rows = gather.num_rows if groups is None else groups.num_rows
        self.cell_size = cell_size
        self.dilation = dilation
        self.points, self.lengths = points, lengths
        self._gather_rows = gather_rows  # per gather entry its row i * 27 + c, until scatter is built
        self._scatter = None

    @property
    def num_pairs(self) -> int:
        return self.gather.nnz

    @property
    @outside_func_transforms  # (built on first use: not as the transforms' wrappers)
    def scatter(self) -> CellMeans:
        if self._scatter is None:
            rows = self._gather_rows
            centers, cells = rows // 27, rows % 27
            # gather's entries are in center order, so a stable sort by scatter row keeps the centers
            # ascending within each row
            scatter_rows, order = torch.sort(self.gather.col * 27 + cells, stable=True)
            self._scatter = CellMeans.from_sorted(scatter_rows, take(centers, order), self.gather.num_rows,
                                                  take(self.gather.count, order))
            self._gather_rows = None
        return self._scatter

    def built_for(self, points: torch.Tensor, lengths: torch.Tensor) -> bool:
        """Whether these are the clouds (points and lengths) the structure was built for."""
        if self.points is None:  # built by hand: nothing to compare
            return True
        if self.points.shape != points.shape or self.points.device != points.device:
            return False
        return torch.equal(self.lengths, lengths) and torch.equal(self.points, _valid_points(points, lengths))


# Group the points by snapped coordinates when the runs of equal ones, summed as length^2, pass
# this many per point: each of L copies pairs with all L in its center cell (L^2 pairs; 20,000
# copies of one point took more than 12 GB and 30 s to enumerate), where a cloud has about 20
# pairs per point and dilation.
_COSTLY_REPEATS = 32


class SnappedGroups:
    """The valid points grouped by (cloud, snapped coordinates): ``of_row (R,)`` each flattened
    padded point's group (0 for padding, which is masked), ``members`` the valid rows, ``of_member``
    their groups, ``size (G,)`` the points per group, ``num_rows`` R."""

    def __init__(self, of_row, members, of_member, size, num_rows: int):
        self.of_row, self.members, self.of_member, self.size, self.num_rows = of_row, members, of_member, size, num_rows

    @staticmethod
    def find(quantized: torch.Tensor, batch: torch.Tensor, rows: torch.Tensor | None, num_rows: int):
        """The groups of the valid points ``quantized (V, 3)`` of clouds ``batch``, if costly
        repeats make them pay, with the groups' coordinates and clouds: ``(groups, U, batch)``;
        else ``(None, quantized, batch)``. ``rows``: each valid point's flattened row (None: all)."""
        keyed = torch.cat([batch[:, None], quantized], 1)
        if repeat_cost(sorted_row_hashes(keyed)[0], 1) <= _COSTLY_REPEATS * len(keyed):
            return None, quantized, batch
        unique, of_member, size = unique_rows(keyed)
        members = torch.arange(len(keyed), device=keyed.device) if rows is None else rows
        of_row = torch.zeros(num_rows, dtype=torch.int64, device=keyed.device)
        of_row[members] = of_member
        return SnappedGroups(of_row, members, of_member, size, num_rows), unique[:, 1:].contiguous(), unique[:, 0]

    # sums and spread are each other's adjoints, written as _weighted_sum's ops (not index_add /
    # index_select, whose CUDA sums over repeated rows are atomics: a different rounding each run)
    # so that every order of derivative is deterministic on the triton backend too

    def sums(self, f: torch.Tensor) -> torch.Tensor:
        """``(G, C)``: each group's sum of the rows of ``f (R, C)`` (differentiable to any order)."""
        members = f.index_select(0, self.members)  # distinct rows: its adjoint adds no two together
        ones = torch.ones((len(members), 1), dtype=f.dtype, device=f.device)
        return scatter_sum(ones, members, self.of_member[:, None], len(self.size))

    def spread(self, x: torch.Tensor) -> torch.Tensor:
        """``(R, C)``: each row's group's row of ``x (G, C)`` (differentiable to any order)."""
        ones = torch.ones((self.num_rows, 1), dtype=x.dtype, device=x.device)
        return gather_sum(ones, x, self.of_row[:, None])

    def entry_counts(self, rows27: torch.Tensor, neighbor: torch.Tensor) -> torch.Tensor:
        """Per entry (row ``group * 27 + cell``, column ``neighbor`` group): its mean's denominator,
        the points of all the groups in its row."""
        in_row = torch.zeros(27 * len(self.size), dtype=torch.int64, device=rows27.device)
        in_row.index_add_(0, rows27.long(), self.size.index_select(0, neighbor.long()))
        return in_row.index_select(0, rows27.long())


def _valid_points(points, lengths):
    """A detached copy of ``points`` with the padding zeroed: padded points play no part."""
    valid = torch.arange(points.shape[1], device=points.device)[None, :, None] < lengths[:, None, None]
    return torch.where(valid, points.detach(), torch.zeros((), dtype=points.dtype, device=points.device))


# Beyond any use (a cube of 2^31 cells per axis), and far from int64 overflow in the integer rule.
# The pair search's grid, which spans the points and 2 dilation + 1 cells around them, has its own
# limit (Windows: about 2^18 for a small cloud) and says so.
MAX_DILATION = 1 << 30


def _dilation(d) -> int:
    d = _checks.positive_int("dilation", d)
    if d > MAX_DILATION:
        raise ValueError(f"dilation must be <= {MAX_DILATION} (2^30), got {d}")
    return d


def _check(points, features, cell_size, dilation, lengths):
    _checks.coords("points", points, ndim=3, dim=3)
    _checks.tensor("features", features)
    if features.dim() != 3 or features.shape[:2] != points.shape[:2]:
        raise ValueError(f"features must have shape ({points.shape[0]}, {points.shape[1]}, C), got {tuple(features.shape)}")
    if not features.is_floating_point():
        raise TypeError(f"features must be floating point, got {features.dtype}")
    _checks.same_device(points=points, features=features)
    cell_size = _checks.positive_float("cell_size", cell_size)
    dilation = _dilation(dilation)
    lengths = _checks.lengths("lengths", lengths, points.shape[0], points.shape[1], points.device)
    return cell_size, dilation, lengths


def _check_weight(weight, cin, bias=None, features=None):
    _checks.tensor("weight", weight)
    if not weight.is_floating_point():
        raise TypeError(f"weight must be floating point, got {weight.dtype}")
    if weight.dim() != 5 or weight.shape[1:] != (cin, 3, 3, 3):
        raise ValueError(f"weight must have shape (C_out, {cin}, 3, 3, 3), got {tuple(weight.shape)}")
    if bias is not None:
        _checks.tensor("bias", bias)
        if not bias.is_floating_point():
            raise TypeError(f"bias must be floating point, got {bias.dtype}")
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    # the parameters in the features' dtype, or in float32 for fp16 / bf16 features (computed in
    # float32): never rounded to another dtype (autocast casts them itself)
    if features is not None and not torch.is_autocast_enabled(features.device.type):
        allowed = {features.dtype, accumulation_dtype(features.dtype)}
        for name, t in (("weight", weight), ("bias", bias)):
            if isinstance(t, torch.Tensor) and t.dtype not in allowed:
                raise TypeError(f"{name} has dtype {t.dtype} but features has dtype {features.dtype}: they must "
                                "match (or be float32 for float16 / bfloat16 features)")


@outside_func_transforms  # (the pairs are found by compactions of values)
def pointwise_neighbors(points, cell_size, dilation=1, *, lengths=None):
    """The neighbor pairs and cells of every valid point (build once, reuse across layers).

    Coordinates are snapped to 2^-19 of a cell and the rule is evaluated in integers (see
    ``_pointwise_pairs``); the search visits only the grid cells that can hold kept neighbors.

    Args:
        points: ``(B, N, 3)``; cell_size: ``vs`` (> 0); lengths: optional ``(B,)``.
        dilation: an int (>= 1), or a sequence of them: then a list with one structure per
            dilation, built from one snapping and one grid of the points (faster than one call each).

    Returns:
        a ``PointwiseNeighbors``, or a list of them (one per dilation).
    """
    _checks.coords("points", points, ndim=3, dim=3)
    cell_size = _checks.positive_float("cell_size", cell_size)
    several = isinstance(dilation, (list, tuple))
    if several and not dilation:
        raise ValueError("dilation must be an int or a non-empty sequence of ints, got an empty sequence")
    dilations = [_dilation(d) for d in (dilation if several else [dilation])]
    lengths = _checks.lengths("lengths", lengths, points.shape[0], points.shape[1], points.device)
    B, N, _ = points.shape
    R = B * N
    valid = torch.arange(N, device=points.device)[None, :] < lengths[:, None]
    rows = None if bool(valid.all()) else flatnonzero(valid.reshape(-1))  # b * N + i, by cloud
    flat = points.reshape(R, 3)
    quantized = quantize(flat if rows is None else flat[rows], cell_size)
    batch = (torch.arange(R, device=points.device) if rows is None else rows) // max(N, 1)
    groups = None
    if quantized.shape[0]:
        groups, quantized, batch = SnappedGroups.find(quantized, batch, rows, R)
    windows = Windows(quantized, batch, max(dilations)) if quantized.shape[0] else None
    # int32 indices where they fit: less memory traffic, and their sorts are faster
    itype = torch.int32 if 27 * R < 1 << 31 else torch.int64
    # the searches' steps of every dilation run ahead on the threads (_threads) while this thread
    # assembles each dilation's matrix from its steps: the assembly is mostly serial copying
    searches = [PairSearch(quantized, batch, s, windows) for s in dilations]
    tasks = [(search, c0) for search in searches for c0 in search.starts]
    structures = []
    built_for = _valid_points(points, lengths)  # one copy shared by the structures of every dilation
    # closed on the way out, errors included: it restores torch's thread count
    with contextlib.closing(imap_ordered(lambda task: task[0].step(task[1]), tasks, points.device)) as steps:
        for search in searches:
            # gather's entries (center * 27 + cell, neighbor), sorted by row; each entry's row size
            # is its mean's denominator
            rows27, neighbor = search.finish([next(steps) for _ in search.starts])
            if groups is not None:  # rows and columns are groups; a mean counts their points
                count = groups.entry_counts(rows27, neighbor)
                gather = CellMeans.from_sorted(rows27, neighbor, len(groups.size), count)
                structures.append(PointwiseNeighbors(gather, rows27, cell_size, search.dilation, built_for, lengths,
                                                     groups))
                continue
            if rows is not None:  # rows of the valid points -> rows of the padded batch
                rows27 = rows.index_select(0, rows27 // 27) * 27 + rows27 % 27
                neighbor = rows.index_select(0, neighbor)
            rows27, neighbor = rows27.to(itype), neighbor.to(itype)
            gather = CellMeans.from_sorted(rows27, neighbor, R)
            structures.append(PointwiseNeighbors(gather, rows27, cell_size, search.dilation, built_for, lengths))
    if windows is not None:
        windows.index.release()  # its table serves the next index (sparse.kernel_map)
    return structures if several else structures[0]


def pointwise_conv(points, features, weight, cell_size, dilation=1, *, lengths=None, bias=None, neighbors=None):
    """Pointwise convolution.

    Args:
        points: ``(B, N, 3)``; features: ``(B, N, C_in)``; weight: ``(C_out, C_in, 3, 3, 3)`` indexed
            ``[o, i, cx, cy, cz]`` (cx the cell along x: 0 lower, 1 center, 2 upper).
        cell_size: the cell edge ``vs`` (> 0); dilation: the a-trous stride ``s`` (>= 1).
        lengths: optional ``(B,)``: padded points are neither centers nor neighbors; their output is 0.
        bias: optional ``(C_out,)``. neighbors: a ``pointwise_neighbors`` result for these points
            and lengths (checked: a structure built for other clouds raises ValueError).

    Returns:
        ``(B, N, C_out)`` (empty when B = 0 or N = 0).
    """
    cell_size, dilation, lengths = _check(points, features, cell_size, dilation, lengths)
    B, N, cin = features.shape
    _check_weight(weight, cin, bias, features)
    if neighbors is not None:
        if not isinstance(neighbors, PointwiseNeighbors):
            raise TypeError(f"neighbors must be a PointwiseNeighbors (pointwise_neighbors), got {type(neighbors).__name__}")
        if neighbors.num_rows != B * N or neighbors.cell_size != cell_size or neighbors.dilation != dilation:
            raise ValueError("neighbors were built for other points, cell_size or dilation")
        if not neighbors.built_for(points, lengths):
            raise ValueError("neighbors were built for other points or lengths (pointwise_neighbors(points, "
                             "cell_size, dilation, lengths=lengths) builds them for these)")
    if B * N == 0:  # no points, no output rows
        return zeros_like_graph((B, N, weight.shape[0]), features.dtype, features.device, features, weight, bias)
    # computed in the features' dtype (float32 for fp16 / bf16) inside autocast regions too, forward
    # and backward (the Functions record this state); the reference's plain ops differentiate in
    # the state of whoever asks for the gradient, as torch's own do
    with no_autocast(features.device):
        if backend_for(points.device) == "reference":
            return pointwise_conv_reference(points, features, weight, cell_size, dilation, lengths=lengths, bias=bias)
        return _pointwise_conv(points, features, weight, cell_size, dilation, lengths, bias, neighbors)


def _pointwise_conv(points, features, weight, cell_size, dilation, lengths, bias, neighbors):
    B, N, cin = features.shape
    if neighbors is None:
        neighbors = pointwise_neighbors(points, cell_size, dilation, lengths=lengths)
    # the per-(point, cell) means times the weights as one (27 C_in, C_out) matrix, in row blocks;
    # half-precision features are computed in float32
    dtype = accumulation_dtype(features.dtype)
    valid = (torch.arange(N, device=points.device)[None, :] < lengths[:, None]).reshape(-1, 1)
    # padded rows zeroed: no pair reads them, but the weight gradient's products run over every row
    # (a NaN there made it NaN)
    f = features.reshape(B * N, cin).to(dtype)
    f = f if bool(valid.all()) else torch.where(valid, f, 0)
    W = weight_matrix(weight.to(dtype))
    groups = neighbors.groups
    if groups is None:
        out = pointwise_linear(f, W, neighbors)
    else:  # the group sums in, each point's group out
        out = groups.spread(pointwise_linear(groups.sums(f), W, neighbors))
    if bias is not None:
        out = out + bias.to(dtype)
    return (out * valid.to(out.dtype)).to(features.dtype).reshape(B, N, -1)


def pointwise_conv_reference(points, features, weight, cell_size, dilation=1, *, lengths=None, bias=None):
    """Dense: every (center, point) pair's cell (the integer rule of ``_pointwise_pairs``), per-cell
    means by a membership matrix. O(B N^2 27) memory: small clouds only."""
    B, N, cin = features.shape
    lengths = torch.full((B,), N, device=points.device) if lengths is None else lengths
    u = quantize(points, cell_size)
    cell = cell_of(u[:, :, None, :], u[:, None, :, :], dilation)  # (B, N, N)
    valid = torch.arange(N, device=points.device)[None, :] < lengths[:, None]
    cell = torch.where(valid[:, :, None] & valid[:, None, :], cell, -1)
    dtype = accumulation_dtype(features.dtype)
    member = (cell[..., None] == torch.arange(27, device=points.device)).to(dtype)  # (B, i, j, 27)
    count = member.sum(2)  # (B, i, 27)
    f = torch.where(valid[..., None], features.to(dtype), 0)  # (a NaN in the padding adds nothing)
    means = torch.einsum("bijc,bjf->bicf", member, f) / count.clamp(min=1)[..., None]
    W = weight.to(dtype).reshape(weight.shape[0], cin, 27)
    out = torch.einsum("bicf,ofc->bio", means, W)
    if bias is not None:
        out = out + bias.to(dtype)
    return (out * valid[..., None].to(out.dtype)).to(features.dtype)


def pointwise_reference_loops(points, features, weight, cell_size, dilation=1):
    """Literal loops over the semantics of DESIGN.md 5.2 (one cloud, all points valid): the test oracle."""
    N, cin = features.shape[1:]
    F = 2 * dilation + 1
    out = features.new_zeros((N, weight.shape[0]))
    for i in range(N):
        lo = [points[0, i, a].item() - F * cell_size / 2 for a in range(3)]
        hi = [points[0, i, a].item() + F * cell_size / 2 for a in range(3)]
        cells = {}
        for j in range(N):
            x = [points[0, j, a].item() for a in range(3)]
            if not all(lo[a] <= x[a] <= hi[a] for a in range(3)):
                continue
            c = [min(F - 1, math.floor((x[a] - lo[a]) / cell_size)) for a in range(3)]
            if any(ca % dilation for ca in c):
                continue
            cells.setdefault(tuple(ca // dilation for ca in c), []).append(j)
        for (cx, cy, cz), js in cells.items():
            mean = features[0, js].mean(0)
            out[i] += weight[:, :, cx, cy, cz] @ mean
    return out

"""Pointwise convolution (Hua, Tran, Yeung, CVPR 2018) with a-trous dilation, as in the authors' code.

Semantics (DESIGN.md 5.2), per center point i, cell size ``vs``, dilation ``s``:
``F = 2s + 1``; ``lo = x_i - F * vs / 2``, ``hi = x_i + F * vs / 2`` per axis; a point j (the center
included) is a neighbor when ``lo <= x_j <= hi`` on all three axes (closed cube). Its cell index
per axis is ``c = min(F - 1, floor((x_j - lo) / vs))``; ``c % s != 0`` is a hole (ignored), else the
cell is ``c // s`` in {0, 1, 2}. ``out_i[o] = sum_cells sum_cin W[o, cin, cx, cy, cz] * mean_{j in cell} f_j[cin]``;
empty cells add nothing. Coordinates are not differentiated; features and weights are, to any order.

Fast path: the neighbor pairs and their cells are found once per cloud (``pointwise_neighbors``,
reusable by every layer with the same cell size and dilation), then a per-(center, cell) segment
mean and one GEMM with inner size 27 x Cin. The reference evaluates the same formulas densely.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .. import _checks
from .._backend import backend_for

_CHUNK_PAIRS = 1 << 22


@dataclass
class PointwiseNeighbors:
    """Pairs (center row, neighbor row, cell 0..26) over the flattened valid points ``b * N + i``."""

    center: torch.Tensor
    neighbor: torch.Tensor
    cell: torch.Tensor
    num_rows: int
    cell_size: float
    dilation: int


def _cells(xi, xj, vs, s):
    """Cell id 0..26 of neighbor xj around center xi (..., 3), -1 outside the cube or in a hole.

    The one formula every path evaluates (in the coordinates' dtype)."""
    F = 2 * s + 1
    half = F * vs / 2
    lo = xi - half
    hi = xi + half
    inside = ((lo <= xj) & (xj <= hi)).all(-1)
    c = torch.clamp(torch.floor((xj - lo) / vs), max=F - 1).long()
    ok = inside & (c % s == 0).all(-1)
    c = c // s
    cell = (c[..., 0] * 3 + c[..., 1]) * 3 + c[..., 2]
    return torch.where(ok, cell, -1)


def _check(points, features, cell_size, dilation, lengths):
    _checks.coords("points", points, ndim=3, dim=3)
    _checks.tensor("features", features)
    if features.dim() != 3 or features.shape[:2] != points.shape[:2]:
        raise ValueError(f"features must have shape ({points.shape[0]}, {points.shape[1]}, C), got {tuple(features.shape)}")
    if not features.is_floating_point():
        raise TypeError(f"features must be floating point, got {features.dtype}")
    _checks.same_device(points=points, features=features)
    cell_size = _checks.positive_float("cell_size", cell_size)
    dilation = _checks.positive_int("dilation", dilation)
    lengths = _checks.lengths("lengths", lengths, points.shape[0], points.shape[1], points.device)
    return cell_size, dilation, lengths


def _check_weight(weight, cin):
    _checks.tensor("weight", weight)
    if weight.dim() != 5 or weight.shape[1:] != (cin, 3, 3, 3):
        raise ValueError(f"weight must have shape (C_out, {cin}, 3, 3, 3), got {tuple(weight.shape)}")


def pointwise_neighbors(points, cell_size, dilation=1, *, lengths=None) -> PointwiseNeighbors:
    """The neighbor pairs and cells of every valid point (build once, reuse across layers)."""
    _checks.coords("points", points, ndim=3, dim=3)
    cell_size = _checks.positive_float("cell_size", cell_size)
    dilation = _checks.positive_int("dilation", dilation)
    lengths = _checks.lengths("lengths", lengths, points.shape[0], points.shape[1], points.device)
    B, N, _ = points.shape
    pts = points.detach()
    half = (2 * dilation + 1) * cell_size / 2
    centers, nbrs, cells = [], [], []
    for b, n in enumerate(lengths.tolist()):
        if n == 0:
            continue
        x = pts[b, :n]
        if x.device.type == "cpu" and backend_for(x.device) != "reference":
            from scipy.spatial import cKDTree

            # candidates in a slightly larger Chebyshev ball, then the exact closed-cube test
            tree = cKDTree(x.double().numpy())
            lists = tree.query_ball_point(x.double().numpy(), half * (1 + 1e-6) + 1e-12, p=np.inf)
            lens = torch.tensor([len(li) for li in lists])
            ci = torch.repeat_interleave(torch.arange(n), lens)
            cj = torch.from_numpy(np.concatenate([np.asarray(li, dtype=np.int64) for li in lists]))
        else:  # dense chunks of centers: exact by construction
            step = max(1, _CHUNK_PAIRS // max(n, 1))
            ci_list, cj_list = [], []
            for s0 in range(0, n, step):
                block = (x[s0:s0 + step, None, :] - x[None, :, :]).abs().amax(-1) <= half * (1 + 1e-6) + 1e-12
                i, j = torch.nonzero(block, as_tuple=True)
                ci_list.append(i + s0)
                cj_list.append(j)
            ci, cj = torch.cat(ci_list), torch.cat(cj_list)
        cell = _cells(x[ci], x[cj], cell_size, dilation)
        keep = cell >= 0
        centers.append(ci[keep].to(pts.device) + b * N)
        nbrs.append(cj[keep].to(pts.device) + b * N)
        cells.append(cell[keep].to(pts.device))
    empty = torch.zeros(0, dtype=torch.int64, device=pts.device)
    cat = (lambda xs: torch.cat(xs) if xs else empty)
    return PointwiseNeighbors(cat(centers), cat(nbrs), cat(cells), B * N, cell_size, dilation)


def pointwise_conv(points, features, weight, cell_size, dilation=1, *, lengths=None, bias=None, neighbors=None):
    """Pointwise convolution.

    Args:
        points: ``(B, N, 3)``; features: ``(B, N, C_in)``; weight: ``(C_out, C_in, 3, 3, 3)`` indexed
            ``[o, i, cx, cy, cz]`` (cx the cell along x: 0 lower, 1 center, 2 upper).
        cell_size: the cell edge ``vs`` (> 0); dilation: the a-trous stride ``s`` (>= 1).
        lengths: optional ``(B,)``: padded points are neither centers nor neighbors; their output is 0.
        bias: optional ``(C_out,)``. neighbors: a ``pointwise_neighbors`` result for these points.

    Returns:
        ``(B, N, C_out)``.
    """
    cell_size, dilation, lengths = _check(points, features, cell_size, dilation, lengths)
    B, N, cin = features.shape
    _check_weight(weight, cin)
    if backend_for(points.device) == "reference":
        return pointwise_conv_reference(points, features, weight, cell_size, dilation, lengths=lengths, bias=bias)
    if neighbors is None:
        neighbors = pointwise_neighbors(points, cell_size, dilation, lengths=lengths)
    elif neighbors.num_rows != B * N or neighbors.cell_size != cell_size or neighbors.dilation != dilation:
        raise ValueError("neighbors were built for other points, cell_size or dilation")
    f = features.reshape(B * N, cin)
    seg = neighbors.center * 27 + neighbors.cell
    count = torch.bincount(seg, minlength=B * N * 27).to(f.dtype)
    sums = f.new_zeros((B * N * 27, cin))
    src = f.index_select(0, neighbors.neighbor)
    if sums.device.type == "cpu":
        sums = sums.index_add(0, seg, src)
    else:
        sums = sums.index_put((seg,), src, accumulate=True)
    means = sums / count.clamp(min=1)[:, None]  # empty cells: 0, add nothing
    cout = weight.shape[0]
    w = weight.permute(2, 3, 4, 1, 0).reshape(27 * cin, cout)  # rows ordered (cx, cy, cz, cin)
    out = means.reshape(B * N, 27 * cin) @ w.to(f.dtype)
    if bias is not None:
        out = out + bias
    valid = (torch.arange(N, device=points.device)[None, :] < lengths[:, None]).reshape(-1, 1)
    return (out * valid.to(out.dtype)).reshape(B, N, cout)


def pointwise_conv_reference(points, features, weight, cell_size, dilation=1, *, lengths=None, bias=None):
    """Dense: every (center, point) pair's cell, per-cell means by a membership matrix. O(B N^2 27)."""
    B, N, cin = features.shape
    lengths = torch.full((B,), N, device=points.device) if lengths is None else lengths
    pts = points.detach()
    cell = _cells(pts[:, :, None, :], pts[:, None, :, :], cell_size, dilation)  # (B, N, N)
    valid = torch.arange(N, device=points.device)[None, :] < lengths[:, None]
    cell = torch.where(valid[:, :, None] & valid[:, None, :], cell, -1)
    member = (cell[..., None] == torch.arange(27, device=points.device)).to(features.dtype)  # (B, i, j, 27)
    count = member.sum(2)  # (B, i, 27)
    means = torch.einsum("bijc,bjf->bicf", member, features) / count.clamp(min=1)[..., None]
    W = weight.reshape(weight.shape[0], cin, 27)
    out = torch.einsum("bicf,ofc->bio", means, W)
    if bias is not None:
        out = out + bias
    return out * valid[..., None].to(out.dtype)


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

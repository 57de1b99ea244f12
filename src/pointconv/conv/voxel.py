"""Glue between points and sparse voxels: ``voxelize`` and ``devoxelize`` (PVCNN / SPVCNN fusion).

Grid: voxel ``c = floor((p - origin) / voxel_size)`` per axis, coordinates in the points' axis
order (x, y, z), sites ``[batch, cx, cy, cz]`` sorted by (batch, coordinates). ``origin`` defaults
to the grid-aligned minimum of the valid points, so every coordinate is >= 0; ``voxelize`` stores it
(``tensor.voxel_origin``, ``tensor.voxel_size``) and ``devoxelize`` reads it back by default.
"""
from __future__ import annotations

import itertools
import math

import torch

from .. import _checks
from .._graph_zeros import zeros_like_graph
from .._row_sums import add_rows, max_rows
from ..sparse.kernel_map import SiteIndex, check_key_space, linearize
from ..sparse.tensor import SparseConvTensor
from . import _inputs

_MAX_COORD = (1 << 31) - 2  # sites are int32, and so must be the spatial shape (coordinate + 1)


def _origin(points, valid, voxel_size, origin):
    if origin is not None:
        return _inputs.origin(origin, points)
    if not bool(valid.any()):
        return points.new_zeros(points.shape[-1])
    lo = torch.where(valid[..., None], points, torch.full_like(points, float("inf"))).amin((0, 1))
    o = torch.floor(lo / voxel_size) * voxel_size
    # lo / voxel_size can round up to a whole number (0.9 / 0.1 in float32), putting the origin just
    # above lo: one voxel lower then, so that floor((lo - o) / voxel_size) >= 0 as computed later;
    # and never above lo (far from 0, o - voxel_size can round back to o: 1e6 + 0.5 in float32
    # with voxels of 0.01)
    o = torch.where(torch.floor((lo - o) / voxel_size) < 0, o - voxel_size, o)
    return torch.minimum(o, lo)


def _voxel_size(voxel_size, points) -> float:
    """A positive voxel size that the points' dtype holds as a normal number (else the default origin
    would be NaN and the voxel coordinates meaningless)."""
    voxel_size = _checks.positive_float("voxel_size", voxel_size)
    info = torch.finfo(points.dtype)
    if not info.smallest_normal <= voxel_size <= info.max:
        raise ValueError(f"voxel_size = {voxel_size:g} is not a normal {points.dtype} number (the points' dtype): "
                         f"it must lie in [{info.smallest_normal:g}, {info.max:g}] (or use float64 points)")
    return voxel_size


def voxelize(points, features, voxel_size, *, lengths=None, origin=None, reduce="mean"):
    """Average (or sum, or max) the features of the points in each occupied voxel (sums and means
    are summed in float64 and rounded once to the features' dtype).

    Args:
        points: ``(B, N, 3)``; features: ``(B, N, C)``; voxel_size: edge length (> 0, a normal
            number of the points' dtype).
        lengths: optional ``(B,)``; origin: optional grid origin (3,); reduce: "mean", "sum" or "max".
        Every voxel coordinate must lie in [0, 2^31 - 2] (int32 sites): ValueError otherwise.

    Returns:
        ``(tensor, point_voxel)``: a ``pointconv.sparse.SparseConvTensor`` (int32 sites
        ``[b, cx, cy, cz]``, sorted) and ``point_voxel (B, N)`` int64, each point's row in
        ``tensor.features`` (-1 for padded points). Differentiable w.r.t. features (to any order
        for mean and sum; max sends the gradient to the arg-max, split evenly
        between exact ties, as the sparse max pool does).
    """
    _checks.coords("points", points, ndim=3, dim=3)
    _checks.tensor("features", features)
    if not features.is_floating_point():
        raise TypeError(f"features must be a floating-point tensor, got dtype {features.dtype}")
    if features.dim() != 3 or features.shape[:2] != points.shape[:2]:
        raise ValueError(f"features must have shape ({points.shape[0]}, {points.shape[1]}, C), got shape "
                         f"{tuple(features.shape)}")
    voxel_size = _voxel_size(voxel_size, points)
    if reduce not in ("mean", "sum", "max"):
        raise ValueError(f"reduce must be 'mean', 'sum' or 'max', got {reduce!r}")
    B, N, C = features.shape
    lengths = _checks.lengths("lengths", lengths, B, N, points.device)
    valid = torch.arange(N, device=points.device)[None, :] < lengths[:, None]
    o = _origin(points.detach(), valid, voxel_size, origin)
    u = torch.floor((points.detach() - o) / voxel_size)[valid]
    # tested before any cast (an int64 or int32 cast of a larger value wraps), and before the sign:
    # a too small voxel_size can also make the default origin overshoot
    if u.numel() and not float(u.abs().max()) <= _MAX_COORD:
        raise ValueError(f"voxel coordinates (points - origin) / voxel_size must lie in [0, {_MAX_COORD}] (int32 "
                         f"sites), got magnitudes up to {float(u.abs().max()):.4g}: voxel_size = {voxel_size:g} is "
                         "too small for the points' extent, or origin too far from them")
    if bool((u < 0).any()):
        raise ValueError("origin must not exceed any valid point's coordinates (voxel coordinates must be >= 0)")
    bid, pid = torch.nonzero(valid, as_tuple=True)
    keys = torch.cat([bid[:, None], u.long()], 1)
    sites, inverse = torch.unique(keys, dim=0, return_inverse=True)
    f = features[bid, pid]
    M = sites.shape[0]
    if reduce == "max":
        out = max_rows(M, inverse, f)
    else:
        # summed in float64: a float32 (let alone fp16) sum of many rows drifts (the mean of 200K
        # values near 1000 came out 2.2 off in float32), and fp16 overflows past 65504
        out = add_rows(f.new_zeros((M, C), dtype=torch.float64), inverse, f.double())
        if reduce == "mean":
            out = out / torch.bincount(inverse, minlength=M).clamp(min=1)[:, None].double()
        out = out.to(f.dtype)
    shape = [int(s) + 1 for s in sites[:, 1:].amax(0).tolist()] if M else [1, 1, 1]
    check_key_space(max(B, 1), shape, "the voxels (voxel_size too small for the points' extent?)")
    # a SparseConvTensor has batch_size >= 1: B = 0 gives an empty tensor of batch 1, which
    # devoxelize accepts for an empty batch of points
    tensor = SparseConvTensor(out, sites.to(torch.int32).contiguous(), shape, max(B, 1))
    tensor.voxel_origin, tensor.voxel_size = o, voxel_size
    point_voxel = torch.full((B, N), -1, dtype=torch.int64, device=points.device)
    point_voxel[bid, pid] = inverse
    return tensor, point_voxel


def devoxelize(x: SparseConvTensor, points, voxel_size=None, *, origin=None, lengths=None, mode="trilinear"):
    """Per-point features ``(B, N, C)`` read from the active voxels of ``x``.

    ``mode="nearest"``: the voxel containing the point (zeros if it is inactive).
    ``mode="trilinear"``: the 8 voxel centers around the point, weighted trilinearly and
    renormalized over the ACTIVE ones (zeros if none is active); differentiable w.r.t. the
    features and the points. ``voxel_size`` / ``origin`` default to the ones ``voxelize`` stored.
    ``points`` must have ``x.batch_size`` clouds; an empty batch (B = 0, as ``voxelize`` of B = 0
    gives a tensor of batch 1 without sites) is accepted when ``x`` has no sites. The result has
    the features' dtype in both modes (trilinear weights are computed in the points' precision).
    """
    if not isinstance(x, SparseConvTensor):
        raise TypeError(f"x must be a SparseConvTensor, got {type(x).__name__}")
    _checks.coords("points", points, ndim=3, dim=3)
    if x.ndim != 3:
        raise ValueError(f"x must be a 3-D sparse tensor, got {x.ndim} spatial dimensions")
    if voxel_size is None:
        voxel_size = getattr(x, "voxel_size", None)
        if voxel_size is None:
            raise ValueError("voxel_size is needed: x was not made by pointconv.voxelize")
    voxel_size = _voxel_size(voxel_size, points)
    if origin is None:
        origin = getattr(x, "voxel_origin", None)
    o = torch.zeros(3, dtype=points.dtype, device=points.device) if origin is None else \
        _inputs.origin(origin, points)
    if mode not in ("trilinear", "nearest"):
        raise ValueError(f"mode must be 'trilinear' or 'nearest', got {mode!r}")
    B, N, _ = points.shape
    empty = x.indices.shape[0] == 0
    if B != x.batch_size and not (B == 0 and empty):
        raise ValueError(f"points has batch size {B} but x has {x.batch_size}")
    lengths = _checks.lengths("lengths", lengths, B, N, points.device)
    check_key_space(x.batch_size, x.spatial_shape)
    if empty or B * N == 0:  # nothing to read: zeros (and zero gradients)
        return zeros_like_graph((B, N, x.features.shape[1]), x.features.dtype, points.device, x.features, points)
    valid = torch.arange(N, device=points.device)[None, :] < lengths[:, None]
    shape = torch.tensor(x.spatial_shape, device=points.device)
    sites = SiteIndex(x.indices, x.spatial_shape, x.batch_size)  # released at the end (table reuse)
    try:
        batch = torch.arange(B, device=points.device)[:, None].expand(B, N)
        u = (points - o) / voxel_size
        feats = x.features
        C = feats.shape[1]

        def lookup(c):  # rows of voxels c (B, N, 3), -1 if inactive or outside
            inside = ((c >= 0) & (c < shape)).all(-1) & valid
            return sites.lookup(linearize(batch, c.clamp(min=0), x.spatial_shape), inside)

        def read(rows):
            got = feats.index_select(0, rows.clamp(min=0).reshape(-1)).reshape(B, N, C)
            # filled, not multiplied: 0 * an inf / NaN in row 0 (the clamped stand-in) is NaN
            return got.masked_fill((rows < 0)[..., None], 0)

        if mode == "nearest":
            # clamped before the cast (far points would wrap); -1 and 2^31 are outside every grid
            return read(lookup(torch.floor(u.detach()).clamp(-1, 1 << 31).long()))
        t = u - 0.5  # voxel centers sit at integer t
        base = torch.floor(t.detach())
        frac = t - base
        base = base.clamp(-2, 1 << 31).long()
        out, total = 0, 0
        for corner in itertools.product((0, 1), repeat=3):
            off = torch.tensor(corner, device=points.device)
            rows = lookup(base + off)
            w = math.prod(frac[..., a] if corner[a] else 1 - frac[..., a] for a in range(3))
            w = w * (rows >= 0).to(w.dtype)
            out = out + w[..., None] * read(rows)
            total = total + w
        # weighted in the points' precision (fp16 / bf16 features upcast), returned in the features' dtype as
        # mode="nearest" returns them
        return torch.where(total[..., None] > 0, out / torch.where(total > 0, total, 1)[..., None], 0).to(feats.dtype)
    finally:
        sites.release()


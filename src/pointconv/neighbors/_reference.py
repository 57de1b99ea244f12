"""Plain PyTorch reference of the neighbor search: dense distances, a stable sort, a slice.

Short and obviously right; O(B * Q * P) memory. Every fast path is tested against it.
"""
from __future__ import annotations

import torch

from ._distance import sq_dist


def search_reference(query, points, k, *, radius2=None, query_lengths, points_lengths, exclude_self=False):
    """Exact search on padded clouds; returns ``(dists, idx)`` of shape ``(B, Q, k)``.

    ``dists`` are SQUARED distances, ascending, ties broken by the lower index; slots with no
    neighbor hold ``inf`` and ``-1``. ``radius2`` (squared radius) keeps points with ``d <= radius2``.
    """
    B, Q, _ = query.shape
    P = points.shape[1]
    d = sq_dist(query[:, :, None, :], points[:, None, :, :])  # (B, Q, P)
    ar_p = torch.arange(P, device=query.device)
    ar_q = torch.arange(Q, device=query.device)
    invalid = ar_p[None, None, :] >= points_lengths[:, None, None]
    invalid = invalid | (ar_q[None, :, None] >= query_lengths[:, None, None])
    if exclude_self:
        invalid = invalid | (ar_q[:, None] == ar_p[None, :])[None]
    if radius2 is not None:
        invalid = invalid | (d > radius2)
    d = d.masked_fill(invalid, float("inf"))
    # A stable sort of rows whose columns are in index order: ties keep the lower index first.
    d_sorted, order = torch.sort(d, dim=-1, stable=True)
    dists = torch.full((B, Q, k), float("inf"), dtype=query.dtype, device=query.device)
    idx = torch.full((B, Q, k), -1, dtype=torch.int64, device=query.device)
    m = min(k, P)
    dists[..., :m] = d_sorted[..., :m]
    idx[..., :m] = torch.where(torch.isinf(d_sorted[..., :m]), -1, order[..., :m])
    return dists, idx

"""Packed clouds ``(N, D)`` with a sorted int64 batch vector, and their padded form.

The packed searches convert to padded clouds, search, and map the indices back into the packed
points: the same results as the padded form by construction.
"""
from __future__ import annotations

import torch

from .. import _checks
from ._common import KNN
from .ball_query import ball_query
from .knn import knn

__all__ = ["packed_to_padded", "knn_packed", "ball_query_packed"]


def packed_to_padded(x: torch.Tensor, batch: torch.Tensor, num_batches: int):
    """``(N, D)`` packed rows -> ``(B, Nmax, D)`` zero-padded, lengths ``(B,)``, row offsets ``(B,)``.

    Differentiable w.r.t. ``x``. ``batch`` must be sorted (validated by the callers).
    """
    counts = torch.bincount(batch, minlength=num_batches)
    offsets = torch.cumsum(counts, 0) - counts
    nmax = int(counts.max()) if num_batches else 0
    pos = torch.arange(x.shape[0], device=x.device) - offsets[batch]
    padded = x.new_zeros((num_batches, nmax, x.shape[1]))
    padded = padded.index_put((batch, pos), x)
    return padded, counts, offsets, pos


def _check_packed(query, points, query_batch, points_batch, exclude_self):
    _checks.coords("points", points, ndim=2)
    _checks.coords("query", query, ndim=2)
    _checks.same_device(points=points, query=query)
    _checks.same_dtype(points=points, query=query)
    if query.shape[1] != points.shape[1]:
        raise ValueError(f"query has D = {query.shape[1]} but points has D = {points.shape[1]}")
    _checks.batch_vector("query_batch", query_batch, query.shape[0], query.device)
    _checks.batch_vector("points_batch", points_batch, points.shape[0], points.device)
    if exclude_self and (query.shape[0] != points.shape[0] or not torch.equal(query_batch, points_batch)):
        raise ValueError("exclude_self=True needs query and points to be the same packed cloud "
                         "(same length and equal query_batch and points_batch)")
    nb = 0
    for b in (query_batch, points_batch):
        if b.numel():
            nb = max(nb, int(b[-1]) + 1)
    return nb


def _packed_search(fn, query, points, query_batch, points_batch, exclude_self, *args):
    nb = _check_packed(query, points, query_batch, points_batch, exclude_self)
    qpad, qlen, _, qpos = packed_to_padded(query, query_batch, nb)
    ppad, plen, poff, _ = packed_to_padded(points, points_batch, nb)
    res = fn(qpad, ppad, *args, query_lengths=qlen, points_lengths=plen, exclude_self=exclude_self)
    dists = res.dists[query_batch, qpos]
    idx = res.idx[query_batch, qpos]
    idx = torch.where(idx >= 0, idx + poff[query_batch, None], -1)
    return KNN(dists, idx)


def knn_packed(query: torch.Tensor, points: torch.Tensor, k: int, *, query_batch: torch.Tensor,
               points_batch: torch.Tensor, exclude_self: bool = False) -> KNN:
    """kNN of packed clouds: ``query (Nq, D)``, ``points (Np, D)``, sorted int64 batch vectors.

    Returns ``KNN(dists (Nq, k), idx (Nq, k))``: SQUARED distances ascending, int64 indices into the
    packed ``points`` (``-1`` / ``inf`` where missing). Queries only see points of their own cloud.
    """
    k = _checks.positive_int("k", k)
    return _packed_search(knn, query, points, query_batch, points_batch, exclude_self, k)


def ball_query_packed(query: torch.Tensor, points: torch.Tensor, radius: float, k: int, *,
                      query_batch: torch.Tensor, points_batch: torch.Tensor,
                      exclude_self: bool = False) -> KNN:
    """Ball query of packed clouds; arguments and outputs as in :func:`knn_packed`."""
    radius = _checks.positive_float("radius", radius)
    k = _checks.positive_int("k", k)
    return _packed_search(ball_query, query, points, query_batch, points_batch, exclude_self, radius, k)

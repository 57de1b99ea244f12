"""Ball query: the k NEAREST points within a radius (not the first k found)."""
from __future__ import annotations

import torch

from .. import _checks
from ._common import KNN, check_search, differentiable_dists
from ._distance import radius_squared
from ._reference import search_reference
from ._search import search

__all__ = ["ball_query", "ball_query_reference"]


def ball_query(query: torch.Tensor, points: torch.Tensor, radius: float, k: int, *, query_lengths=None,
               points_lengths=None, exclude_self: bool = False) -> KNN:
    """The ``k`` nearest points within ``radius`` of each query (closed ball: ``d <= radius**2``).

    Arguments and outputs as in :func:`pointconv.knn`; slots beyond the points found inside the
    ball hold ``idx = -1`` and ``dists = inf``. ``dists`` are SQUARED distances, ascending.
    ``radius**2`` is rounded to the coordinates' dtype before the comparison.
    """
    query_lengths, points_lengths = check_search(query, points, query_lengths=query_lengths,
                                                 points_lengths=points_lengths, exclude_self=exclude_self)
    radius = _checks.positive_float("radius", radius)
    k = _checks.positive_int("k", k)
    dists, idx = search(query, points, k, radius2=radius_squared(radius, query.dtype),
                        query_lengths=query_lengths, points_lengths=points_lengths, exclude_self=exclude_self)
    return KNN(differentiable_dists(dists, idx, query, points), idx)


def ball_query_reference(query, points, radius, k, *, query_lengths=None, points_lengths=None,
                         exclude_self=False) -> KNN:
    """Dense plain-PyTorch ball query: the oracle the fast paths are tested against."""
    B, Q, _ = query.shape
    ql = torch.full((B,), Q, device=query.device) if query_lengths is None else query_lengths
    pl = torch.full((B,), points.shape[1], device=query.device) if points_lengths is None else points_lengths
    return KNN(*search_reference(query, points, k, radius2=radius_squared(radius, query.dtype),
                                 query_lengths=ql, points_lengths=pl, exclude_self=exclude_self))

"""k-nearest-neighbor search on padded clouds."""
from __future__ import annotations

import torch

from .. import _checks
from ._common import KNN, check_search, differentiable_dists
from ._reference import search_reference
from ._search import search

__all__ = ["KNN", "knn", "knn_reference"]


def knn(query: torch.Tensor, points: torch.Tensor, k: int, *, query_lengths=None, points_lengths=None,
        exclude_self: bool = False) -> KNN:
    """The ``k`` nearest points of each query, exactly.

    Args:
        query: ``(B, Q, D)`` float32/float64 query coordinates.
        points: ``(B, P, D)`` coordinates searched (same dtype and device).
        k: number of neighbors, ``>= 1``; may exceed the number of points (extra slots are padded).
        query_lengths, points_lengths: optional ``(B,)`` int lengths of ragged clouds; entries beyond
            them are ignored (padded queries get no neighbors).
        exclude_self: ``query`` and ``points`` are the same cloud; drop the point ``j == i`` of query ``i``.

    Returns:
        ``KNN(dists, idx)``: ``dists (B, Q, k)`` SQUARED Euclidean distances ascending, ties broken
        by the lower index; ``idx (B, Q, k)`` int64 indices into ``points``. Missing neighbors are
        ``idx = -1``, ``dists = inf``. ``dists`` is differentiable w.r.t. ``query`` and ``points``.
    """
    query_lengths, points_lengths = check_search(query, points, query_lengths=query_lengths,
                                                 points_lengths=points_lengths, exclude_self=exclude_self)
    k = _checks.positive_int("k", k)
    dists, idx = search(query, points, k, radius2=None, query_lengths=query_lengths,
                        points_lengths=points_lengths, exclude_self=exclude_self)
    return KNN(differentiable_dists(dists, idx, query, points), idx)


def knn_reference(query, points, k, *, query_lengths=None, points_lengths=None, exclude_self=False) -> KNN:
    """Dense plain-PyTorch kNN (O(B*Q*P) memory): the oracle the fast paths are tested against."""
    B, Q, _ = query.shape
    ql = torch.full((B,), Q, device=query.device) if query_lengths is None else query_lengths
    pl = torch.full((B,), points.shape[1], device=query.device) if points_lengths is None else points_lengths
    return KNN(*search_reference(query, points, k, query_lengths=ql, points_lengths=pl, exclude_self=exclude_self))

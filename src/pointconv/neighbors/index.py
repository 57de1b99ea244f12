"""A neighbor-search index built once over a cloud and queried many times."""
from __future__ import annotations

import torch

from .. import _checks
from .._backend import backend_for
from ._common import KNN, check_points, check_query, differentiable_dists
from ._distance import radius_squared
from ._search import build_structures, search


class NeighborIndex:
    """Reusable exact search structure over padded ``points (B, P, D)`` with optional ``lengths (B,)``.

    On CPU it holds kd-trees (D <= 8: one per cloud of 20K points or more, one shared by the smaller
    clouds); on CUDA a uniform grid of the points sorted by cell (D = 3, float32). Training loops that query the same cloud many times pay the build once.
    The index keeps a reference to ``points``: do not modify them in place afterwards. Results are
    exactly those of :func:`pointconv.knn` / :func:`pointconv.ball_query` on the same points.
    """

    def __init__(self, points: torch.Tensor, lengths: torch.Tensor | None = None):
        self.lengths = check_points(points, lengths, lengths_name="lengths")
        self.points = points
        self._backend = backend_for(points.device)
        self._structures = build_structures(points, self.lengths)

    def _structures_now(self):
        # A backend forced after the build (e.g. "reference") ignores the prebuilt structures.
        return self._structures if backend_for(self.points.device) == self._backend else None

    def knn(self, query: torch.Tensor, k: int, *, query_lengths=None, exclude_self: bool = False) -> KNN:
        """The ``k`` nearest indexed points of each query; see :func:`pointconv.knn`."""
        query_lengths = check_query(query, self.points, query_lengths=query_lengths, exclude_self=exclude_self)
        k = _checks.positive_int("k", k)
        dists, idx = search(query, self.points, k, radius2=None, query_lengths=query_lengths,
                            points_lengths=self.lengths, exclude_self=exclude_self,
                            structures=self._structures_now())
        return KNN(differentiable_dists(dists, idx, query, self.points), idx)

    def ball_query(self, query: torch.Tensor, radius: float, k: int, *, query_lengths=None,
                   exclude_self: bool = False) -> KNN:
        """The ``k`` nearest indexed points within ``radius``; see :func:`pointconv.ball_query`."""
        query_lengths = check_query(query, self.points, query_lengths=query_lengths, exclude_self=exclude_self)
        radius = _checks.positive_float("radius", radius)
        k = _checks.positive_int("k", k)
        dists, idx = search(query, self.points, k, radius2=radius_squared(radius, query.dtype),
                            query_lengths=query_lengths, points_lengths=self.lengths,
                            exclude_self=exclude_self, structures=self._structures_now())
        return KNN(differentiable_dists(dists, idx, query, self.points), idx)

    def __repr__(self) -> str:
        B, P, D = self.points.shape
        kind = self._structures[0] or "brute force"
        return f"NeighborIndex(B={B}, P={P}, D={D}, device={self.points.device}, structure={kind})"

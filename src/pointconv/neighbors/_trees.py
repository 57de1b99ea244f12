"""kd-trees over a batch of clouds on CPU: small clouds share one "lifted" tree.

A deep-learning batch holds many small clouds (say 32 x 1024 points). One tree and one query pass
per cloud cost more in fixed overhead (tree calls, a dozen torch ops on tiny tensors, a thread
start-up) than in search. The small clouds are therefore concatenated into one tree, each point
given one more coordinate, ``cloud * gap``:

- within a cloud that coordinate differs by exactly 0, so the tree's float64 distances between a
  query and the points of its own cloud are the D-dimensional ones, bit for bit;
- ``gap`` is twice the search bound, and the bound exceeds every distance between a query and a
  point of its cloud, so no query meets another cloud's points, and none of its own is cut off.

The bound comes from a box that holds the points and the queries (``extent``: the largest absolute
coordinate). An index built once (``NeighborIndex``) sizes the box from its points with room to
spare; queries outside it are answered by per-cloud trees instead (built on first use).
Clouds of ``LIFT_POINTS`` points or more get a tree of their own: their search dominates.
"""
from __future__ import annotations

import math

import torch

from ._cpu import LiftedQueries, build_tree

LIFT_POINTS = 20000


def extent_of(x: torch.Tensor) -> float:
    """The largest absolute coordinate of ``x`` (0 when empty)."""
    return float(x.detach().abs().amax()) if x.numel() else 0.0


class CloudTrees:
    """The kd-trees over padded ``points (B, P, D)`` with ``lengths``: see the module docstring.

    ``extent``: the largest absolute coordinate of any query to come (default: twice the points').
    """

    def __init__(self, points: torch.Tensor, lengths: list[int], extent: float | None = None):
        self.points, self.lengths = points, lengths
        self._own: dict[int, object] = {}
        small = [b for b, n in enumerate(lengths) if 0 < n < LIFT_POINTS]
        ext = 2.0 * extent_of(points) + 1.0 if extent is None else extent
        # |q - p| <= sqrt(D) * 2 * extent for any query and point in the box
        self.extent, self.bound = ext, 2.0 * math.sqrt(points.shape[-1]) * (ext + 1.0)
        self.gap = 2.0 * self.bound
        # Lifted coordinates reach clouds * gap: their squares must stay finite in float64. And
        # every squared distance inside a cloud finite in the points' dtype: an overflow to inf
        # would leave a query uncertified with no finite bound (per-cloud trees handle that).
        inside = 4.0 * ext * ext * points.shape[-1]
        liftable = (len(small) >= 2 and len(small) * self.gap < 1e150
                    and inside < torch.finfo(points.dtype).max / 4)
        self.lifted = small if liftable else []
        shared = set(self.lifted)  # (a list's `in` made this loop quadratic in the clouds: 7 s at 40K)
        for b, n in enumerate(lengths):
            if n and b not in shared:
                self._own[b] = build_tree(points[b, :n])
        if not self.lifted:
            return
        sizes = torch.tensor([lengths[b] for b in self.lifted])
        self.starts = torch.cumsum(sizes, 0) - sizes  # each lifted cloud's first row in ``self.cat``
        self.cat = torch.cat([points[b, :lengths[b]] for b in self.lifted]).detach()
        cloud = torch.repeat_interleave(torch.arange(len(self.lifted)), sizes)
        self.tree = build_tree(torch.cat([self.cat.double(), cloud.double()[:, None] * self.gap], 1))

    def own_tree(self, b: int):
        """Cloud ``b``'s own tree (built on first use for a lifted cloud)."""
        if b not in self._own:
            self._own[b] = build_tree(self.points[b, :self.lengths[b]])
        return self._own[b]

    def covers(self, query: torch.Tensor) -> bool:
        """Whether the lifted tree can answer these queries (all inside the box)."""
        return bool(self.lifted) and extent_of(query) <= self.extent

    def lifted_queries(self, query_cloud: torch.Tensor) -> LiftedQueries:
        """For queries of the lifted clouds ``query_cloud`` (positions in ``self.lifted``)."""
        return LiftedQueries(self.bound, query_cloud, query_cloud.double() * self.gap)

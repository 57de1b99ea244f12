"""A kd-tree over the distinct points of a cloud whose points repeat many times.

cKDTree cannot split a node whose points are all equal: D copies of one point end in one leaf of
D points, which every query near it scans, so D queries there cost D^2 distances (zero padding
counted as points: 50,000 zeros in a 100,000-point cloud made a self-kNN 30x slower, in cKDTree's
queries and in the exact fallback's, which met every copy again). ``GroupedTree`` is built over
one point per group of identical points (``PointGroups``) and answers ``query`` as cKDTree over
all the points would: the k float64-nearest points (ties in any order), each group expanded to its
lowest indices.

``kd_tree`` decides from one sort of a hash of the coordinates, which the grouping then reuses:
it groups when the runs of equal points longer than a leaf, summed as length^2, pass 4 per point
(the exact fallback, which settles ties at the k-th neighbor, would take about that many candidates).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy.spatial import cKDTree

from ._point_groups import PointGroups, sorted_hashes
from ._point_groups import repeats_are_costly as costly

LEAF_SIZE = 32  # sliding-midpoint splits with 32-point leaves: see _cpu.build_tree


def plain_tree(data: np.ndarray) -> cKDTree:
    return cKDTree(data, leafsize=LEAF_SIZE, balanced_tree=False, compact_nodes=False)


def kd_tree(data: np.ndarray):
    """A kd-tree over ``data (n, D)`` (float64): cKDTree, or ``GroupedTree`` when repeats are costly."""
    if data.shape[0] <= LEAF_SIZE:
        return plain_tree(data)
    hashes, order = _sorted_hashes(data)
    return GroupedTree(data, hashes, order) if _repeats_are_costly(hashes) else plain_tree(data)


def repeats_are_costly(data: np.ndarray) -> bool:
    """Whether ``kd_tree`` groups the points of ``data (n, D)`` (float64)."""
    return data.shape[0] > LEAF_SIZE and _repeats_are_costly(_sorted_hashes(data)[0])


def _sorted_hashes(data: np.ndarray):
    """The points' hashes (of their coordinate bits), sorted: ``(hashes, order)``."""
    return sorted_hashes(torch.from_numpy(np.ascontiguousarray(data)))


def _repeats_are_costly(hashes: torch.Tensor) -> bool:
    return costly(hashes, LEAF_SIZE)


class GroupedTree:
    """A kd-tree over the distinct rows of ``data (n, D)`` (float64) with cKDTree's ``query``,
    ``indices``, ``n`` and ``data``; ``tree`` is the kd-tree over one point per group and
    ``groups`` the ``PointGroups`` (``hashes, order``: ``_sorted_hashes(data)``, if computed)."""

    def __init__(self, data: np.ndarray, hashes: torch.Tensor | None = None, order: torch.Tensor | None = None):
        self.data, self.n = data, data.shape[0]
        self.groups = PointGroups(torch.from_numpy(np.ascontiguousarray(data)), hashes, order)
        self.tree = plain_tree(self.groups.representatives.numpy())

    @property
    def indices(self) -> np.ndarray:
        """The points in the leaf order of the tree's groups (as cKDTree's ``indices``)."""
        position = torch.empty(self.tree.n, dtype=torch.int64)
        position[torch.from_numpy(self.tree.indices)] = torch.arange(self.tree.n)
        return torch.argsort(position[self.groups.group], stable=True).numpy()

    def query(self, x: np.ndarray, k: int, distance_upper_bound: float = math.inf, workers: int = 1):
        """``(distances, indices)``, both ``(len(x), k)``: the k nearest points within the bound,
        padded with inf / ``n`` as cKDTree pads."""
        return self.query_with_next(x, k, distance_upper_bound, workers)[:2]

    def query_with_next(self, x: np.ndarray, k: int, distance_upper_bound: float = math.inf, workers: int = 1):
        """``query``, and per slot a lower bound on the distance of every group after the slot's own
        (the next group's, inf when no group is left within the bound): ``(distances, indices, next)``.

        A slot's group is complete up to the k lowest of its points, so the points not returned
        are the later members of the last group in a row and the groups after it: what
        ``kdtree_search`` needs to certify an answer whose last points are copies of one point.
        """
        x = np.asarray(x).reshape(-1, self.data.shape[1])
        dd, gg = self.tree.query(x, k=k, distance_upper_bound=distance_upper_bound, workers=workers)
        groups = torch.from_numpy(np.asarray(gg).reshape(len(x), k)).long()
        column, point = self.expand_rows(groups, k, k)
        dd = torch.from_numpy(np.asarray(dd, dtype=np.float64).reshape(len(x), k))
        dists = torch.where(point < self.n, dd.gather(1, column), math.inf)
        # the last returned group stands for those after it: they are no nearer
        following = torch.cat([dd[:, 1:], dd[:, -1:]], 1)
        return dists.numpy(), point.numpy(), following.gather(1, column).numpy()

    def expand_rows(self, groups: torch.Tensor, keep: int, width: int | None = None):
        """``PointGroups.expand_rows``: the tree pads ``groups`` with ``tree.n``, the group count."""
        return self.groups.expand_rows(groups, keep, width)

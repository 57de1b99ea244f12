"""A kd-tree over the distinct points of a cloud whose points repeat many times.

cKDTree cannot split a node whose points are all equal: D copies of one point end in one leaf of
D points, which every query near it scans, so D queries there cost D^2 distances (zero padding
counted as points: 50,000 zeros in a 100,000-point cloud made a self-kNN 30x slower, in cKDTree's
queries and in the exact fallback's, which met every copy again). ``GroupedTree`` is built over one point per group of identical points and
answers ``query`` as cKDTree over all the points would: the k float64-nearest points (ties in any
order), each group expanded to its lowest indices. A group's points are at the same distance from
any query, bit for bit, so the expansion changes no distance.

``kd_tree`` decides from one sort of a hash of the coordinates, which the grouping then reuses:
it groups when the runs of equal points longer than a leaf, summed as length^2, pass 4 per point
(the exact fallback, which settles ties at the k-th neighbor, would take about that many candidates).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy.spatial import cKDTree

from .._rows import repeat_cost, sorted_row_hashes

LEAF_SIZE = 32  # sliding-midpoint splits with 32-point leaves: see _cpu.build_tree
# Group when the runs of equal points longer than a leaf, summed as length^2, pass this many per point
# of the cloud: a query's share of a run of D copies costs the exact fallback about D candidates
# (ties at the k-th neighbor), each several times a tree's distance computation.
_COSTLY_REPEATS = 4


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
    return sorted_row_hashes(torch.from_numpy(np.ascontiguousarray(data)).view(torch.int64))


def _repeats_are_costly(hashes: torch.Tensor) -> bool:
    return repeat_cost(hashes, LEAF_SIZE) > _COSTLY_REPEATS * len(hashes)


class GroupedTree:
    """A kd-tree over the distinct rows of ``data (n, D)`` (float64) with cKDTree's ``query``,
    ``indices``, ``n`` and ``data``; ``tree`` is the kd-tree over one point per group.

    ``hashes, order``: ``_sorted_hashes(data)``, if already computed. A group is a run of equal
    hashes and equal coordinates in that order; the stable sort keeps each group's points by index.
    (Equal points split by a hash collision would make two groups: still exact, as any partition
    into identical points is.)"""

    def __init__(self, data: np.ndarray, hashes: torch.Tensor | None = None, order: torch.Tensor | None = None):
        if hashes is None:
            hashes, order = _sorted_hashes(data)
        x = torch.from_numpy(np.ascontiguousarray(data))[order]
        starts = torch.ones(len(x), dtype=torch.bool)
        starts[1:] = (hashes[1:] != hashes[:-1]) | (x[1:] != x[:-1]).any(1)
        self.data, self.n = data, data.shape[0]
        self.first = torch.nonzero(starts).flatten()  # each group's start in ``members``
        self.count = torch.diff(self.first, append=torch.tensor([self.n]))
        self.members = order  # the points by group, then by index
        self.group = torch.empty(self.n, dtype=torch.int64)  # each point's group
        self.group[order] = torch.cumsum(starts, 0) - 1
        self.tree = plain_tree(x[self.first].numpy())

    @property
    def indices(self) -> np.ndarray:
        """The points in the leaf order of the tree's groups (as cKDTree's ``indices``)."""
        position = torch.empty(self.tree.n, dtype=torch.int64)
        position[torch.from_numpy(self.tree.indices)] = torch.arange(self.tree.n)
        return torch.argsort(position[self.group], stable=True).numpy()

    def query(self, x: np.ndarray, k: int, distance_upper_bound: float = math.inf, workers: int = 1):
        """``(distances, indices)``, both ``(len(x), k)``: the k nearest points within the bound,
        padded with inf / ``n`` as cKDTree pads."""
        x = np.asarray(x).reshape(-1, self.data.shape[1])
        dd, gg = self.tree.query(x, k=k, distance_upper_bound=distance_upper_bound, workers=workers)
        groups = torch.from_numpy(np.asarray(gg).reshape(len(x), k)).long()
        column, point = self.expand_rows(groups, k, k)
        dd = torch.from_numpy(np.asarray(dd, dtype=np.float64).reshape(len(x), k))
        dists = torch.where(point < self.n, dd.gather(1, column), math.inf)
        return dists.numpy(), point.numpy()

    def expand_rows(self, groups: torch.Tensor, keep: int, width: int | None = None):
        """Per row of ``groups (R, m)`` (int64, padded with ``tree.n`` at the end), the points its
        groups stand for, each group's ``keep`` lowest, group after group: ``(column, point)``, both
        ``(R, width)`` (default: the longest row), ``column`` the group each point came from and
        ``point`` padded with ``n``. A row with more points than ``width`` is cut."""
        found = groups < self.tree.n
        groups = groups.clamp(max=self.tree.n - 1)
        size = torch.where(found, self.count[groups].clamp(max=keep), 0)
        if width in (None, groups.shape[1]) and not bool((size > 1).any()):  # every group a single point
            point = torch.where(found, self.members[self.first[groups]], self.n)
            return torch.arange(groups.shape[1]).expand_as(groups), point
        ends = torch.cumsum(size, 1)
        if width is None:
            width = int(ends[:, -1].max()) if ends.numel() else 0
        slots = torch.arange(width).expand(len(groups), width).contiguous()
        column = torch.searchsorted(ends, slots, right=True)  # the group each slot falls in
        filled = column < groups.shape[1]
        column = column.clamp(max=groups.shape[1] - 1)
        within = slots - (ends - size).gather(1, column)
        point = self.members[(self.first[groups.gather(1, column)] + within).clamp(0, self.n - 1)]
        return column, torch.where(filled, point, self.n)

"""Groups of identical points: searching one point per group, then expanding to the group's points.

A cloud whose points repeat many times (zero padding, duplicated scans, feature vectors that a
ReLU collapsed to zero) defeats both exact searches: a kd-tree cannot split a run of equal
points, and the brute force's certificate cannot separate ties, so it widens a row's candidates
until they hold every copy. Both search one point per group instead and expand each group to its
lowest indices: a group's points are at the same distance from any query, bit for bit, so the
expansion changes no distance.

Groups are numbered by their lowest index. Ranked by (distance, group), groups therefore come in
the order their lowest points have in the (distance, index) order of the answer, so the answer's
k points lie in the k nearest groups (k + 1 with ``exclude_self``, whose query may be one of them),
and only a group's k (k + 1) lowest points can be among them.
"""
from __future__ import annotations

import torch

from .._rows import repeat_cost, sorted_row_hashes

# Group when the runs of equal points longer than the search tolerates, summed as length^2, pass
# this many per point: a query's share of a run of L copies costs about L candidates.
COSTLY_REPEATS = 4


def coordinate_words(x: torch.Tensor) -> torch.Tensor:
    """The bits of each coordinate of ``x (n, D)`` (floating point) as int64 words, ``(n, D)``."""
    same_width = {8: torch.int64, 4: torch.int32, 2: torch.int16}[x.element_size()]
    return x.contiguous().view(same_width).long()


def sorted_hashes(x: torch.Tensor):
    """``sorted_row_hashes`` of the coordinate bits of ``x (n, D)``: ``(hashes, order)``."""
    return sorted_row_hashes(coordinate_words(x))


def repeats_are_costly(hashes: torch.Tensor, longer_than: int) -> bool:
    """Whether runs of more than ``longer_than`` equal (sorted) hashes cost more than grouping."""
    return repeat_cost(hashes, longer_than) > COSTLY_REPEATS * len(hashes)


class PointGroups:
    """The points of ``x (n, D)`` grouped by equal coordinate bits, on ``x``'s device.

    ``hashes, order``: ``sorted_hashes(x)``, if already computed. A group is a run of equal hashes
    and equal bits in that order (equal points split by a hash collision make two groups: still
    exact, as any partition into identical points is).

    - ``representatives``: ``(G, D)``, one point per group, groups numbered by lowest index;
    - ``members``: the points by group, then by index; ``first[g]``, ``count[g]``: group g's run;
    - ``group[i]``: point i's group.
    """

    def __init__(self, x: torch.Tensor, hashes: torch.Tensor | None = None, order: torch.Tensor | None = None):
        if hashes is None:
            hashes, order = sorted_hashes(x)
        n, device = x.shape[0], x.device
        words = coordinate_words(x)[order]
        starts = torch.ones(n, dtype=torch.bool, device=device)
        starts[1:] = (hashes[1:] != hashes[:-1]) | (words[1:] != words[:-1]).any(1)
        run = torch.cumsum(starts, 0) - 1  # each sorted point's group, in hash order
        lowest = order[starts]  # the stable sort keeps a run's points by index: its first is the lowest
        renumber = torch.empty_like(lowest)
        renumber[torch.argsort(lowest)] = torch.arange(len(lowest), device=device)
        self.n = n
        self.group = torch.empty(n, dtype=torch.int64, device=device)
        self.group[order] = renumber[run]
        self.members = torch.argsort(self.group, stable=True)
        self.count = torch.bincount(self.group, minlength=len(lowest))
        self.first = torch.cumsum(self.count, 0) - self.count
        self.representatives = x[torch.sort(lowest).values]

    @property
    def num_groups(self) -> int:
        return len(self.count)

    def expand_rows(self, groups: torch.Tensor, keep: int, width: int | None = None):
        """Per row of ``groups (R, m)`` (int64, padded with ``num_groups`` at the end), the points
        its groups stand for, each group's ``keep`` lowest, group after group: ``(column, point)``,
        both ``(R, width)`` (default: the longest row), ``column`` the group each point came from
        and ``point`` padded with ``n``. A row with more points than ``width`` is cut."""
        found = groups < self.num_groups
        groups = groups.clamp(max=self.num_groups - 1)
        size = torch.where(found, self.count[groups].clamp(max=keep), 0)
        columns = torch.arange(groups.shape[1], device=groups.device)
        if width in (None, groups.shape[1]) and not bool((size > 1).any()):  # every group a single point
            point = torch.where(found, self.members[self.first[groups]], self.n)
            return columns.expand_as(groups), point
        ends = torch.cumsum(size, 1)
        if width is None:
            width = int(ends[:, -1].max()) if ends.numel() else 0
        slots = torch.arange(width, device=groups.device).expand(len(groups), width).contiguous()
        column = torch.searchsorted(ends, slots, right=True)  # the group each slot falls in
        filled = column < groups.shape[1]
        column = column.clamp(max=groups.shape[1] - 1)
        within = slots - (ends - size).gather(1, column)
        point = self.members[(self.first[groups.gather(1, column)] + within).clamp(0, self.n - 1)]
        return column, torch.where(filled, point, self.n)

"""Packed clouds ``(N, D)`` with a sorted int64 batch vector, and their padded form.

The packed searches run the padded search on groups of clouds of similar sizes and write each
group's results back into the packed rows: the same results as the padded form of the whole
batch, without its memory. One padded batch of uneven clouds costs ``B x max(N)`` rows (a 1M-point
cloud beside 99 of 1K points: 100M rows of coordinates and of ``k`` results); the groups keep
the padded rows within twice the packed ones, plus ``_PAD_SLACK`` per group (``_size_groups``).
"""
from __future__ import annotations

import torch

from .. import _checks
from ._common import KNN, check_magnitude, differentiable_dists
from .ball_query import ball_query
from .knn import knn

__all__ = ["packed_to_padded", "knn_packed", "ball_query_packed"]

# rows of padding any group may add beyond twice its clouds' rows: small clouds of scattered sizes
# then share one search instead of one each
_PAD_SLACK = 1 << 12


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


def _size_groups(query_counts: list[int], points_counts: list[int], slack: int) -> list[list[int]]:
    """The clouds that have queries and points, in groups whose padded rows (``len(group) x`` its
    largest cloud, for the queries and for the points) stay within twice their rows plus
    ``slack``. Clouds are taken by decreasing size (points, then queries) and a group closes
    where the next cloud would break that bound; on the points' side that cloud has under half the
    points of the group's first, so when query and point counts grow together there are at most
    about ``log2(largest / smallest) + 1`` groups."""
    order = sorted((c for c, (q, p) in enumerate(zip(query_counts, points_counts)) if q and p),
                   key=lambda c: (-points_counts[c], -query_counts[c], c))
    groups, group = [], []
    qmax = pmax = qsum = psum = 0  # of the open group
    for c in order:
        q, p = query_counts[c], points_counts[c]
        n, qmax, pmax, qsum, psum = len(group) + 1, max(qmax, q), max(pmax, p), qsum + q, psum + p
        if group and (n * qmax > 2 * qsum + slack or n * pmax > 2 * psum + slack):
            groups.append(group)  # c opens the next group
            group, qmax, pmax, qsum, psum = [], q, p, q, p
        group.append(c)
    return groups + ([group] if group else [])


def _check_packed(query, points, query_batch, points_batch, exclude_self):
    _checks.coords("points", points, ndim=2)
    _checks.coords("query", query, ndim=2)
    check_magnitude("points", points)
    check_magnitude("query", query)
    _checks.same_device(points=points, query=query)
    _checks.same_dtype(points=points, query=query)
    if query.shape[1] != points.shape[1]:
        raise ValueError(f"query has D = {query.shape[1]} but points has D = {points.shape[1]}")
    _checks.batch_vector("query_batch", query_batch, query.shape[0], query.device)
    _checks.batch_vector("points_batch", points_batch, points.shape[0], points.device)
    _checks.flag("exclude_self", exclude_self)
    if exclude_self and (query.shape[0] != points.shape[0] or not torch.equal(query_batch, points_batch)):
        raise ValueError("exclude_self=True needs query and points to be the same packed cloud "
                         "(same length and equal query_batch and points_batch)")
    nb = 0
    for b in (query_batch, points_batch):
        if b.numel():
            nb = max(nb, int(b[-1]) + 1)
    return nb


def _padded_rows(counts: torch.Tensor, offsets: torch.Tensor, clouds: torch.Tensor, width: int):
    """The packed rows of ``clouds`` (in that order) and their rows in the ``(len(clouds), width)``
    padded block."""
    n = counts[clouds]
    local = torch.repeat_interleave(torch.arange(clouds.numel(), device=clouds.device), n)
    pos = torch.arange(local.numel(), device=clouds.device) - (torch.cumsum(n, 0) - n)[local]
    return offsets[clouds][local] + pos, local * width + pos


def _packed_search(fn, k, query, points, query_batch, points_batch, exclude_self, *args):
    nb = _check_packed(query, points, query_batch, points_batch, exclude_self)
    _checks.output_size("k", query.shape[0], k)
    if nb > query.shape[0] + points.shape[0]:  # ids with gaps (up to 2^63): number the clouds present
        present = torch.unique(torch.cat([query_batch, points_batch]))
        query_batch, points_batch = (torch.searchsorted(present, b) for b in (query_batch, points_batch))
        nb = present.numel()
    dev, D = query.device, query.shape[1]
    qcount = torch.bincount(query_batch, minlength=nb)
    pcount = torch.bincount(points_batch, minlength=nb)
    qoff, poff = torch.cumsum(qcount, 0) - qcount, torch.cumsum(pcount, 0) - pcount
    # one padded tensor for both sides of a self-search: the searches recognize it (the CPU path
    # then queries in the kd-tree's own leaf order)
    self_search = query is points and (query_batch is points_batch or torch.equal(query_batch, points_batch))
    dists = query.new_full((query.shape[0], k), float("inf"))
    idx = torch.full((query.shape[0], k), -1, dtype=torch.int64, device=dev)
    # the search runs without autograd: the selected distances are recomputed from the packed
    # coordinates below, as the padded searches do
    with torch.no_grad():
        for group in _size_groups(qcount.tolist(), pcount.tolist(), _PAD_SLACK):
            clouds = torch.tensor(group, device=dev)
            qlen, plen = qcount[clouds], pcount[clouds]
            qmax, pmax = int(qlen.max()), int(plen.max())
            qrows, qslots = _padded_rows(qcount, qoff, clouds, qmax)
            prows, pslots = _padded_rows(pcount, poff, clouds, pmax)
            qpad = query.new_zeros((len(group) * qmax, D)).index_copy_(0, qslots, query[qrows])
            ppad = qpad if self_search else points.new_zeros((len(group) * pmax, D)).index_copy_(
                0, pslots, points[prows])
            res = fn(qpad.view(len(group), qmax, D), ppad.view(len(group), pmax, D), *args,
                     query_lengths=qlen, points_lengths=plen, exclude_self=exclude_self)
            found = res.idx.view(-1, k)[qslots]
            # group-local point indices -> packed rows: the cloud's offset among the packed points
            shift = poff[clouds].repeat_interleave(qlen)[:, None]
            idx[qrows] = torch.where(found >= 0, found + shift, -1)
            dists[qrows] = res.dists.view(-1, k)[qslots]
    return KNN(differentiable_dists(dists[None], idx[None], query[None], points[None])[0], idx)


def knn_packed(query: torch.Tensor, points: torch.Tensor, k: int, *, query_batch: torch.Tensor,
               points_batch: torch.Tensor, exclude_self: bool = False) -> KNN:
    """kNN of packed clouds: ``query (Nq, D)``, ``points (Np, D)``, sorted int64 batch vectors.

    Returns ``KNN(dists (Nq, k), idx (Nq, k))``: SQUARED distances ascending, int64 indices into the
    packed ``points`` (``-1`` / ``inf`` where missing). Queries only see points of their own cloud.
    Clouds of very different sizes are searched in groups of similar sizes (module docstring):
    the padding stays within twice the packed rows, plus 4096 rows per group.
    """
    k = _checks.positive_int("k", k)
    return _packed_search(knn, k, query, points, query_batch, points_batch, exclude_self, k)


def ball_query_packed(query: torch.Tensor, points: torch.Tensor, radius: float, k: int, *,
                      query_batch: torch.Tensor, points_batch: torch.Tensor,
                      exclude_self: bool = False) -> KNN:
    """Ball query of packed clouds; arguments and outputs as in :func:`knn_packed`."""
    radius = _checks.positive_float("radius", radius)
    k = _checks.positive_int("k", k)
    return _packed_search(ball_query, k, query, points, query_batch, points_batch, exclude_self, radius, k)

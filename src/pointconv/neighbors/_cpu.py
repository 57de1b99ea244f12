"""Exact neighbor search on CPU without a dense Q x P matrix: scipy's cKDTree (D <= 8).

cKDTree ranks candidates by float64 distances; the reference ranks float32 (or float64) distances
computed by ``sq_dist`` with ties broken by index. To return exactly the reference's answer, each
query asks the tree for one candidate more than it needs and recomputes the candidates' distances
with ``sq_dist`` in the input dtype. Where consecutive candidates are farther apart (in float64)
than any rounding error, the tree's order is the reference's order; the other rows are sorted by
(distance, index). The answer is certified when the first unseen point is farther, by more than
the rounding error of both distances, than the last selected one. The few queries that fail (ties
or near-ties at the k-th neighbor, duplicated points) are answered exactly from every point inside
a slightly larger ball.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import NamedTuple

import numpy as np
import torch

from .._threads import imap_ordered
from ._brute_force import brute_force_search
from ._distance import sq_dist_gathered
from ._select import first_k, mask_candidates, select_sorted
from ._grouped_tree import GroupedTree, kd_tree

KDTREE_MAX_DIM = 8  # above this a kd-tree degrades towards brute force
_FALLBACK_CANDIDATES = 1 << 22  # candidates per batch of uncertified queries
_GUESS_ROWS = 20000  # from this many queries on, a sampled distance bound pays off
_PIPELINE_ROWS = 20000  # from this many queries on, a thread pool overlaps queries and post-processing
_CHUNK_ROWS = 8192  # largest chunk of queries sent to one pool thread
_PROBE_ROWS = 4096  # from this many queries on, a sample sizes the first query (ties on lattices)
_THREADS = os.cpu_count() or 1


def build_tree(points: torch.Tensor):
    """A kd-tree over ``(n, D)`` points: cKDTree, or ``GroupedTree`` when points repeat many times.

    Sliding-midpoint splits with 32-point leaves: built about 2x faster than scipy's default and
    queried about 10% faster (benchmarks/bench_neighbors.py measures the whole path).
    """
    return kd_tree(points.detach().double().numpy())


class LiftedQueries(NamedTuple):
    """Queries into a kd-tree shared by several clouds (``_trees.CloudTrees``).

    ``bound``: a search bound above any distance inside a cloud and below the gap between clouds;
    ``cloud``: each query's cloud (int64); ``column``: its extra tree coordinate (float64).
    """

    bound: float
    cloud: torch.Tensor
    column: torch.Tensor


def _tree_coords(q: torch.Tensor, lift_column: torch.Tensor | None) -> np.ndarray:
    """The float64 coordinates the tree is queried with (lifted for a batch of clouds)."""
    q64 = q.detach().double()
    if lift_column is not None:
        q64 = torch.cat([q64, lift_column[:, None]], 1)
    return q64.numpy()


def _rel_error(dim: int, dtype: torch.dtype) -> float:
    # Relative error bound of sq_dist (one rounding per subtraction, product and addition) plus
    # cKDTree's float64 distance, with a safety factor of 2.
    return 2.0 * (dim + 4) * (torch.finfo(dtype).eps + torch.finfo(torch.float64).eps)


def _abs_error(dim: int, dtype: torch.dtype) -> float:
    # Below the smallest normal number a rounding errs by up to half the smallest subnormal, not
    # relatively: squared distances of about 1e-45 (float32) round to 0 or to each other. Added to
    # every bound, so underflowed distances are compared as the ties they may be.
    finfo = torch.finfo(dtype)
    return 2.0 * (dim + 4) * finfo.smallest_normal * finfo.eps


def morton_order(x: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
    """A permutation that puts nearby points next to each other (Z-order of the first 3 coordinates).

    Queries sent to the tree in this order reuse the same tree nodes from one query to the next.
    ``groups`` (int64, one per point): order by group first (the clouds of a lifted batch).
    """
    x = x[:, :3]
    lo = x.amin(0)
    ext = (x.amax(0) - lo).clamp(min=1e-30)
    v = ((x - lo) / ext * 1023).long().clamp(0, 1023)
    code = torch.zeros(len(x), dtype=torch.int64)
    for bit in range(10):
        for c in range(x.shape[1]):
            code |= ((v[:, c] >> bit) & 1) << (3 * bit + c)
    if groups is not None:
        code |= groups << 30
    return torch.argsort(code)


def _drop_self(cand: torch.Tensor, d64: torch.Tensor, rows: torch.Tensor, following=None):
    """Remove each row's own index from its candidates, the later ones moving one slot left; the
    freed last slot holds no candidate (-1, inf) and the last slot's ``following`` bound
    (``_query_chunk``'s, if any). A row without its own index among the candidates keeps them all:
    a query beyond the points' length has no self (dropping its last candidate lost a neighbor when
    every point was a candidate), and duplicates at distance 0 may fill the slots before it."""
    n, m = cand.shape
    is_self = cand == rows
    has_self = is_self.any(1)
    pos = torch.where(has_self, is_self.int().argmax(1), m)
    cols = torch.arange(m)[None, :]
    cols = (cols + (cols >= pos[:, None]).long()).clamp(max=m - 1)
    if following is not None:
        following = following.gather(1, cols)
    cand, d64 = cand.gather(1, cols), d64.gather(1, cols)
    cand[:, m - 1].masked_fill_(has_self, -1)
    d64[:, m - 1].masked_fill_(has_self, float("inf"))
    return cand, d64, following


def _unseen_after_groups(cand, d64, following, out_i, k, groups):
    """Over a ``GroupedTree``: a lower bound (squared, float64) on the distance of every point that
    is not among a row's first k candidates and could precede its k-th neighbor ``out_i[:, k-1]``.

    The points left out are the groups after the one in slot k-1, no nearer than ``following``
    says, and that group's later points. Those tie with it and have higher indices than its
    candidates, so when the k-th neighbor is one of them they all come after it; otherwise (the
    input dtype ranked another group last) they count at the group's distance.
    """
    unseen = following[:, k - 1].square()
    last_slot = cand[:, k - 1]
    kth = out_i[:, k - 1]
    same = (last_slot >= 0) & (kth >= 0) & (groups.group[last_slot.clamp(min=0)] == groups.group[kth.clamp(min=0)])
    return torch.where(same | (last_slot < 0), unseen, torch.minimum(unseen, d64[:, k - 1]))


def _guess_bound(tree, q64, m, bound):
    """A likely upper bound on the m-th neighbor distance, or ``bound`` for small batches.

    A kd-tree query prunes sooner when it starts from a good bound: query a 0.5% sample and take
    the 95th percentile of its m-th distances. The ~5% of rows that come back short of m
    neighbors are queried again with ``bound`` (``_query_chunk``): the answer does not depend on
    the guess, and the whole costs about 15% less than an unbounded query.
    """
    nq = q64.shape[0]
    if nq < _GUESS_ROWS or m < 2:
        return bound
    if isinstance(tree, GroupedTree):  # past the group after the m-th slot's (see _query_chunk)
        sample = tree.query_with_next(q64[:: nq // 200], m, bound)[2][:, -1]
    else:
        sample = tree.query(q64[:: nq // 200], k=m, distance_upper_bound=bound, workers=1)[0][:, -1]
    finite = sample[np.isfinite(sample)]
    return min(bound, float(np.quantile(finite, 0.95))) if finite.size else bound


def _first_candidates(tree, q64, m, kk, bound, rel, tiny):
    """How many candidates the first query asks for: ``m`` (one more than the ``kk`` needed), or
    more where a sample shows ties at the kk-th neighbor.

    A row is certified when its first unseen candidate is farther, by more than the rounding
    error, than its kk-th; on a lattice (voxel centers) the kk-th ties with several points, nearly
    every row fails with ``m``, and the fallback queries the tree a second time. The sample (up to
    200 rows, 4m candidates each) counts the candidates each row needs; when the 95th percentile
    exceeds ``m`` the first query asks for that many. Not over a ``GroupedTree``: there the ties
    are mostly copies of one point, which its fallback expands per group (a wider first query over
    groups of 100 copies took 2x longer in bench_neighbors' hard table).
    """
    nq, n = q64.shape[0], tree.n
    if nq < _PROBE_ROWS or m >= n or isinstance(tree, GroupedTree):
        return m
    probe = min(n, 4 * m)
    dd = np.asarray(tree.query(q64[:: max(1, nq // 200)], k=probe, distance_upper_bound=bound, workers=1)[0])
    d2 = dd.reshape(-1, probe) ** 2
    kth = d2[:, kk - 1:kk]
    needed = (d2 <= kth * (1 + 4 * rel) + 4 * tiny).sum(1) + 1
    # a row with fewer than kk points within the search bound is certified by any query
    needed = np.where(np.isfinite(kth[:, 0]), needed, m)
    return int(min(probe, max(m, np.percentile(needed, 95))))


def _query_chunk(tree, q64, m, guess, bound, workers=1):
    """The tree's m nearest candidates of each row: ``(dd, ii, following)``, ``following`` the
    per-slot bound on the groups after the slot's over a ``GroupedTree`` (else None)."""
    def query(x, upper):
        if isinstance(tree, GroupedTree):
            return tree.query_with_next(x, m, upper, workers)
        dd, ii = tree.query(x, k=m, distance_upper_bound=upper, workers=workers)
        return dd, ii, None

    found = [np.asarray(a).reshape(len(q64), m) if a is not None else None for a in query(q64, guess)]
    if guess < bound:
        # rows that met nothing past the guess: no more points within it, or (over groups) no group
        # after the last slot's, which the certificate needs to know within the search bound
        short = np.nonzero(np.isinf(found[0][:, -1] if found[2] is None else found[2][:, -1]))[0]
        if short.size:
            for whole, again in zip(found, query(q64[short], bound)):
                if whole is not None:
                    whole[short] = np.asarray(again).reshape(-1, m)
    return tuple(found)


def kdtree_search(q, p, tree, k, radius2, exclude_self, row_ids=None, lift=None):
    """Exact k nearest of each row of ``q (nq, D)`` among ``p (n, D)`` (``tree`` built over ``p``).

    ``row_ids`` are the queries' own indices into ``p`` (for ``exclude_self``). Returns squared
    distances ``(nq, k)`` in the input dtype and int64 indices, padded with inf / -1.

    Queries go to the tree in Z-order chunks on a thread pool (the tree releases the GIL); each
    chunk is finished (``_finish_chunk``) while the next ones are being queried.

    ``lift``: ``LiftedQueries`` when ``tree`` is shared by several concatenated clouds (and ``p``
    is their concatenation): each query meets only its own cloud's points.
    """
    nq, dim = q.shape
    n = p.shape[0]
    rows = torch.arange(nq) if row_ids is None else row_ids
    m = min(k + int(exclude_self) + 1, n)  # one more than needed: it certifies the boundary
    rel, tiny = _rel_error(dim, q.dtype), _abs_error(dim, q.dtype)
    bound = math.inf if radius2 is None else math.sqrt(radius2 * (1 + 4 * rel) + 4 * tiny)
    q_lift = None
    if lift is not None:
        bound = min(bound, lift.bound)
        q_lift = lift.column
    if nq < 4096:
        order = None
    elif q.data_ptr() == p.data_ptr() and q.shape == p.shape:
        order = torch.from_numpy(tree.indices)  # self-search: the tree's leaf order is free
    else:
        order = morton_order(q, None if lift is None else lift.cloud)
    if order is not None:
        q, rows = q[order], rows[order]
        q_lift = None if q_lift is None else q_lift[order]
    q64 = _tree_coords(q, q_lift)
    m = _first_candidates(tree, q64, m, min(k + int(exclude_self), n), bound, rel, tiny)
    guess = _guess_bound(tree, q64, m, bound)
    p_columns = p.detach().t().contiguous()
    groups = tree.groups if isinstance(tree, GroupedTree) else None
    out_d = torch.empty((nq, k), dtype=q.dtype)
    out_i = torch.empty((nq, k), dtype=torch.int64)
    uncertified = []
    if nq < _PIPELINE_ROWS:  # small batches: a thread pool costs more than it saves
        dd, ii, following = _query_chunk(tree, q64, m, guess, bound, workers=-1)
        out_d, out_i, bad = _finish_chunk(q, p_columns, dd, ii, k, radius2, exclude_self, rows, rel, tiny,
                                          following, groups)
        uncertified.append(bad)
    else:
        # Enough chunks to keep every thread busy, each big enough to amortize its overhead.
        chunk = min(_CHUNK_ROWS, max(512, -(-nq // (4 * _THREADS))))
        spans = [(s, min(s + chunk, nq)) for s in range(0, nq, chunk)]
        # the threads query the tree ahead while this one finishes the chunks that are in (with
        # one torch thread: torch's own worker threads would spin against the tree's)
        queried = imap_ordered(lambda span: _query_chunk(tree, q64[span[0]:span[1]], m, guess, bound), spans,
                               torch.device("cpu"), workers=_THREADS)
        with contextlib.closing(queried):
            for (s, e), (dd, ii, following) in zip(spans, queried):
                out_d[s:e], out_i[s:e], bad = _finish_chunk(q[s:e], p_columns, dd, ii, k, radius2, exclude_self,
                                                            rows[s:e], rel, tiny, following, groups)
                uncertified.append(bad + s)
    bad = torch.cat(uncertified)
    if bad.numel():
        last = out_d[bad, k - 1].double()
        if radius2 is not None:
            last = last.clamp(max=radius2)
        limit = (last * (1 + rel) + 2 * tiny) / (1 - rel) * (1 + 1e-9)
        out_d[bad], out_i[bad] = _exact_fallback(q[bad], p, tree, k, radius2, exclude_self, rows[bad], limit,
                                                None if q_lift is None else q_lift[bad])
    if order is not None:
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(nq)
        out_d, out_i = out_d.index_select(0, inverse), out_i.index_select(0, inverse)
    return out_d, out_i


def _finish_chunk(q, p_columns, dd, ii, k, radius2, exclude_self, rows, rel, tiny, following=None, groups=None):
    """Top-k of one chunk from the tree's m float64-nearest candidates (see the module docstring).

    Over a ``GroupedTree`` (``following`` and ``groups`` given): the candidates are its groups'
    lowest points, and ``following`` bounds, per slot, the groups after the slot's own.

    Returns ``(dists, idx, uncertified_rows)``: the rows whose answer the candidates cannot prove.
    """
    nq, m = ii.shape
    n = p_columns.shape[1]
    cand = torch.from_numpy(ii).to(torch.int64)
    cand[cand >= n] = -1
    d64 = torch.from_numpy(dd).square()
    following = None if following is None else torch.from_numpy(following)
    if exclude_self and m > 1:
        cand, d64, following = _drop_self(cand, d64, rows[:, None], following)
    mm = cand.shape[1]
    # Rows whose first k+1 candidates are farther apart (float64) than any rounding error keep
    # the tree's order in the input dtype too; only the others need a sort by (distance, index).
    c = min(k + 1, mm)
    lo, hi = d64[:, : c - 1], d64[:, 1:c]
    clean = ((hi * (1 - rel) - tiny > lo * (1 + rel) + tiny) | torch.isinf(lo)).all(1)
    kk = min(k, mm)
    d = sq_dist_gathered(q, p_columns, cand[:, :kk].clamp(min=0))
    d = mask_candidates(d, cand[:, :kk], rows[:, None], radius2, exclude_self)
    out_d, out_i = first_k(d, cand[:, :kk], k)
    messy = torch.nonzero(~clean).flatten()
    if messy.numel():
        cm = cand[messy]
        dm = mask_candidates(sq_dist_gathered(q[messy], p_columns, cm.clamp(min=0)), cm, rows[messy, None],
                             radius2, exclude_self)
        out_d[messy], out_i[messy] = select_sorted(dm, cm, k)
    if m == n:  # every point was a candidate
        return out_d, out_i, torch.empty(0, dtype=torch.int64)
    # The first unseen point is at least this far (squared, float64).
    if groups is None:
        unseen = torch.from_numpy(dd[:, m - 1]).square()
    else:
        unseen = _unseen_after_groups(cand, d64, following, out_i, k, groups)
    if radius2 is not None:
        unseen = torch.where(torch.isinf(unseen), radius2 * (1 + 4 * rel) + 4 * tiny, unseen)
    last = out_d[:, k - 1].double()
    if radius2 is not None:
        last = last.clamp(max=radius2)
    # (an infinite unseen distance: no other point within the search bound, the answer is complete)
    certified = (unseen * (1 - rel) - tiny > last * (1 + rel) + tiny) | torch.isinf(unseen)
    return out_d, out_i, torch.nonzero(~certified).flatten()


def _exact_fallback(qb, p, tree, k, radius2, exclude_self, self_ids, limit2, q_lift=None):
    """Exact answer for queries ``qb`` from every point within ``sqrt(limit2)`` (float64) of them.

    The tree is asked for more and more nearest candidates (4x per round) until the last one lies
    beyond a row's limit: then every point within it is a candidate, and the candidates sorted by
    (distance in the input dtype, index) give the answer. Ties at the k-th neighbor (points on a
    lattice, repeated points) need a few dozen candidates, and a kNN query returns them as arrays,
    where a ball query built a Python list per row (71K fallback rows of a voxelized shell took
    1.5 s that way). Over a ``GroupedTree`` the candidates are groups, each standing for its
    ``k + exclude_self`` lowest points: the others tie with those and come later.
    """
    if torch.isinf(limit2).any():  # no finite bound: fall back to brute force
        if q_lift is not None:  # unreachable: CloudTrees lifts only clouds whose distances stay finite
            raise AssertionError("a lifted kd-tree query fell back to brute force")
        return brute_force_search(qb, p, k, radius2, exclude_self, self_ids)
    q64 = _tree_coords(qb, q_lift)
    r = torch.from_numpy(np.sqrt(limit2.numpy()))
    grouped = isinstance(tree, GroupedTree)
    units = tree.tree if grouped else tree  # what the kd-tree returns: groups or points
    out_d = torch.full((len(qb), k), float("inf"), dtype=qb.dtype)
    out_i = torch.full((len(qb), k), -1, dtype=torch.int64)
    pending = torch.arange(len(qb))
    m = min(2 * (k + 1 + int(exclude_self)), units.n)
    per_group = k + int(exclude_self)  # the most points of one group that can be in an answer
    p_columns = p.t().contiguous()
    while pending.numel():
        rows_per_batch = max(1, _FALLBACK_CANDIDATES // (m * (per_group if grouped else 1)))
        unfinished = []
        for s in range(0, pending.numel(), rows_per_batch):
            rows = pending[s:s + rows_per_batch]
            bound = float(r[rows].max()) * (1 + 1e-12) + 1e-300  # the tree's bound is strict
            dd, uu = units.query(q64[rows.numpy()], k=m, distance_upper_bound=bound, workers=-1)
            dd = torch.from_numpy(np.asarray(dd).reshape(len(rows), m))
            uu = torch.from_numpy(np.asarray(uu).reshape(len(rows), m)).long()
            # complete: fewer than m units within the bound, or the m-th beyond the row's limit
            done = torch.isinf(dd[:, -1]) | (dd[:, -1] > r[rows]) | (m == units.n)
            unfinished.append(rows[~done])
            rows, uu = rows[done], uu[done]
            if grouped:
                uu = tree.expand_rows(uu, per_group)[1]
            cand = torch.where(uu < tree.n, uu, -1)
            d = mask_candidates(sq_dist_gathered(qb[rows], p_columns, cand.clamp(min=0)), cand, self_ids[rows, None],
                      radius2, exclude_self)
            out_d[rows], out_i[rows] = select_sorted(d, cand, k)
        pending = torch.cat(unfinished)
        m = min(4 * m, units.n)
    return out_d, out_i

"""Exact neighbor search without a dense Q x P matrix: scipy's cKDTree, or chunked brute force.

cKDTree ranks candidates by float64 distances; the reference ranks float32 (or float64) distances
computed by ``sq_dist`` with ties broken by index. To return exactly the reference's answer, each
query asks the tree for one candidate more than it needs, recomputes the candidates' distances with
``sq_dist`` in the input dtype, and sorts them by (distance, index). The answer is certified when
the first unseen point is farther, by more than the rounding error of both distances, than the last
selected one. The few queries that fail (ties or near-ties at the k-th neighbor, duplicated points)
are answered exactly from every point inside a slightly larger ball.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy.spatial import cKDTree

from ._distance import sq_dist

KDTREE_MAX_DIM = 8  # above this a kd-tree degrades towards brute force
_CHUNK_BYTES = 64 << 20  # memory cap of one brute-force chunk
_FALLBACK_CANDIDATES = 1 << 22  # candidates per batch of uncertified queries


def build_tree(points: torch.Tensor) -> cKDTree:
    """A kd-tree over ``(n, D)`` points (sliding-midpoint splits: built about 2x faster, queried as fast)."""
    return cKDTree(points.detach().double().numpy(), balanced_tree=False, compact_nodes=False)


def _rel_error(dim: int, dtype: torch.dtype) -> float:
    # Relative error bound of sq_dist (one rounding per subtraction, product and addition) plus
    # cKDTree's float64 distance, with a safety factor of 2.
    return 2.0 * (dim + 4) * (torch.finfo(dtype).eps + torch.finfo(torch.float64).eps)


def _select_sorted(d: torch.Tensor, idx: torch.Tensor, k: int):
    """Per row, the k smallest (d, idx) pairs ascending; rows with fewer are padded with inf / -1."""
    order = torch.argsort(idx, dim=1, stable=True)
    d, idx = d.gather(1, order), idx.gather(1, order)
    order = torch.argsort(d, dim=1, stable=True)
    d, idx = d.gather(1, order), idx.gather(1, order)
    n, m = d.shape
    out_d = torch.full((n, k), float("inf"), dtype=d.dtype)
    out_i = torch.full((n, k), -1, dtype=torch.int64)
    c = min(k, m)
    out_d[:, :c] = d[:, :c]
    out_i[:, :c] = torch.where(torch.isinf(d[:, :c]), -1, idx[:, :c])
    return out_d, out_i


def _mask(d, cand, rows, radius2, exclude_self):
    bad = cand < 0
    if exclude_self:
        bad = bad | (cand == rows)
    if radius2 is not None:
        bad = bad | (d > radius2)
    return d.masked_fill(bad, float("inf"))


def kdtree_search(q, p, tree, k, radius2, exclude_self, row_ids=None):
    """Exact k nearest of each row of ``q (nq, D)`` among ``p (n, D)`` (``tree`` built over ``p``).

    ``row_ids`` are the queries' own indices into ``p`` (for ``exclude_self``). Returns squared
    distances ``(nq, k)`` in the input dtype and int64 indices, padded with inf / -1.
    """
    nq, dim = q.shape
    n = p.shape[0]
    rows = torch.arange(nq)[:, None] if row_ids is None else row_ids[:, None]
    need = k + int(exclude_self)
    m = min(need + 1, n)  # one more than needed: it certifies the boundary
    rel = _rel_error(dim, q.dtype)
    bound = math.inf if radius2 is None else math.sqrt(radius2 * (1 + 4 * rel))
    q64 = q.detach().double().numpy()
    dd, ii = tree.query(q64, k=m, distance_upper_bound=bound, workers=-1)
    dd, ii = np.asarray(dd).reshape(nq, m), np.asarray(ii).reshape(nq, m)
    cand = torch.from_numpy(ii.astype(np.int64))
    cand[cand >= n] = -1
    d = sq_dist(q[:, None, :], p[cand.clamp(min=0)])
    d = _mask(d, cand, rows, radius2, exclude_self)
    out_d, out_i = _select_sorted(d, cand, k)

    if m == n:  # every point was a candidate
        return out_d, out_i
    # The first unseen point is at least this far (squared, float64).
    unseen = torch.from_numpy(dd[:, m - 1] ** 2)
    if radius2 is not None:
        unseen = torch.where(torch.isinf(unseen), radius2 * (1 + 4 * rel), unseen)
    last = out_d[:, k - 1].double()
    if radius2 is not None:
        last = last.clamp(max=radius2)
    certified = unseen * (1 - rel) > last * (1 + rel)
    bad_rows = torch.nonzero(~certified).flatten()
    if bad_rows.numel():
        limit = last[bad_rows] * (1 + rel) / (1 - rel) * (1 + 1e-9)
        fd, fi = _ball_fallback(q, p, tree, k, radius2, exclude_self, rows[bad_rows, 0], bad_rows, limit)
        out_d[bad_rows], out_i[bad_rows] = fd, fi
    return out_d, out_i


def _ball_fallback(q, p, tree, k, radius2, exclude_self, self_ids, bad_rows, limit2):
    """Exact answer for ``bad_rows`` from every point within ``sqrt(limit2)`` (float64) of them."""
    qb = q[bad_rows]
    if torch.isinf(limit2).any():  # no finite bound: fall back to brute force
        return brute_force_search(qb, p, k, radius2, exclude_self, self_ids)
    q64 = qb.detach().double().numpy()
    r = np.sqrt(limit2.numpy())
    counts = tree.query_ball_point(q64, r, return_length=True, workers=-1)
    out_d = torch.full((len(qb), k), float("inf"), dtype=q.dtype)
    out_i = torch.full((len(qb), k), -1, dtype=torch.int64)
    start = 0
    csum = np.cumsum(counts)
    while start < len(qb):
        base = csum[start - 1] if start else 0
        stop = max(start + 1, int(np.searchsorted(csum, base + _FALLBACK_CANDIDATES, side="right")))
        lists = tree.query_ball_point(q64[start:stop], r[start:stop], workers=-1)
        lens = torch.tensor([len(x) for x in lists], dtype=torch.int64)
        cand = torch.from_numpy(np.concatenate([np.asarray(x, dtype=np.int64) for x in lists]))
        rows = torch.repeat_interleave(torch.arange(stop - start), lens)
        d = sq_dist(qb[start:stop][rows], p[cand])
        d = _mask(d, cand, self_ids[start:stop][rows], radius2, exclude_self)
        # Sort by (row, distance, index) with stable sorts, least significant key first.
        order = torch.argsort(cand, stable=True)
        cand, d, rows = cand[order], d[order], rows[order]
        order = torch.argsort(d, stable=True)
        cand, d, rows = cand[order], d[order], rows[order]
        order = torch.argsort(rows, stable=True)
        cand, d, rows = cand[order], d[order], rows[order]
        first = torch.cumsum(lens, 0) - lens
        rank = torch.arange(len(rows)) - first[rows]
        keep = (rank < k) & ~torch.isinf(d)
        out_d[start + rows[keep], rank[keep]] = d[keep]
        out_i[start + rows[keep], rank[keep]] = cand[keep]
        start = stop
    return out_d, out_i


def brute_force_search(q, p, k, radius2, exclude_self, row_ids=None):
    """Exact search by chunks of queries against all of ``p``; any D, memory capped."""
    nq, dim = q.shape
    n = p.shape[0]
    rows_all = torch.arange(nq, device=q.device) if row_ids is None else row_ids
    out_d = torch.full((nq, k), float("inf"), dtype=q.dtype, device=q.device)
    out_i = torch.full((nq, k), -1, dtype=torch.int64, device=q.device)
    if n == 0:
        return out_d, out_i
    chunk = max(1, _CHUNK_BYTES // (max(n, 1) * dim * q.element_size()))
    cand = torch.arange(n, device=q.device)[None, :]
    for s in range(0, nq, chunk):
        d = sq_dist(q[s:s + chunk, None, :], p[None, :, :])
        d = _mask(d, cand.expand_as(d), rows_all[s:s + chunk, None], radius2, exclude_self)
        d_sorted, order = torch.sort(d, dim=1, stable=True)
        c = min(k, n)
        out_d[s:s + chunk, :c] = d_sorted[:, :c]
        out_i[s:s + chunk, :c] = torch.where(torch.isinf(d_sorted[:, :c]), -1, order[:, :c])
    return out_d, out_i

"""Exact brute-force neighbor search for any D, on any device: a GEMM ranks, ``sq_dist`` decides.

The reference evaluates ``sq_dist`` (the input dtype, coordinate by coordinate) for every
query-point pair and sorts each row. Done literally that is D passes over a Q x P matrix and a
full sort per query: 7 s for kNN over 2 x 6,000 points in 16 dimensions (DGCNN's EdgeConv
searches feature space). Here, per chunk of queries:

1. ``approx = |q'|^2 + |p'|^2 - 2 q' . p'`` for coordinates centered on the points' mean: one
   GEMM, in float32 for float32 coordinates (2x faster than float64 on CPU), in float64 for
   float64 ones and wherever torch's matmul precision settings allow TF32 / bf16 (float64 has no
   such mode) or the squares approach float32's range (``_gemm_dtype``);
2. the ``m = 2k + 8`` smallest ``approx`` of each row are the candidates; ``sq_dist`` of those,
   ranked by (distance, index), is the answer if it is certified:
3. ``|approx - sq_dist|`` is at most ``err_i = 2 (D + 6) (eps_dtype + eps_gemm) reach_i^2`` (plus
   a subnormal term) for every point, with ``reach_i = |q'_i| + max_j |p'_j|`` bounding the
   magnitudes in both formulas. The k-th exact distance is at most the k-th ``approx`` plus
   ``err_i``, so every point of the answer has ``approx <= kth + 2 err_i``: when the m-th
   ``approx`` exceeds that, no point outside the candidates can enter. Other rows (ties and
   near-ties: lattices, repeated points) try again with 4x more candidates, ending at every point.

Points that repeat many times (more than the first candidates, a ReLU's zero feature vectors)
would take every copy that way: those clouds are searched one point per group of equal points
and each group expanded to its lowest indices (``_point_groups``).

Memory: one chunk's approx matrix (4 MiB, so it stays in cache from the GEMM to the top-k) and
the candidates of a batch of rows, about 4M entries.

``exact_rows_search`` is the literal method, kept for coordinates whose squares overflow float64
and as an independent check in the tests.
"""
from __future__ import annotations

import torch

from .._matmul_precision import ieee_float32_matmul, no_autocast
from ._distance import sq_dist, sq_dist_gathered
from ._point_groups import PointGroups, repeats_are_costly, sorted_hashes
from ._select import mask_candidates, select_sorted

_CHUNK_BYTES = 64 << 20  # memory cap of one chunk's query x point matrix (the literal method)
_APPROX_BYTES = 4 << 20  # one chunk's approx matrix: stays in cache from the GEMM to the top-k
_DECIDE_ENTRIES = 1 << 22  # candidates decided together (their distances and sort keys: ~100 MB)


def _padded(nq: int, k: int, like: torch.Tensor):
    return (torch.full((nq, k), float("inf"), dtype=like.dtype, device=like.device),
            torch.full((nq, k), -1, dtype=torch.int64, device=like.device))


def exact_rows_search(q, p, k, radius2, exclude_self, row_ids=None):
    """Every point's ``sq_dist`` to each query, by chunks of queries, each row sorted."""
    nq, dim = q.shape
    n = p.shape[0]
    rows_all = torch.arange(nq, device=q.device) if row_ids is None else row_ids
    out_d, out_i = _padded(nq, k, q)
    if n == 0:
        return out_d, out_i
    chunk = max(1, _CHUNK_BYTES // (n * dim * q.element_size()))
    cand = torch.arange(n, device=q.device)[None, :]
    for s in range(0, nq, chunk):
        d = sq_dist(q[s:s + chunk, None, :], p[None, :, :])
        d = mask_candidates(d, cand.expand_as(d), rows_all[s:s + chunk, None], radius2, exclude_self)
        out_d[s:s + chunk], out_i[s:s + chunk] = select_sorted(d, cand.expand_as(d), k)
    return out_d, out_i


def _gemm_dtype(q: torch.Tensor, reach: torch.Tensor) -> torch.dtype:
    """float32 for float32 coordinates where products round as IEEE float32 and the squares stay
    far inside its range (2x faster than float64 on CPU), else float64."""
    if q.dtype == torch.float32 and ieee_float32_matmul(q.device):
        if float(reach.max()) ** 2 < torch.finfo(torch.float32).max / 64:
            return torch.float32
    return torch.float64


def brute_force_search(q, p, k, radius2, exclude_self, row_ids=None):
    """Exact k nearest (within ``radius2`` when given) of each row of ``q (nq, D)`` among ``p (n, D)``.

    ``row_ids``: each query's own index in ``p`` for ``exclude_self`` (default: its row). Returns
    squared distances ``(nq, k)`` ascending, ties by index, and int64 indices, inf / -1 padded.
    """
    nq, n = q.shape[0], p.shape[0]
    if n == 0 or nq == 0:
        return _padded(nq, k, q)
    rows_all = torch.arange(nq, device=q.device) if row_ids is None else row_ids
    # Runs of equal points longer than the first candidates would each widen to every point.
    if n > _first_candidates(k):
        hashes, order = sorted_hashes(p)
        if repeats_are_costly(hashes, _first_candidates(k)):
            return _grouped_search(q, p, PointGroups(p, hashes, order), k, radius2, exclude_self, rows_all)
    return _certified_search(q, p, k, radius2, exclude_self, rows_all)


def _first_candidates(k: int) -> int:
    return 2 * k + 8


def _grouped_search(q, p, groups, k, radius2, exclude_self, rows_all):
    """The search over one point per group (``_point_groups``), each group then expanded."""
    keep = k + int(exclude_self)  # the query's own point may be one of a group's lowest
    g_d, g_i = _certified_search(q, groups.representatives, keep, radius2, False, rows_all)
    out_d, out_i = _padded(q.shape[0], k, q)
    rows_per_batch = max(1, _DECIDE_ENTRIES // max(1, keep * keep))
    for s in range(0, q.shape[0], rows_per_batch):
        found = g_i[s:s + rows_per_batch]
        column, point = groups.expand_rows(torch.where(found < 0, groups.num_groups, found), keep)
        cand = torch.where(point < groups.n, point, -1)
        d = mask_candidates(g_d[s:s + rows_per_batch].gather(1, column), cand, rows_all[s:s + rows_per_batch, None],
                            radius2, exclude_self)
        out_d[s:s + rows_per_batch], out_i[s:s + rows_per_batch] = select_sorted(d, cand, k)
    return out_d, out_i


def _certified_search(q, p, k, radius2, exclude_self, rows_all):
    """The GEMM-ranked, certified search of the module docstring."""
    nq, dim = q.shape
    n = p.shape[0]
    center = p.double().mean(0)
    p64, q64 = p.double() - center, q.double() - center
    reach = q64.norm(dim=1) + p64.norm(dim=1).max()
    gemm = _gemm_dtype(q, reach)
    eps = torch.finfo(q.dtype).eps + torch.finfo(gemm).eps
    tiny = torch.finfo(q.dtype).smallest_normal * torch.finfo(q.dtype).eps
    err = 2 * (dim + 6) * (eps * reach.square() + tiny)
    if not bool(torch.isfinite(err).all()):  # squares beyond float64's range
        return exact_rows_search(q, p, k, radius2, exclude_self, rows_all)
    # one product gives approx: [q', 1, |q'|^2] . [-2 p', |p'|^2, 1] (no broadcast adds over the matrix)
    q_rows = torch.cat([q64, torch.ones_like(q64[:, :1]), q64.square().sum(1, keepdim=True)], 1).to(gemm)
    p_rows = torch.cat([-2 * p64, p64.square().sum(1, keepdim=True), torch.ones_like(p64[:, :1])], 1).to(gemm)
    p_columns = p.t().contiguous()
    out_d, out_i = _padded(nq, k, q)
    # the approx matrix in chunks of rows that stay in cache from the GEMM to the top-k
    chunk = max(1, _APPROX_BYTES // (q_rows.element_size() * n))
    pending = torch.arange(nq, device=q.device)
    m = min(n, _first_candidates(k))
    while pending.numel():
        unfinished = []
        # Rows in batches of about _DECIDE_ENTRIES candidates (memory stays bounded as m grows
        # towards n), each chunk's top-k written into the batch's buffers: small tensors kept from
        # chunk to chunk pinned the freed approx matrices in glibc's heap (50K queries in 64-D:
        # 4.3 GB resident for 13 MB of points).
        batch = max(chunk, _DECIDE_ENTRIES // m)
        for b in range(0, pending.numel(), batch):
            rows = pending[b:b + batch]
            vals = torch.empty((len(rows), m), dtype=gemm, device=q.device)
            cand = torch.empty((len(rows), m), dtype=torch.int64, device=q.device)
            for s in range(0, len(rows), chunk):
                part = rows[s:s + chunk]
                with no_autocast(q.device):  # the error bound is float32's (or float64's)
                    approx = q_rows[part] @ p_rows.t()
                if exclude_self:
                    own = rows_all[part]
                    inside = torch.nonzero((own >= 0) & (own < n)).flatten()
                    approx[inside, own[inside]] = float("inf")
                if radius2 is not None:  # beyond the radius by more than the error: never in the answer
                    approx.masked_fill_(approx > radius2 + err[part, None].to(gemm), float("inf"))
                torch.topk(approx, m, dim=1, largest=False, sorted=True, out=(vals[s:s + chunk], cand[s:s + chunk]))
            if m < n:
                limit = vals[:, min(k, m) - 1].double() + 2 * err[rows]
                done = torch.isinf(vals[:, -1]) | (vals[:, -1].double() > limit)
                unfinished.append(rows[~done])
                rows, vals, cand = rows[done], vals[done], cand[done]
            cand = torch.where(torch.isinf(vals), -1, cand)  # -1: excluded
            # exact distances of the finished rows, in few large ops rather than many small
            d = sq_dist_gathered(q[rows], p_columns, cand.clamp(min=0))
            d = mask_candidates(d, cand, rows_all[rows, None], radius2, exclude_self)
            out_d[rows], out_i[rows] = select_sorted(d, cand, k)
        pending = torch.cat(unfinished) if unfinished else pending[:0]
        m = min(n, 4 * m)
    return out_d, out_i

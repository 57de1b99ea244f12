"""Exact selection of the K points with the smallest Gaussian exponent ``m`` (``select="aniso"``).

No dense Q x P matrix on CPU: ``m_ij >= c * |q_i - p_j|^2``, with ``c`` the smallest eigenvalue
of ``R_j^T diag(sigma_j) R_j`` over the cloud, less a rounding margin (``exponent_lower_bound``). Each query takes its ``c`` Euclidean
nearest points from a kd-tree (c = 2K first), ranks them by (m, index) and keeps K; the answer is
certified when ``c`` times the squared distance of the c-th candidate (a bound on every
unseen point's m) exceeds the K-th m, with a margin for rounding. Uncertified queries try again
with 4x more candidates, ending at the whole cloud. Elsewhere (CUDA, or a degenerate cloud with
``c <= 0``) the exponents are evaluated densely in chunks of queries, memory capped.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .._backend import backend_for
from ..neighbors._cpu import build_tree
from ._exponent import exponent_lower_bound, gaussian_exponent

_CHUNK_ELEMENTS = 1 << 22  # query x point pairs per dense chunk


def _rank(m: torch.Tensor, cand: torch.Tensor, K: int):
    """Per row, the K smallest (m, index) pairs: indices (n, K) padded with -1, and the K-th m."""
    order = torch.argsort(cand, dim=1, stable=True)
    m, cand = m.gather(1, order), cand.gather(1, order)
    order = torch.argsort(m, dim=1, stable=True)
    m, cand = m.gather(1, order), cand.gather(1, order)
    n, c = m.shape
    idx = torch.full((n, K), -1, dtype=torch.int64, device=m.device)
    kk = min(K, c)
    idx[:, :kk] = torch.where(torch.isinf(m[:, :kk]), -1, cand[:, :kk])
    kth = m[:, K - 1] if c >= K else torch.full((n,), float("inf"), dtype=m.dtype, device=m.device)
    return idx, kth


def _select_dense(q, p, sigma, R, K):
    """Exact: every point's exponent, in chunks of queries."""
    n = p.shape[0]
    out = torch.full((q.shape[0], K), -1, dtype=torch.int64, device=q.device)
    if n == 0:
        return out
    cand = torch.arange(n, device=q.device)[None, :]
    step = max(1, _CHUNK_ELEMENTS // (n * 16))
    for s in range(0, q.shape[0], step):
        m = gaussian_exponent(q[s:s + step, None, :] - p[None], sigma[None], R[None])
        out[s:s + step], _ = _rank(m, cand.expand_as(m), K)
    return out


def _select_tree(q, p, sigma, R, K, bound):
    """Exact on CPU with a kd-tree over ``p``; ``bound * |d|^2`` bounds every computed m below."""
    n = p.shape[0]
    tree = build_tree(p)
    out = torch.full((q.shape[0], K), -1, dtype=torch.int64)
    rows = torch.arange(q.shape[0])
    c = min(2 * K, n)
    q64 = q.double().numpy()
    while rows.numel():
        step = max(1, _CHUNK_ELEMENTS // (c * 16))
        pending = []
        for s in range(0, rows.numel(), step):
            r = rows[s:s + step]
            dd, ii = tree.query(q64[r.numpy()], k=c, workers=-1)
            dd, ii = np.asarray(dd).reshape(len(r), c), np.asarray(ii).reshape(len(r), c)
            cand = torch.from_numpy(ii).to(torch.int64)
            m = gaussian_exponent(q[r, None, :] - p[cand], sigma[cand], R[cand])
            idx, kth = _rank(m, cand, K)
            if c == n:
                certified = torch.ones(len(r), dtype=torch.bool)
            else:
                unseen = bound * torch.from_numpy(dd[:, -1] ** 2) * (1 - 1e-12)
                certified = unseen > kth.double()
            out[r[certified]] = idx[certified]
            pending.append(r[~certified])
        rows = torch.cat(pending)
        c = min(4 * c, n)
    return out


@torch.no_grad()
def select_aniso(q, p, sigma, R, K, p_lengths):
    """Indices ``(B, Q, K)`` of the K smallest exponents (ties to the lower index), -1 padded."""
    B, Q, _ = q.shape
    idx = torch.full((B, Q, K), -1, dtype=torch.int64, device=q.device)
    use_tree = backend_for(q.device) == "torch" and q.device.type == "cpu"
    for b, n in enumerate(p_lengths.tolist()):
        if n == 0 or Q == 0:
            continue
        qb, pb, sb, Rb = q[b], p[b, :n], sigma[b, :n], R[b, :n]
        bound = exponent_lower_bound(sb, Rb) if use_tree else 0.0
        if bound > 0 and math.isfinite(bound):
            idx[b] = _select_tree(qb, pb, sb, Rb, K, bound)
        else:
            idx[b] = _select_dense(qb, pb, sb, Rb, K)
    return idx

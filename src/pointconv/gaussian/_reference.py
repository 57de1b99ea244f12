"""Plain PyTorch reference of knn_aggregate_aniso: dense exponents, a stable sort, gathers.

The "Plain Pytorch" of the cuda_knn_aggregate package, with its three defects fixed (gradients of
``w_out`` and ``dists``, every second-order path, padding when P < K). O(B * Q * P) memory: the
oracle and the baseline, not a fast path. Differentiable to any order by autograd.
"""
from __future__ import annotations

import torch

from ..neighbors._distance import sq_dist
from ._exponent import gaussian_exponent


def knn_aggregate_aniso_reference(q, p, f, sigma, R, K, *, p_lengths=None, select="aniso"):
    B, Q, _ = q.shape
    P = p.shape[1]
    m_all = gaussian_exponent(q[:, :, None, :] - p[:, None, :, :], sigma[:, None], R[:, None])  # (B, Q, P)
    key = m_all if select == "aniso" else sq_dist(q[:, :, None, :], p[:, None, :, :])
    invalid = torch.zeros((B, 1, P), dtype=torch.bool, device=q.device)
    if p_lengths is not None:
        invalid = torch.arange(P, device=q.device)[None, None, :] >= p_lengths[:, None, None]
    # an exponent past the dtype's range counts as missing: inf, or NaN where q - p itself overflowed
    # (0 * inf in R d); torch.sort would put NaN last, but as a neighbor it would be garbage
    key = key.detach().masked_fill(invalid | key.isnan(), float("inf"))
    key_sorted, order = torch.sort(key, dim=-1, stable=True)  # ties: lower index first
    c = min(K, P)
    idx = torch.full((B, Q, K), -1, dtype=torch.int64, device=q.device)
    idx[..., :c] = torch.where(torch.isinf(key_sorted[..., :c]), -1, order[..., :c])
    valid = idx >= 0
    safe = idx.clamp(min=0)
    m = torch.gather(m_all, 2, safe)
    key_sel = m if select == "aniso" else torch.gather(sq_dist(q[:, :, None, :], p[:, None, :, :]), 2, safe)
    w = torch.where(valid, torch.exp(-m), torch.zeros_like(m))
    dists = torch.where(valid, key_sel, torch.full_like(key_sel, float("inf")))
    f_nbr = f[torch.arange(B, device=q.device)[:, None, None], safe]  # (B, Q, K, F)
    f_out = (w[..., None] * f_nbr).sum(2).to(f.dtype)  # fp16 / bf16 features: summed in w's dtype
    return f_out, w, dists, idx


def knn_aggregate_iso_reference(q, p, f, sigma, K, *, p_lengths=None, select="aniso"):
    """Isotropic: ``sigma (B, P, 1)``; the aniso reference with ``R = I``."""
    B, P, _ = p.shape
    eye = torch.eye(3, dtype=p.dtype, device=p.device).expand(B, P, 3, 3)
    return knn_aggregate_aniso_reference(q, p, f, sigma.expand(B, P, 3), eye, K, p_lengths=p_lengths,
                                         select=select)

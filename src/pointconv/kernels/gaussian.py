"""Triton kernel: the K points with the smallest Gaussian exponent m of each query (brute force).

A program per block of queries scans its cloud in tiles of KP points, evaluates
``m = sum_a sigma_a (sum_b R_ab d_b)^2`` in the order of ``gaussian/_exponent.py`` without FMA
(bitwise the torch values), and keeps the K best (m, index) pairs with the packed-key top-k of
``kernels/knn.py``. Exact, deterministic, no Q x P memory.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .knn import INF_KEY, _kp, _merge, _pack, _store


@triton.jit
def _aniso_select_kernel(q_ptr, p_ptr, s_ptr, r_ptr, plen_ptr, out_m_ptr, out_i_ptr, Q, P,
                         K: tl.constexpr, KP: tl.constexpr, BQ: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    npts = tl.load(plen_ptr + b)
    rows = pid * BQ + tl.arange(0, BQ)
    row_mask = rows < Q
    qb = q_ptr + b * Q * 3 + rows.to(tl.int64) * 3
    qx = tl.load(qb, mask=row_mask, other=0.0)
    qy = tl.load(qb + 1, mask=row_mask, other=0.0)
    qz = tl.load(qb + 2, mask=row_mask, other=0.0)
    cols = tl.arange(0, KP)
    best = tl.full((BQ, KP), INF_KEY, tl.int64)
    for start in range(0, npts, KP):
        offs = start + cols
        pm = offs < npts
        o64 = b * P + offs.to(tl.int64)
        dx = qx[:, None] - tl.load(p_ptr + o64 * 3, mask=pm, other=0.0)[None, :]
        dy = qy[:, None] - tl.load(p_ptr + o64 * 3 + 1, mask=pm, other=0.0)[None, :]
        dz = qz[:, None] - tl.load(p_ptr + o64 * 3 + 2, mask=pm, other=0.0)[None, :]
        for a in tl.static_range(3):
            r0 = tl.load(r_ptr + o64 * 9 + 3 * a, mask=pm, other=0.0)[None, :]
            r1 = tl.load(r_ptr + o64 * 9 + 3 * a + 1, mask=pm, other=0.0)[None, :]
            r2 = tl.load(r_ptr + o64 * 9 + 3 * a + 2, mask=pm, other=0.0)[None, :]
            sa = tl.load(s_ptr + o64 * 3 + a, mask=pm, other=0.0)[None, :]
            u = r0 * dx + r1 * dy + r2 * dz
            t = sa * (u * u)
            if a == 0:
                m = t
            else:
                m = m + t
        m = tl.where(pm[None, :] & row_mask[:, None], m, float("inf"))
        best = _merge(best, _pack(m, offs[None, :]), K, KP, BQ)
    _store(best, out_m_ptr + b * Q * K, out_i_ptr + b * Q * K, rows, row_mask, K, KP)


def select_aniso(q, p, sigma, R, K, p_lengths):
    """``(B, Q, K)`` int64 indices of the K smallest exponents (ties to the lower index), -1 padded."""
    B, Q, _ = q.shape
    P = p.shape[1]
    out_m = torch.full((B, Q, K), float("inf"), dtype=torch.float32, device=q.device)
    out_i = torch.full((B, Q, K), -1, dtype=torch.int64, device=q.device)
    if B == 0 or Q == 0 or P == 0:
        return out_i
    KP = _kp(K)
    BQ = 32 if KP <= 32 else 16
    _aniso_select_kernel[(triton.cdiv(Q, BQ), B)](
        q.contiguous(), p.contiguous(), sigma.contiguous(), R.contiguous(), p_lengths.contiguous(),
        out_m, out_i, Q, P, K=K, KP=KP, BQ=BQ, enable_fp_fusion=False)
    return out_i

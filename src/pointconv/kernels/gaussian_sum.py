"""Triton kernels: the anisotropic Gaussian weighted sum over GIVEN neighbors, and its backward.

For query i, neighbor slot k and its point j = idx[i, k] (``d = q_i - p_j``, ``u = R_j d``,
``m = sum_a sigma_j[a] u_a**2``, ``w = exp(-m)``; ``gaussian/_exponent.py``'s order, no FMA):

  forward        m[i, k], f_out[i] = sum_k w f_j                     a program per block of queries
  query pass     gm[i, k] = g_m - w (g_w + g_fout[i] . f_j)          a program per block of queries
                 g_q[i]   = sum_k gm * dm/dd,  dm/dd = 2 R^T (sigma * u)
  point pass     g_p[j] = -sum gm dm/dd,  g_sigma[j] = sum gm u**2,   a program per point, over
                 g_R[j] = sum gm 2 (sigma * u) d^T,  g_f[j] = sum w g_fout[i]   its (i, k) pairs

The point pass reads the pairs of each point from a stable sort of the flat neighbor list, so
every sum runs in one fixed order: no atomics, the same bits on every run. Coordinates may be
float32 or float64 (sums in that precision); features and their cotangents any float dtype.
``(B, Q, K, F)`` never exists: the only per-pair buffer is ``gm (B, Q, K)``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import accumulator, channel_block, on_tensor_device


@triton.jit
def _geometry(q_ptr, p_ptr, s_ptr, r_ptr, qrow, j, ok, ACC: tl.constexpr):
    """For pairs (query row ``qrow``, point row ``j``): ``d``, ``u = R d``, ``sigma``, ``R`` and ``m``
    (m summed in the order of ``gaussian_exponent``)."""
    q3 = q_ptr + qrow * 3
    p3 = p_ptr + j * 3
    dx = tl.load(q3, mask=ok, other=0.0).to(ACC) - tl.load(p3, mask=ok, other=0.0).to(ACC)
    dy = tl.load(q3 + 1, mask=ok, other=0.0).to(ACC) - tl.load(p3 + 1, mask=ok, other=0.0).to(ACC)
    dz = tl.load(q3 + 2, mask=ok, other=0.0).to(ACC) - tl.load(p3 + 2, mask=ok, other=0.0).to(ACC)
    r9 = r_ptr + j * 9
    r00 = tl.load(r9, mask=ok, other=0.0).to(ACC)
    r01 = tl.load(r9 + 1, mask=ok, other=0.0).to(ACC)
    r02 = tl.load(r9 + 2, mask=ok, other=0.0).to(ACC)
    r10 = tl.load(r9 + 3, mask=ok, other=0.0).to(ACC)
    r11 = tl.load(r9 + 4, mask=ok, other=0.0).to(ACC)
    r12 = tl.load(r9 + 5, mask=ok, other=0.0).to(ACC)
    r20 = tl.load(r9 + 6, mask=ok, other=0.0).to(ACC)
    r21 = tl.load(r9 + 7, mask=ok, other=0.0).to(ACC)
    r22 = tl.load(r9 + 8, mask=ok, other=0.0).to(ACC)
    s0 = tl.load(s_ptr + j * 3, mask=ok, other=0.0).to(ACC)
    s1 = tl.load(s_ptr + j * 3 + 1, mask=ok, other=0.0).to(ACC)
    s2 = tl.load(s_ptr + j * 3 + 2, mask=ok, other=0.0).to(ACC)
    u0 = r00 * dx + r01 * dy + r02 * dz
    u1 = r10 * dx + r11 * dy + r12 * dz
    u2 = r20 * dx + r21 * dy + r22 * dz
    m = s0 * (u0 * u0) + s1 * (u1 * u1) + s2 * (u2 * u2)
    return dx, dy, dz, u0, u1, u2, s0, s1, s2, r00, r01, r02, r10, r11, r12, r20, r21, r22, m


@triton.jit
def _dm_dd(g):
    """From ``_geometry``'s ``g``: ``t = 2 sigma * u`` and ``dm/dd = R^T t``."""
    t0 = 2 * g[6] * g[3]
    t1 = 2 * g[7] * g[4]
    t2 = 2 * g[8] * g[5]
    return (t0, t1, t2, g[9] * t0 + g[12] * t1 + g[15] * t2, g[10] * t0 + g[13] * t1 + g[16] * t2,
            g[11] * t0 + g[14] * t1 + g[17] * t2)


@triton.jit
def _cotangent_dots(gw_ptr, gf_ptr, f_ptr, af_ptr, slot, qrow, jrow, ok, F, HAS_GW: tl.constexpr,
                    HAS_GF: tl.constexpr, HAS_AF: tl.constexpr, ACC: tl.constexpr, BQ: tl.constexpr,
                    BF: tl.constexpr):
    """Per pair: the cotangent reaching w, ``g_w + g_fout[i] . f_j``, and ``g_fout[i] . a_f[j]``."""
    ch = tl.arange(0, BF)
    gw_total = tl.zeros((BQ,), ACC)
    t_dot = tl.zeros((BQ,), ACC)
    if HAS_GW:
        gw_total += tl.load(gw_ptr + slot, mask=ok, other=0.0).to(ACC)
    if HAS_GF:
        for f0 in range(0, F, BF):
            cm = ok[:, None] & (f0 + ch < F)[None, :]
            gf = tl.load(gf_ptr + qrow[:, None] * F + f0 + ch[None, :], mask=cm, other=0.0).to(ACC)
            fk = tl.load(f_ptr + jrow[:, None] * F + f0 + ch[None, :], mask=cm, other=0.0).to(ACC)
            gw_total += tl.sum(gf * fk, axis=1)
            if HAS_AF:
                ak = tl.load(af_ptr + jrow[:, None] * F + f0 + ch[None, :], mask=cm, other=0.0).to(ACC)
                t_dot += tl.sum(gf * ak, axis=1)
    return gw_total, t_dot


@triton.jit
def _store_sums3(ptr, x, y, z):
    """``ptr[0:3] = (sum x, sum y, sum z)``: per-lane partial sums reduced in one fixed order."""
    tl.store(ptr, tl.sum(x, axis=0))
    tl.store(ptr + 1, tl.sum(y, axis=0))
    tl.store(ptr + 2, tl.sum(z, axis=0))


@triton.jit
def _segment_rows_sum(order_ptr, s_begin, s_end, weight_ptr, rows_ptr, out_ptr, F, K,
                      ACC: tl.constexpr, BT: tl.constexpr, BF: tl.constexpr):
    """``out[0:F] = sum over the pairs t of one point's segment of weight[pos_t] * rows[pos_t // K]``."""
    lanes = tl.arange(0, BT)
    ch = tl.arange(0, BF)
    for f0 in range(0, F, BF):
        cmask = f0 + ch < F
        acc = tl.zeros((BF,), ACC)
        for t0 in range(s_begin, s_end, BT):
            t = t0 + lanes
            ok = t < s_end
            pos = tl.load(order_ptr + t, mask=ok, other=0)
            wt = tl.load(weight_ptr + pos, mask=ok, other=0.0).to(ACC)
            rows = tl.load(rows_ptr + (pos // K)[:, None] * F + f0 + ch[None, :], mask=ok[:, None] & cmask[None, :],
                           other=0.0).to(ACC)
            acc += tl.sum(wt[:, None] * rows, axis=0)
        tl.store(out_ptr + f0 + ch, acc, mask=cmask)


@triton.jit
def _forward_kernel(q_ptr, p_ptr, s_ptr, r_ptr, f_ptr, idx_ptr, m_ptr, out_ptr, Q, P, F, K,
                    ACC: tl.constexpr, BQ: tl.constexpr, BF: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BQ + tl.arange(0, BQ)
    rmask = rows < Q
    qrow = b * Q + rows.to(tl.int64)
    for k in range(0, K):
        j = tl.load(idx_ptr + qrow * K + k, mask=rmask, other=-1)
        ok = rmask & (j >= 0)
        g = _geometry(q_ptr, p_ptr, s_ptr, r_ptr, qrow, b * P + j, ok, ACC)
        tl.store(m_ptr + qrow * K + k, tl.where(ok, g[18], float("inf")), mask=rmask)
    ch = tl.arange(0, BF)
    for f0 in range(0, F, BF):
        cmask = f0 + ch < F
        acc = tl.zeros((BQ, BF), ACC)
        for k in range(0, K):  # neighbors in slot order, as the weighted sums of _weighted_sum
            j = tl.load(idx_ptr + qrow * K + k, mask=rmask, other=-1)
            ok = rmask & (j >= 0)
            g = _geometry(q_ptr, p_ptr, s_ptr, r_ptr, qrow, b * P + j, ok, ACC)
            w = tl.where(ok, tl.exp(-g[18]), 0.0)
            fk = tl.load(f_ptr + (b * P + j)[:, None] * F + f0 + ch[None, :], mask=ok[:, None] & cmask[None, :],
                         other=0.0)
            acc += w[:, None] * fk.to(ACC)
        tl.store(out_ptr + qrow[:, None] * F + f0 + ch[None, :], acc, mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _query_grad_kernel(q_ptr, p_ptr, s_ptr, r_ptr, f_ptr, idx_ptr, w_ptr, gf_ptr, gw_ptr, gm_ptr,
                       gm_out_ptr, gq_ptr, Q, P, F, K, HAS_GF: tl.constexpr, HAS_GW: tl.constexpr,
                       HAS_GM: tl.constexpr, ACC: tl.constexpr, BQ: tl.constexpr, BF: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BQ + tl.arange(0, BQ)
    rmask = rows < Q
    qrow = b * Q + rows.to(tl.int64)
    gqx = tl.zeros((BQ,), ACC)
    gqy = tl.zeros((BQ,), ACC)
    gqz = tl.zeros((BQ,), ACC)
    for k in range(0, K):
        slot = qrow * K + k
        j = tl.load(idx_ptr + slot, mask=rmask, other=-1)
        ok = rmask & (j >= 0)
        jrow = b * P + j
        gw_total = _cotangent_dots(gw_ptr, gf_ptr, f_ptr, f_ptr, slot, qrow, jrow, ok, F, HAS_GW, HAS_GF, False,
                                   ACC, BQ, BF)[0]
        gm = -tl.load(w_ptr + slot, mask=ok, other=0.0).to(ACC) * gw_total
        if HAS_GM:
            gm += tl.load(gm_ptr + slot, mask=ok, other=0.0).to(ACC)
        gm = tl.where(ok, gm, 0.0)
        tl.store(gm_out_ptr + slot, gm, mask=rmask)
        g = _geometry(q_ptr, p_ptr, s_ptr, r_ptr, qrow, jrow, ok, ACC)
        v = _dm_dd(g)
        gqx += gm * v[3]
        gqy += gm * v[4]
        gqz += gm * v[5]
    tl.store(gq_ptr + qrow * 3, gqx, mask=rmask)
    tl.store(gq_ptr + qrow * 3 + 1, gqy, mask=rmask)
    tl.store(gq_ptr + qrow * 3 + 2, gqz, mask=rmask)


@triton.jit
def _point_grad_kernel(order_ptr, start_ptr, q_ptr, p_ptr, s_ptr, r_ptr, w_ptr, gm_ptr, gf_ptr,
                       gp_ptr, gs_ptr, gr_ptr, gfeat_ptr, F, K, NEED_F: tl.constexpr,
                       ACC: tl.constexpr, BT: tl.constexpr, BF: tl.constexpr):
    jrow = tl.program_id(0).to(tl.int64)
    s_begin = tl.load(start_ptr + jrow)
    s_end = tl.load(start_ptr + jrow + 1)
    lanes = tl.arange(0, BT)
    # per-lane partial sums, reduced once at the end: a fixed order
    ap0 = tl.zeros((BT,), ACC)
    ap1 = tl.zeros((BT,), ACC)
    ap2 = tl.zeros((BT,), ACC)
    as0 = tl.zeros((BT,), ACC)
    as1 = tl.zeros((BT,), ACC)
    as2 = tl.zeros((BT,), ACC)
    ar00 = tl.zeros((BT,), ACC)
    ar01 = tl.zeros((BT,), ACC)
    ar02 = tl.zeros((BT,), ACC)
    ar10 = tl.zeros((BT,), ACC)
    ar11 = tl.zeros((BT,), ACC)
    ar12 = tl.zeros((BT,), ACC)
    ar20 = tl.zeros((BT,), ACC)
    ar21 = tl.zeros((BT,), ACC)
    ar22 = tl.zeros((BT,), ACC)
    for t0 in range(s_begin, s_end, BT):
        t = t0 + lanes
        ok = t < s_end
        pos = tl.load(order_ptr + t, mask=ok, other=0)  # flat (query row, slot) position
        gm = tl.load(gm_ptr + pos, mask=ok, other=0.0).to(ACC)
        g = _geometry(q_ptr, p_ptr, s_ptr, r_ptr, pos // K, jrow + 0 * pos, ok, ACC)
        v = _dm_dd(g)  # dm/dR = t d^T
        ap0 -= gm * v[3]
        ap1 -= gm * v[4]
        ap2 -= gm * v[5]
        as0 += gm * (g[3] * g[3])
        as1 += gm * (g[4] * g[4])
        as2 += gm * (g[5] * g[5])
        ar00 += gm * v[0] * g[0]
        ar01 += gm * v[0] * g[1]
        ar02 += gm * v[0] * g[2]
        ar10 += gm * v[1] * g[0]
        ar11 += gm * v[1] * g[1]
        ar12 += gm * v[1] * g[2]
        ar20 += gm * v[2] * g[0]
        ar21 += gm * v[2] * g[1]
        ar22 += gm * v[2] * g[2]
    _store_sums3(gp_ptr + jrow * 3, ap0, ap1, ap2)
    _store_sums3(gs_ptr + jrow * 3, as0, as1, as2)
    _store_sums3(gr_ptr + jrow * 9, ar00, ar01, ar02)
    _store_sums3(gr_ptr + jrow * 9 + 3, ar10, ar11, ar12)
    _store_sums3(gr_ptr + jrow * 9 + 6, ar20, ar21, ar22)
    if NEED_F:  # g_f[j] = sum over j's pairs of w * g_fout[query]
        _segment_rows_sum(order_ptr, s_begin, s_end, w_ptr, gf_ptr, gfeat_ptr + jrow * F, F, K, ACC, BT, BF)


def pointer(t, stand_in):
    """``t`` contiguous, or ``stand_in`` for an absent tensor (a kernel switched off at compile time
    never reads it)."""
    return stand_in if t is None else t.contiguous()


def point_segments(idx: torch.Tensor, P: int):
    """``(order, start)``: the flat (query row, slot) positions of the pairs sorted by point (a stable
    sort, so each point's pairs keep their order), and where each of the ``B * P`` points' segments
    starts (``B * P + 1`` entries). Missing neighbors sort first, outside every segment."""
    B = idx.shape[0]
    flat = torch.where(idx >= 0, idx + (torch.arange(B, device=idx.device) * P)[:, None, None], -1).reshape(-1)
    sorted_rows, order = torch.sort(flat, stable=True)
    return order, torch.searchsorted(sorted_rows, torch.arange(B * P + 1, device=idx.device))


def zero_grads(q, P: int, F: int):
    """Zero ``(B, Q, 3)``, ``(B, P, 3)``, ``(B, P, F)``, ``(B, P, 3)`` and ``(B, P, 3, 3)`` in q's dtype:
    the gradients of q, p, f, sigma and R."""
    B, Q = q.shape[:2]
    return tuple(torch.zeros(shape, dtype=q.dtype, device=q.device)
                 for shape in ((B, Q, 3), (B, P, 3), (B, P, F), (B, P, 3), (B, P, 3, 3)))


@on_tensor_device
def forward(q, p, f, sigma, R, idx):
    """``(f_out (B, Q, F), m (B, Q, K))`` in the coordinates' dtype; ``m = inf`` where ``idx = -1``."""
    B, Q, K = idx.shape
    P, F = p.shape[1], f.shape[2]
    m = torch.full((B, Q, K), float("inf"), dtype=q.dtype, device=q.device)
    out = torch.zeros((B, Q, F), dtype=q.dtype, device=q.device)
    if B * Q == 0 or K == 0:
        return out, m
    BQ = 32
    _forward_kernel[(triton.cdiv(Q, BQ), B)](
        q.contiguous(), p.contiguous(), sigma.contiguous(), R.contiguous(), f.contiguous(), idx.contiguous(),
        m, out, Q, P, F, K, ACC=accumulator(q.dtype), BQ=BQ, BF=channel_block(F, 64), enable_fp_fusion=False)
    return out, m


@on_tensor_device
def backward(q, p, f, sigma, R, idx, w, g_fout, g_w, g_m, need_f: bool):
    """The gradients ``(g_q, g_p, g_f or None, g_sigma, g_R)`` for the cotangents ``g_fout (B, Q, F)``,
    ``g_w``, ``g_m (B, Q, K)`` of ``(f_out, w, m)`` (each may be None: zero)."""
    B, Q, K = idx.shape
    P, F = p.shape[1], f.shape[2]
    dev, dt = q.device, q.dtype
    g_q, g_p, g_f, g_s, g_R = zero_grads(q, P, F)
    g_f = g_f if need_f else None
    if B * Q == 0 or B * P == 0 or K == 0:
        return g_q, g_p, g_f, g_s, g_R
    q, p, sigma, R, f, idx, w = (t.contiguous() for t in (q, p, sigma, R, f, idx, w))
    gm = torch.empty((B, Q, K), dtype=dt, device=dev)
    BQ, BF = 32, channel_block(F, 64)
    _query_grad_kernel[(triton.cdiv(Q, BQ), B)](
        q, p, sigma, R, f, idx, w,
        pointer(g_fout, w), pointer(g_w, w), pointer(g_m, w), gm, g_q, Q, P, F, K,
        HAS_GF=g_fout is not None, HAS_GW=g_w is not None, HAS_GM=g_m is not None,
        ACC=accumulator(dt), BQ=BQ, BF=BF, enable_fp_fusion=False)
    order, start = point_segments(idx, P)
    need_f = need_f and g_fout is not None and F > 0
    _point_grad_kernel[(B * P,)](
        order, start, q, p, sigma, R, w, gm, pointer(g_fout, w),
        g_p, g_s, g_R, g_f if need_f else w, F, K, NEED_F=need_f, ACC=accumulator(dt), BT=32, BF=BF,
        enable_fp_fusion=False)
    return g_q, g_p, g_f, g_s, g_R

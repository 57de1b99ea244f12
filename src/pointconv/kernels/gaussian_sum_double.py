"""Triton kernels: the double backward of the Gaussian weighted sum (``kernels/gaussian_sum.py``).

The formulas are those of ``gaussian/_kernel_autograd.double_backward`` (its docstring derives
them): for cotangents ``a_q, a_p, a_f, a_sigma, a_R`` of the backward's outputs, per pair
``gm = g_m - w (g_w + g_fout[i] . f_j)``, ``b = a_q[i] - a_p[j]``, ``c = R b + a_R d`` and
``h = 2 (sigma * u) . c + a_sigma . u**2``. Two passes, as the backward:

  query pass   per pair: grad g_m = h, grad g_w = -w h, grad w = -(g_w + g_fout . f_j) h + g_fout . a_f[j],
               and gm, -w h for the point pass; per query: grad q = sum_k dL/dd,
               grad g_fout = sum_k (-w h) f_j + w a_f[j]
  point pass   per point over its sorted pairs: grad p = -sum dL/dd, grad sigma, grad R,
               grad f = sum (-w h) g_fout[i]

with ``dL/du = gm (2 sigma * c + 2 a_sigma * u)``, ``dL/dc = gm 2 sigma * u``,
``dL/dd = R^T dL/du + a_R^T dL/dc``, ``dL/dR = dL/du d^T + dL/dc b^T``, ``dL/dsigma = gm 2 u * c``.
Absent cotangents are constexpr switches (their terms are not computed). No atomics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import accumulator, channel_block, on_tensor_device
from .gaussian_sum import (_cotangent_dots, _geometry, _segment_rows_sum, _store_sums3, point_segments, pointer,
                           zero_grads)


@triton.jit
def _load3(ptr, row, mask, HAS: tl.constexpr, ACC: tl.constexpr):
    """``ptr[row, 0:3]`` (zeros when the tensor is absent)."""
    if HAS:
        x = tl.load(ptr + row * 3, mask=mask, other=0.0).to(ACC)
        y = tl.load(ptr + row * 3 + 1, mask=mask, other=0.0).to(ACC)
        z = tl.load(ptr + row * 3 + 2, mask=mask, other=0.0).to(ACC)
    else:
        x = tl.zeros(row.shape, ACC)
        y = tl.zeros(row.shape, ACC)
        z = tl.zeros(row.shape, ACC)
    return x, y, z


@triton.jit
def _second(g, gm, bx, by, bz, ar_ptr, as_ptr, j, ok, HAS_AR: tl.constexpr, HAS_AS: tl.constexpr,
            ACC: tl.constexpr):
    """For pairs with geometry ``g`` (``_geometry``), ``gm`` and ``b``: ``h``, ``dL/dd``, ``dL/du``,
    ``dL/dc``, ``c`` and ``dL/dsigma``."""
    dx, dy, dz = g[0], g[1], g[2]
    u0, u1, u2, s0, s1, s2 = g[3], g[4], g[5], g[6], g[7], g[8]
    c0 = g[9] * bx + g[10] * by + g[11] * bz
    c1 = g[12] * bx + g[13] * by + g[14] * bz
    c2 = g[15] * bx + g[16] * by + g[17] * bz
    a00, a01, a02 = _load3(ar_ptr, j * 3, ok, HAS_AR, ACC)
    a10, a11, a12 = _load3(ar_ptr, j * 3 + 1, ok, HAS_AR, ACC)
    a20, a21, a22 = _load3(ar_ptr, j * 3 + 2, ok, HAS_AR, ACC)
    if HAS_AR:
        c0 += a00 * dx + a01 * dy + a02 * dz
        c1 += a10 * dx + a11 * dy + a12 * dz
        c2 += a20 * dx + a21 * dy + a22 * dz
    as0, as1, as2 = _load3(as_ptr, j, ok, HAS_AS, ACC)
    h = 2 * (s0 * u0 * c0 + s1 * u1 * c1 + s2 * u2 * c2) + (as0 * u0 * u0 + as1 * u1 * u1 + as2 * u2 * u2)
    gu0 = gm * (2 * s0 * c0 + 2 * as0 * u0)
    gu1 = gm * (2 * s1 * c1 + 2 * as1 * u1)
    gu2 = gm * (2 * s2 * c2 + 2 * as2 * u2)
    gc0 = gm * (2 * s0 * u0)
    gc1 = gm * (2 * s1 * u1)
    gc2 = gm * (2 * s2 * u2)
    gdx = g[9] * gu0 + g[12] * gu1 + g[15] * gu2 + a00 * gc0 + a10 * gc1 + a20 * gc2
    gdy = g[10] * gu0 + g[13] * gu1 + g[16] * gu2 + a01 * gc0 + a11 * gc1 + a21 * gc2
    gdz = g[11] * gu0 + g[14] * gu1 + g[17] * gu2 + a02 * gc0 + a12 * gc1 + a22 * gc2
    gs0 = gm * (2 * u0 * c0)
    gs1 = gm * (2 * u1 * c1)
    gs2 = gm * (2 * u2 * c2)
    return h, gdx, gdy, gdz, gu0, gu1, gu2, gc0, gc1, gc2, gs0, gs1, gs2


@triton.jit
def _double_query_kernel(q_ptr, p_ptr, s_ptr, r_ptr, f_ptr, idx_ptr, w_ptr, gf_ptr, gw_ptr, gm_ptr,
                         aq_ptr, ap_ptr, af_ptr, as_ptr, ar_ptr,
                         gm_out_ptr, wh_out_ptr, d_q_ptr, d_gf_ptr, d_w_ptr, d_gw_ptr, d_gm_ptr,
                         Q, P, F, K: tl.constexpr, KP: tl.constexpr,
                         HAS_GF: tl.constexpr, HAS_GW: tl.constexpr, HAS_GM: tl.constexpr, HAS_AQ: tl.constexpr,
                         HAS_AP: tl.constexpr, HAS_AF: tl.constexpr, HAS_AS: tl.constexpr, HAS_AR: tl.constexpr,
                         ACC: tl.constexpr, BQ: tl.constexpr, BF: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BQ + tl.arange(0, BQ)
    rmask = rows < Q
    qrow = b * Q + rows.to(tl.int64)
    ch = tl.arange(0, BF)
    cols = tl.arange(0, KP)[None, :]
    aqx, aqy, aqz = _load3(aq_ptr, qrow, rmask, HAS_AQ, ACC)
    dqx = tl.zeros((BQ,), ACC)
    dqy = tl.zeros((BQ,), ACC)
    dqz = tl.zeros((BQ,), ACC)
    wh_tile = tl.zeros((BQ, KP), ACC)  # -w h and w per slot, for grad g_fout below
    w_tile = tl.zeros((BQ, KP), ACC)
    for k in range(0, K):
        slot = qrow * K + k
        j = tl.load(idx_ptr + slot, mask=rmask, other=-1)
        ok = rmask & (j >= 0)
        jrow = b * P + j
        g = _geometry(q_ptr, p_ptr, s_ptr, r_ptr, qrow, jrow, ok, ACC)
        w = tl.load(w_ptr + slot, mask=ok, other=0.0).to(ACC)
        gw_total, t_dot = _cotangent_dots(gw_ptr, gf_ptr, f_ptr, af_ptr, slot, qrow, jrow, ok, F, HAS_GW, HAS_GF,
                                          HAS_AF, ACC, BQ, BF)
        gm = -w * gw_total
        if HAS_GM:
            gm += tl.load(gm_ptr + slot, mask=ok, other=0.0).to(ACC)
        gm = tl.where(ok, gm, 0.0)
        apx, apy, apz = _load3(ap_ptr, jrow, ok, HAS_AP, ACC)
        x = _second(g, gm, aqx - apx, aqy - apy, aqz - apz, ar_ptr, as_ptr, jrow, ok, HAS_AR, HAS_AS, ACC)
        h = tl.where(ok, x[0], 0.0)
        dqx += x[1]
        dqy += x[2]
        dqz += x[3]
        tl.store(gm_out_ptr + slot, gm, mask=rmask)
        tl.store(wh_out_ptr + slot, -w * h, mask=rmask)
        tl.store(d_w_ptr + slot, -gw_total * h + t_dot, mask=rmask)
        if HAS_GW:
            tl.store(d_gw_ptr + slot, -w * h, mask=rmask)
        if HAS_GM:
            tl.store(d_gm_ptr + slot, h, mask=rmask)
        wh_tile = tl.where(cols == k, (-w * h)[:, None], wh_tile)
        w_tile = tl.where(cols == k, w[:, None], w_tile)
    tl.store(d_q_ptr + qrow * 3, dqx, mask=rmask)
    tl.store(d_q_ptr + qrow * 3 + 1, dqy, mask=rmask)
    tl.store(d_q_ptr + qrow * 3 + 2, dqz, mask=rmask)
    if HAS_GF:  # grad g_fout[i] = sum_k (-w h) f_j + w a_f[j]
        for f0 in range(0, F, BF):
            cmask = (f0 + ch < F)[None, :]
            acc = tl.zeros((BQ, BF), ACC)
            for k in range(0, K):
                j = tl.load(idx_ptr + qrow * K + k, mask=rmask, other=-1)
                ok = rmask & (j >= 0)
                jrow = b * P + j
                cm = ok[:, None] & cmask
                fk = tl.load(f_ptr + jrow[:, None] * F + f0 + ch[None, :], mask=cm, other=0.0).to(ACC)
                acc += tl.sum(tl.where(cols == k, wh_tile, 0.0), axis=1)[:, None] * fk
                if HAS_AF:
                    ak = tl.load(af_ptr + jrow[:, None] * F + f0 + ch[None, :], mask=cm, other=0.0).to(ACC)
                    acc += tl.sum(tl.where(cols == k, w_tile, 0.0), axis=1)[:, None] * ak
            tl.store(d_gf_ptr + qrow[:, None] * F + f0 + ch[None, :], acc, mask=rmask[:, None] & cmask)


@triton.jit
def _double_point_kernel(order_ptr, start_ptr, q_ptr, p_ptr, s_ptr, r_ptr, gm_ptr, wh_ptr, gf_ptr,
                         aq_ptr, ap_ptr, as_ptr, ar_ptr, d_p_ptr, d_s_ptr, d_r_ptr, d_f_ptr, F, K,
                         HAS_GF: tl.constexpr, HAS_AQ: tl.constexpr, HAS_AP: tl.constexpr, HAS_AS: tl.constexpr,
                         HAS_AR: tl.constexpr, ACC: tl.constexpr, BT: tl.constexpr, BF: tl.constexpr):
    jrow = tl.program_id(0).to(tl.int64)
    s_begin = tl.load(start_ptr + jrow)
    s_end = tl.load(start_ptr + jrow + 1)
    lanes = tl.arange(0, BT)
    zero = tl.zeros((BT,), ACC)
    dp0, dp1, dp2, ds0, ds1, ds2 = zero, zero, zero, zero, zero, zero
    dr00, dr01, dr02, dr10, dr11, dr12, dr20, dr21, dr22 = zero, zero, zero, zero, zero, zero, zero, zero, zero
    for t0 in range(s_begin, s_end, BT):
        t = t0 + lanes
        ok = t < s_end
        pos = tl.load(order_ptr + t, mask=ok, other=0)  # flat (query row, slot) position
        qrow = pos // K
        jv = jrow + 0 * pos
        gm = tl.load(gm_ptr + pos, mask=ok, other=0.0).to(ACC)
        g = _geometry(q_ptr, p_ptr, s_ptr, r_ptr, qrow, jv, ok, ACC)
        aqx, aqy, aqz = _load3(aq_ptr, qrow, ok, HAS_AQ, ACC)
        apx, apy, apz = _load3(ap_ptr, jv, ok, HAS_AP, ACC)
        bx, by, bz = aqx - apx, aqy - apy, aqz - apz
        x = _second(g, gm, bx, by, bz, ar_ptr, as_ptr, jv, ok, HAS_AR, HAS_AS, ACC)
        dp0 -= x[1]
        dp1 -= x[2]
        dp2 -= x[3]
        ds0 += x[10]
        ds1 += x[11]
        ds2 += x[12]
        # dL/dR = dL/du d^T + dL/dc b^T
        dr00 += x[4] * g[0] + x[7] * bx
        dr01 += x[4] * g[1] + x[7] * by
        dr02 += x[4] * g[2] + x[7] * bz
        dr10 += x[5] * g[0] + x[8] * bx
        dr11 += x[5] * g[1] + x[8] * by
        dr12 += x[5] * g[2] + x[8] * bz
        dr20 += x[6] * g[0] + x[9] * bx
        dr21 += x[6] * g[1] + x[9] * by
        dr22 += x[6] * g[2] + x[9] * bz
    _store_sums3(d_p_ptr + jrow * 3, dp0, dp1, dp2)
    _store_sums3(d_s_ptr + jrow * 3, ds0, ds1, ds2)
    _store_sums3(d_r_ptr + jrow * 9, dr00, dr01, dr02)
    _store_sums3(d_r_ptr + jrow * 9 + 3, dr10, dr11, dr12)
    _store_sums3(d_r_ptr + jrow * 9 + 6, dr20, dr21, dr22)
    if HAS_GF:  # grad f[j] = sum over j's pairs of (-w h) g_fout[query]
        _segment_rows_sum(order_ptr, s_begin, s_end, wh_ptr, gf_ptr, d_f_ptr + jrow * F, F, K, ACC, BT, BF)


@on_tensor_device
def double_backward(q, p, f, sigma, R, idx, w, g_fout, g_w, g_m, a_q, a_p, a_f, a_s, a_R):
    """The gradients of ``<a, backward>`` w.r.t. ``q, p, f, sigma, R, w, g_fout, g_w, g_m`` (None for
    an absent ``g_*``), as ``gaussian/_kernel_autograd.double_backward`` computes them."""
    from .knn import _kp

    B, Q, K = idx.shape
    P, F = p.shape[1], f.shape[2]
    dev, dt = q.device, q.dtype
    d_q, d_p, d_f, d_s, d_R = zero_grads(q, P, F)
    d_w = torch.zeros((B, Q, K), dtype=dt, device=dev)
    d_gf = None if g_fout is None else torch.zeros((B, Q, F), dtype=dt, device=dev)
    d_gw = None if g_w is None else torch.zeros((B, Q, K), dtype=dt, device=dev)
    d_gm = None if g_m is None else torch.zeros((B, Q, K), dtype=dt, device=dev)
    out = (d_q, d_p, d_f, d_s, d_R, d_w, d_gf, d_gw, d_gm)
    if B * Q == 0 or B * P == 0 or K == 0:
        return out
    if a_f is not None and g_fout is None:
        a_f = None  # a_f only meets g_fout
    def ptr(t):
        return pointer(t, w)

    gm = torch.empty((B, Q, K), dtype=dt, device=dev)
    wh = torch.empty((B, Q, K), dtype=dt, device=dev)
    BQ, BF = 16, channel_block(F, 64)
    flags = dict(HAS_AQ=a_q is not None, HAS_AP=a_p is not None, HAS_AS=a_s is not None, HAS_AR=a_R is not None)
    _double_query_kernel[(triton.cdiv(Q, BQ), B)](
        ptr(q), ptr(p), ptr(sigma), ptr(R), ptr(f), ptr(idx), ptr(w), ptr(g_fout), ptr(g_w), ptr(g_m),
        ptr(a_q), ptr(a_p), ptr(a_f), ptr(a_s), ptr(a_R), gm, wh, d_q, ptr(d_gf), d_w, ptr(d_gw), ptr(d_gm),
        Q, P, F, K=K, KP=_kp(K), HAS_GF=g_fout is not None, HAS_GW=g_w is not None, HAS_GM=g_m is not None,
        HAS_AF=a_f is not None, **flags, ACC=accumulator(dt), BQ=BQ, BF=BF, enable_fp_fusion=False)
    order, start = point_segments(idx, P)
    _double_point_kernel[(B * P,)](
        order, start, ptr(q), ptr(p), ptr(sigma), ptr(R), gm, wh, ptr(g_fout), ptr(a_q), ptr(a_p), ptr(a_s),
        ptr(a_R), d_p, d_s, d_R, d_f, F, K, HAS_GF=g_fout is not None, **flags, ACC=accumulator(dt), BT=32, BF=BF,
        enable_fp_fusion=False)
    return out

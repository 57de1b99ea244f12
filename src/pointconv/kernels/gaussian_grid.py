"""Triton kernel: the K points with the smallest Gaussian exponent m of each query, found by
scanning a uniform grid of the cloud in rings of cells (float32, D = 3).

The brute-force selection of ``kernels/gaussian.py`` evaluates every point of the cloud for every
query. Here the points are sorted into ``grid.Grid``'s cells and each block of queries (sorted by
cell) scans rings of cells around its queries, as the grid kNN kernel does, keeping the K best
``(m, index)`` keys with the same packed-key top-k. The stopping rule is the exponent's Euclidean
lower bound: every computed ``m`` of a cloud is at least ``c |q - p|^2`` (``c`` from
``gaussian._exponent.cloud_lower_bounds``: the smallest eigenvalue of any ``R^T diag(sigma) R``
less a relative rounding margin) less an absolute margin for subnormal terms, so once that
bound at the distance to the unscanned cells exceeds a query's K-th m, no unscanned point can
enter. A cloud with ``c = 0`` (no bound) is scanned whole.

The exponent is evaluated in ``gaussian/_exponent.py``'s order without FMA, so the keys are
bitwise those of the brute-force kernel and of the torch paths: the same indices, ties to the
lower index. NaN exponents (an overflow inside ``R d``) count as missing, as elsewhere.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import on_tensor_device
from .gaussian import _exponent
from .grid import Grid, sort_queries
from .knn import INF_KEY, _grid_queries, _kp, _kth_key, _merge, _pack, _store, _unscanned_distance


@triton.jit
def _scan_cells(best, qx, qy, qz, qb, lo_cell, hi_cell, ok, active, start_ptr, xyz_ptr, pid_ptr, s_ptr, r_ptr, P,
                K: tl.constexpr, KP: tl.constexpr, BQ: tl.constexpr):
    """Merge the exponents of the points of the contiguous cell range [lo_cell, hi_cell] of each
    active query into its best keys."""
    use = ok & active
    seg_start = tl.load(start_ptr + lo_cell, mask=use, other=0)
    seg_end = tl.load(start_ptr + hi_cell + 1, mask=use, other=0)
    n_max = tl.max(seg_end - seg_start)
    cols = tl.arange(0, KP)
    for j in range(0, n_max, KP):
        pos = seg_start[:, None] + j + cols[None, :]
        m_ok = pos < seg_end[:, None]
        dx = qx[:, None] - tl.load(xyz_ptr + pos * 3, mask=m_ok, other=0.0)
        dy = qy[:, None] - tl.load(xyz_ptr + pos * 3 + 1, mask=m_ok, other=0.0)
        dz = qz[:, None] - tl.load(xyz_ptr + pos * 3 + 2, mask=m_ok, other=0.0)
        pidx = tl.load(pid_ptr + pos, mask=m_ok, other=0)
        m = _exponent(dx, dy, dz, s_ptr, r_ptr, qb[:, None] * P + pidx, m_ok)  # (its row of sigma and R)
        m = tl.where(m_ok & (m == m), m, float("inf"))  # NaN (an overflow inside R d): missing
        best = _merge(best, _pack(m, pidx), K, KP, BQ)
    return best


@triton.jit
def _aniso_grid_select_kernel(
    q_ptr, qbatch_ptr, qrow_ptr, nq_total,
    xyz_ptr, pid_ptr, start_ptr, lo_ptr, h_ptr, dims_ptr, base_ptr, c_ptr, margin_ptr,
    s_ptr, r_ptr, out_m_ptr, out_i_ptr, Q, P,
    K: tl.constexpr, KP: tl.constexpr, BQ: tl.constexpr,
):
    slots = tl.program_id(0) * BQ + tl.arange(0, BQ)
    qmask = slots < nq_total
    qmask, qx, qy, qz, qb, qrow, lox, loy, loz, h, gx, gy, gz, base, cx, cy, cz, slack = _grid_queries(
        q_ptr, qbatch_ptr, qrow_ptr, lo_ptr, h_ptr, dims_ptr, base_ptr, slots.to(tl.int64), qmask)
    c = tl.load(c_ptr + qb, mask=qmask, other=0.0)
    margin = tl.load(margin_ptr + qb, mask=qmask, other=0.0)

    best = tl.full((BQ, KP), INF_KEY, tl.int64)
    active = qmask
    r = 0
    while tl.sum(active.to(tl.int32)) > 0:
        for oz in range(-r, r + 1):
            for oy in range(-r, r + 1):
                y = cy + oy
                z = cz + oz
                ok = (y >= 0) & (y < gy) & (z >= 0) & (z < gz)
                row = base + (z * gy + y) * gx
                if (oy == r) | (oy == -r) | (oz == r) | (oz == -r):  # a whole row of the ring's faces
                    xl = tl.maximum(cx - r, 0)
                    xh = tl.minimum(cx + r, gx - 1)
                    best = _scan_cells(best, qx, qy, qz, qb, row + xl, row + xh, ok, active, start_ptr, xyz_ptr,
                                       pid_ptr, s_ptr, r_ptr, P, K, KP, BQ)
                else:  # inside the faces only the row's two end cells are new
                    xl = cx - r
                    best = _scan_cells(best, qx, qy, qz, qb, row + xl, row + xl, ok & (xl >= 0), active, start_ptr,
                                       xyz_ptr, pid_ptr, s_ptr, r_ptr, P, K, KP, BQ)
                    xh = cx + r
                    best = _scan_cells(best, qx, qy, qz, qb, row + xh, row + xh, ok & (xh < gx), active, start_ptr,
                                       xyz_ptr, pid_ptr, s_ptr, r_ptr, P, K, KP, BQ)
        bd = _unscanned_distance(qx, qy, qz, cx, cy, cz, r, lox, loy, loz, h, gx, gy, gz, slack, BQ)
        kth = (_kth_key(best, K, KP) >> 32).to(tl.int32).to(tl.float32, bitcast=True)
        # done: every unscanned point's m >= c bd^2 > the K-th m (strictly: a tie could be a lower index)
        # (bd^2 capped: 0 * inf would be NaN; a lower bound still)
        bound = c * tl.minimum(bd * bd, 3.0e38) - margin
        active = active & ~(kth < bound) & (bd < float("inf"))
        r += 1
    _store(best, out_m_ptr, out_i_ptr, qb * Q + qrow, qmask, K, KP)


_BOUNDS_BLOCK = 256  # points per program of the bounds' first kernel
_JACOBI_SWEEPS = 6  # 3x3 Jacobi converges quadratically: 3 or 4 sweeps reach float64's precision


@triton.jit
def _jacobi_rotation(app, aqq, apq, arp, arq):
    """One Jacobi rotation of a symmetric 3x3 matrix zeroing its (p, q) entry (r: the third index):
    the new ``(a_pp, a_qq, a_rp, a_rq)``."""
    zero = apq == 0.0
    theta = (aqq - app) / (2.0 * tl.where(zero, 1.0, apq))
    t = 1.0 / (tl.abs(theta) + tl.sqrt(theta * theta + 1.0))  # (theta^2 = inf: t = 0, its limit)
    t = tl.where(zero, 0.0, tl.where(theta < 0.0, -t, t))
    c = 1.0 / tl.sqrt(t * t + 1.0)
    s = t * c
    return app - t * apq, aqq + t * apq, c * arp - s * arq, s * arp + c * arq


@triton.jit
def _bounds_kernel(s_ptr, r_ptr, len_ptr, lam_ptr, top_ptr, sig_ptr, bad_ptr, P, n_blocks,
                   BLOCK: tl.constexpr, SWEEPS: tl.constexpr):
    """Per block of a cloud's points, in float64: the smallest eigenvalue of ``R^T diag(sigma) R``
    (Jacobi sweeps), the rounding scale ``sum_a sigma_a (sum_b |R_ab|)^2`` and the largest sigma,
    over the valid points with a finite matrix; and whether a valid point's matrix is not finite.
    (Clouds and blocks share program axis 0: axis 1 stops at 65,535 programs.)"""
    pid = tl.program_id(0).to(tl.int64)
    b = pid // n_blocks
    blk = pid % n_blocks
    rows = blk * BLOCK + tl.arange(0, BLOCK)
    valid = rows < tl.load(len_ptr + b)
    at = b * P + rows
    s0 = tl.load(s_ptr + at * 3, mask=valid, other=0.0).to(tl.float64)
    s1 = tl.load(s_ptr + at * 3 + 1, mask=valid, other=0.0).to(tl.float64)
    s2 = tl.load(s_ptr + at * 3 + 2, mask=valid, other=0.0).to(tl.float64)
    r00 = tl.load(r_ptr + at * 9, mask=valid, other=0.0).to(tl.float64)
    r01 = tl.load(r_ptr + at * 9 + 1, mask=valid, other=0.0).to(tl.float64)
    r02 = tl.load(r_ptr + at * 9 + 2, mask=valid, other=0.0).to(tl.float64)
    r10 = tl.load(r_ptr + at * 9 + 3, mask=valid, other=0.0).to(tl.float64)
    r11 = tl.load(r_ptr + at * 9 + 4, mask=valid, other=0.0).to(tl.float64)
    r12 = tl.load(r_ptr + at * 9 + 5, mask=valid, other=0.0).to(tl.float64)
    r20 = tl.load(r_ptr + at * 9 + 6, mask=valid, other=0.0).to(tl.float64)
    r21 = tl.load(r_ptr + at * 9 + 7, mask=valid, other=0.0).to(tl.float64)
    r22 = tl.load(r_ptr + at * 9 + 8, mask=valid, other=0.0).to(tl.float64)
    # M = R^T diag(s) R: M_ij = sum_a s_a R_ai R_aj
    a00 = s0 * r00 * r00 + s1 * r10 * r10 + s2 * r20 * r20
    a11 = s0 * r01 * r01 + s1 * r11 * r11 + s2 * r21 * r21
    a22 = s0 * r02 * r02 + s1 * r12 * r12 + s2 * r22 * r22
    a01 = s0 * r00 * r01 + s1 * r10 * r11 + s2 * r20 * r21
    a02 = s0 * r00 * r02 + s1 * r10 * r12 + s2 * r20 * r22
    a12 = s0 * r01 * r02 + s1 * r11 * r12 + s2 * r21 * r22
    finite = (tl.abs(a00) < float("inf")) & (tl.abs(a11) < float("inf")) & (tl.abs(a22) < float("inf")) \
        & (tl.abs(a01) < float("inf")) & (tl.abs(a02) < float("inf")) & (tl.abs(a12) < float("inf"))
    use = valid & finite
    a00 = tl.where(use, a00, 1.0)
    a11 = tl.where(use, a11, 1.0)
    a22 = tl.where(use, a22, 1.0)
    a01 = tl.where(use, a01, 0.0)
    a02 = tl.where(use, a02, 0.0)
    a12 = tl.where(use, a12, 0.0)
    for _ in tl.static_range(SWEEPS):
        a00, a11, a02, a12 = _jacobi_rotation(a00, a11, a01, a02, a12)  # (0, 1), r = 2
        a01 = tl.zeros_like(a01)
        a00, a22, a01, a12 = _jacobi_rotation(a00, a22, a02, a01, a12)  # (0, 2), r = 1
        a02 = tl.zeros_like(a02)
        a11, a22, a01, a02 = _jacobi_rotation(a11, a22, a12, a01, a02)  # (1, 2), r = 0
        a12 = tl.zeros_like(a12)
    lam = tl.minimum(tl.minimum(a00, a11), a22)
    row0 = tl.abs(r00) + tl.abs(r01) + tl.abs(r02)
    row1 = tl.abs(r10) + tl.abs(r11) + tl.abs(r12)
    row2 = tl.abs(r20) + tl.abs(r21) + tl.abs(r22)
    scale = s0 * row0 * row0 + s1 * row1 * row1 + s2 * row2 * row2
    out = b * n_blocks + blk
    tl.store(lam_ptr + out, tl.min(tl.where(use, lam, float("inf"))))
    tl.store(top_ptr + out, tl.max(tl.where(use, scale, 0.0)))
    tl.store(sig_ptr + out, tl.max(tl.where(valid, tl.maximum(tl.maximum(s0, s1), s2), 0.0)))
    tl.store(bad_ptr + out, tl.max((valid & ~finite).to(tl.int32)))


@triton.jit
def _finish_bounds_kernel(lam_ptr, top_ptr, sig_ptr, bad_ptr, c_ptr, margin_ptr, n_blocks, eps,
                          BLOCK: tl.constexpr):
    """Per cloud, from its blocks' partial results: the kernel's stop factor ``c`` and subnormal
    margin (float32), as ``cloud_stop_bounds`` says."""
    b = tl.program_id(0).to(tl.int64)
    lam = tl.full((), float("inf"), tl.float64)
    top = tl.full((), 0.0, tl.float64)
    sig = tl.full((), 0.0, tl.float64)
    bad = tl.full((), 0, tl.int32)
    cols = tl.arange(0, BLOCK)
    for start in range(0, n_blocks, BLOCK):
        m = start + cols < n_blocks
        at = b * n_blocks + start + cols
        lam = tl.minimum(lam, tl.min(tl.load(lam_ptr + at, mask=m, other=float("inf"))))
        top = tl.maximum(top, tl.max(tl.load(top_ptr + at, mask=m, other=0.0)))
        sig = tl.maximum(sig, tl.max(tl.load(sig_ptr + at, mask=m, other=0.0)))
        bad = tl.maximum(bad, tl.max(tl.load(bad_ptr + at, mask=m, other=0)))
    # (float64 constants through tl.full: a literal would be a float32 one, and 1 - 1e-9 is 1 there)
    one = tl.full((), 1.0, tl.float64)
    c = lam * (one - tl.full((), 1e-9, tl.float64)) - 8.0 * eps * top
    c = tl.where((bad == 0) & (tl.abs(c) < float("inf")), tl.maximum(c, 0.0), 0.0)
    c = tl.minimum(c * (one - tl.full((), 1e-5, tl.float64)), 3.4028234663852886e38)
    tl.store(c_ptr + b, c.to(tl.float32))
    tl.store(margin_ptr + b, ((one + sig) * tl.full((), 2.0 ** -72, tl.float64) * tl.full((), 2.0 ** -72, tl.float64))
             .to(tl.float32))


@on_tensor_device
def cloud_stop_bounds(sigma: torch.Tensor, R: torch.Tensor, lengths: torch.Tensor):
    """``(c (B,), margin (B,))`` float32 for the selection kernel, in two launches and no read of
    the device: each cloud stops scanning once ``c |q - p|^2 - margin`` exceeds a query's K-th m.

    ``c``: ``gaussian._exponent.cloud_lower_bounds`` (the torch reference, through
    ``torch.linalg.eigvalsh``, which synchronizes a CUDA device) less 1e-5: the smallest eigenvalue
    of any valid point's ``R^T diag(sigma) R`` in float64 (here by Jacobi sweeps, accurate to a
    few float64 roundings of the matrix's norm, far inside the rounding margin ``8 eps scale``
    taken off), 0 without a bound. The 1e-5 (about 80 float32 roundings) covers the kernel's: it
    computes m over the float32 difference, whose length is within a float32 rounding of the
    exact one that its distance bound ``bd`` bounds, and ``c * bd * bd`` rounds too. Capped at
    float32's largest value (a bound past it would become inf and stop every scan).

    ``margin``: how far below ``c |d|^2`` a computed m may fall where its terms are subnormal, an
    absolute error that ``c``'s relative margin misses: each axis' ``u * u`` and ``sigma * (u *
    u)`` round to a multiple of 2^-149 there, so m may lose about ``3 (sigma_max + 1) 2^-150``;
    ``(1 + sigma_max) 2^-144`` leaves a wide margin (e.g. sigma 1e38 with R 1e-22 I: m steps of
    1.4e-7 at m ~1e-8)."""
    B, P = sigma.shape[:2]
    n_blocks = max(1, triton.cdiv(P, _BOUNDS_BLOCK))
    lam, top, sig = (torch.empty((B, n_blocks), dtype=torch.float64, device=sigma.device) for _ in range(3))
    bad = torch.empty((B, n_blocks), dtype=torch.int32, device=sigma.device)
    c = torch.empty(B, dtype=torch.float32, device=sigma.device)
    margin = torch.empty(B, dtype=torch.float32, device=sigma.device)
    if B:
        _bounds_kernel[(n_blocks * B,)](sigma.contiguous(), R.contiguous(), lengths.contiguous(), lam, top, sig, bad,
                                      P, n_blocks, BLOCK=_BOUNDS_BLOCK, SWEEPS=_JACOBI_SWEEPS)
        _finish_bounds_kernel[(B,)](lam, top, sig, bad, c, margin, n_blocks, torch.finfo(sigma.dtype).eps,
                                    BLOCK=1024)
    return c, margin


@on_tensor_device
def select_aniso_grid(q, p, sigma, R, K, p_lengths):
    """``(m (B, Q, K) float32, idx (B, Q, K) int64)``: the K smallest exponents of each query (ties
    to the lower index; -1 / inf padded) for float32 ``q (B, Q, 3)``, ``p (B, P, 3)``, ``sigma``,
    ``R`` (the stopping bound per cloud: ``cloud_stop_bounds``)."""
    B, Q, _ = q.shape
    P = p.shape[1]
    out_m = torch.full((B, Q, K), float("inf"), dtype=torch.float32, device=q.device)
    out_i = torch.full((B, Q, K), -1, dtype=torch.int64, device=q.device)
    if B == 0 or Q == 0 or P == 0:
        return out_m, out_i
    grid = Grid(p, p_lengths, k_hint=K)
    qq, qb, qrow = sort_queries(q, torch.full((B,), Q, dtype=torch.int64, device=q.device), grid)
    c, margin = cloud_stop_bounds(sigma, R, p_lengths)
    KP = _kp(K)
    BQ = 32 if KP <= 32 else 16
    _aniso_grid_select_kernel[(triton.cdiv(B * Q, BQ),)](
        qq, qb, qrow, B * Q, grid.xyz, grid.point_idx, grid.cell_start, grid.lo, grid.h,
        grid.dims, grid.base, c, margin,
        sigma.contiguous(), R.contiguous(), out_m, out_i, Q, P, K=K, KP=KP, BQ=BQ, enable_fp_fusion=False)
    return out_m, out_i

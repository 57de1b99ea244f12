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


def _stop_factor(lower: torch.Tensor) -> torch.Tensor:
    """The kernel's ``c``: ``lower`` bounds m over the float32 difference the kernel computes, whose
    length is within a float32 rounding of the exact one that ``bd`` bounds, and ``c * bd * bd``
    rounds too; 1e-5 (about 80 float32 roundings) covers those few roundings with room to spare.
    Capped at float32's largest value (a bound past it would become inf and stop every scan)."""
    return (lower.double() * (1 - 1e-5)).clamp(max=torch.finfo(torch.float32).max).float().contiguous()


def _subnormal_margin(sigma: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``(B,)``: how far below ``c |d|^2`` a computed m may fall where its terms are subnormal, an
    absolute error that ``c``'s relative margin misses: each axis' ``u * u`` and ``sigma * (u * u)``
    round to a multiple of 2^-149 there, so m may lose about ``3 (sigma_max + 1) 2^-150``; 2^-144
    leaves a wide margin (e.g. sigma 1e38 with R 1e-22 I: m steps of 1.4e-7 at m ~1e-8)."""
    P = sigma.shape[1]
    valid = torch.arange(P, device=sigma.device)[None, :] < lengths[:, None]
    top = torch.where(valid[..., None], sigma.double(), 0).amax((1, 2)) if P else sigma.new_zeros(len(lengths)).double()
    return (2.0 ** -144 * (1 + top)).float().contiguous()


@on_tensor_device
def select_aniso_grid(q, p, sigma, R, K, p_lengths, lower):
    """``(m (B, Q, K) float32, idx (B, Q, K) int64)``: the K smallest exponents of each query (ties
    to the lower index; -1 / inf padded) for float32 ``q (B, Q, 3)``, ``p (B, P, 3)``, ``sigma``,
    ``R``, with ``lower (B,)`` each cloud's bound ``c`` (``cloud_lower_bounds``; 0: none)."""
    B, Q, _ = q.shape
    P = p.shape[1]
    out_m = torch.full((B, Q, K), float("inf"), dtype=torch.float32, device=q.device)
    out_i = torch.full((B, Q, K), -1, dtype=torch.int64, device=q.device)
    if B == 0 or Q == 0 or P == 0:
        return out_m, out_i
    grid = Grid(p, p_lengths, k_hint=K)
    qq, qb, qrow = sort_queries(q, torch.full((B,), Q, dtype=torch.int64, device=q.device), grid)
    KP = _kp(K)
    BQ = 32 if KP <= 32 else 16
    _aniso_grid_select_kernel[(triton.cdiv(B * Q, BQ),)](
        qq, qb, qrow, B * Q, grid.xyz, grid.point_idx, grid.cell_start, grid.lo, grid.h,
        grid.dims, grid.base, _stop_factor(lower), _subnormal_margin(sigma, p_lengths),
        sigma.contiguous(), R.contiguous(), out_m, out_i, Q, P, K=K, KP=KP, BQ=BQ, enable_fp_fusion=False)
    return out_m, out_i

"""Triton kernels: the K points with the smallest Gaussian exponent m of each query (brute force),
and the whole forward of ``knn_aggregate_aniso`` fused with that selection. Clouds of more than
``_BRUTE_MAX_POINTS`` points are searched on a grid instead (``kernels/gaussian_grid.py``).

A program per block of queries scans its cloud in tiles of KP points, evaluates
``m = sum_a sigma_a (sum_b R_ab d_b)^2`` in the order of ``gaussian/_exponent.py`` without FMA
(bitwise the torch values), and keeps the K best (m, index) pairs with the packed-key top-k of
``kernels/knn.py``. Exact, deterministic, no Q x P memory. The fused kernel then writes the
weights ``exp(-m)`` and ``f_out = sum_k w_k f_k`` (neighbors in ascending m, float32 sums) from
the same program: the forward without ``(B, Q, K, F)`` or exponent temporaries in memory. (The
weights it returns are ``torch.exp(-m)`` of the written m, bitwise those of the differentiable
path; its own ``tl.exp`` inside the sum may differ from them in the last bit.)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import channel_block, on_tensor_device
from .knn import INF_KEY, _column, _kp, _merge, _pack, _store


@triton.jit
def _exponent(dx, dy, dz, s_ptr, r_ptr, rows, mask):
    """``m = sum_a sigma_a (sum_b R_ab d_b)^2`` for differences ``d`` and the points at ``rows`` of
    sigma ``(n, 3)`` and R ``(n, 3, 3)`` (shapes broadcast against d's), in the order of
    ``gaussian/_exponent.py``: with FMA off at launch, bitwise the torch value."""
    for a in tl.static_range(3):
        r0 = tl.load(r_ptr + rows * 9 + 3 * a, mask=mask, other=0.0)
        r1 = tl.load(r_ptr + rows * 9 + 3 * a + 1, mask=mask, other=0.0)
        r2 = tl.load(r_ptr + rows * 9 + 3 * a + 2, mask=mask, other=0.0)
        sa = tl.load(s_ptr + rows * 3 + a, mask=mask, other=0.0)
        u = r0 * dx + r1 * dy + r2 * dz
        t = sa * (u * u)
        if a == 0:
            m = t
        else:
            m = m + t
    return m


@triton.jit
def _select(q_ptr, p_ptr, s_ptr, r_ptr, plen_ptr, b, rows, row_mask, Q, P,
            K: tl.constexpr, KP: tl.constexpr, BQ: tl.constexpr):
    """The sorted (BQ, KP) packed (m, index) keys of queries ``rows`` of cloud ``b``."""
    npts = tl.load(plen_ptr + b)
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
        m = _exponent(dx, dy, dz, s_ptr, r_ptr, o64[None, :], pm[None, :])  # a tile's points shared by its rows
        m = tl.where(pm[None, :] & row_mask[:, None] & (m == m), m, float("inf"))  # NaN (an overflow inside R d): missing
        best = _merge(best, _pack(m, offs[None, :]), K, KP, BQ)
    return best


@triton.jit
def _aniso_select_kernel(q_ptr, p_ptr, s_ptr, r_ptr, plen_ptr, out_m_ptr, out_i_ptr, Q, P,
                         K: tl.constexpr, KP: tl.constexpr, BQ: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BQ + tl.arange(0, BQ)
    row_mask = rows < Q
    best = _select(q_ptr, p_ptr, s_ptr, r_ptr, plen_ptr, b, rows, row_mask, Q, P, K, KP, BQ)
    _store(best, out_m_ptr + b * Q * K, out_i_ptr + b * Q * K, rows, row_mask, K, KP)


@triton.jit
def _aniso_aggregate_kernel(q_ptr, p_ptr, s_ptr, r_ptr, plen_ptr, f_ptr, out_m_ptr, out_i_ptr, out_f_ptr,
                            Q, P, F, K: tl.constexpr, KP: tl.constexpr, BQ: tl.constexpr, BF: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BQ + tl.arange(0, BQ)
    row_mask = rows < Q
    best = _select(q_ptr, p_ptr, s_ptr, r_ptr, plen_ptr, b, rows, row_mask, Q, P, K, KP, BQ)
    _store(best, out_m_ptr + b * Q * K, out_i_ptr + b * Q * K, rows, row_mask, K, KP)
    m = (best >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    missing = m == float("inf")
    w = tl.where(missing, 0.0, tl.exp(-m))
    nbr = tl.where(missing, -1, b * P + (best & 0xFFFFFFFF))  # int64 rows of f, -1: not read
    ch = tl.arange(0, BF)
    for f0 in range(0, F, BF):
        cmask = f0 + ch < F
        acc = tl.zeros((BQ, BF), tl.float32)
        for k in tl.static_range(K):  # neighbors in ascending m, as the weighted sums of _weighted_sum
            wk = _column(w, k, KP)
            jk = _column(nbr, k, KP)
            ok = row_mask & (jk >= 0)
            fk = tl.load(f_ptr + jk[:, None] * F + f0 + ch[None, :], mask=ok[:, None] & cmask[None, :], other=0.0)
            acc += wk[:, None] * fk.to(tl.float32)
        tl.store(out_f_ptr + (b * Q + rows.to(tl.int64))[:, None] * F + f0 + ch[None, :], acc,
                 mask=row_mask[:, None] & cmask[None, :])


def _launch(KP: int):
    """(queries per program, warps). K <= 16: 16 queries on one warp, 1.26x faster than 32 on four
    for both kernels on an H100 (B = 2, Q = 12,288, P = 4,096, K = 16; benchmarks/sweep_gpu_configs.py,
    RESULTS.md); larger K (not swept) keeps the earlier setting."""
    if KP <= 16:
        return 16, 1
    return (32 if KP <= 32 else 16), 4


# Clouds of more points than this are searched on a grid (kernels/gaussian_grid.py), as the kNN
# kernels do past knn._BRUTE_MAX_POINTS. Not yet timed on a GPU: benchmarks/sweep_gpu_configs.py
# compares the two selections at bench_gaussian's sizes.
_BRUTE_MAX_POINTS = 2048


# The grid's cells and distance bounds are float32 arithmetic on the coordinates: past the kNN
# inputs' limit (squared distances finite, |x| <= ~5e18) a cloud's extent can overflow, which the
# Gaussian op's inputs may (a tiny R keeps m finite); such clouds take the brute-force kernel.
_GRID_MAX_COORD = (torch.finfo(torch.float32).max / 12) ** 0.5


def _grid_pays(q, p, K, max_coord=None) -> bool:
    """Whether the grid selects (``max_coord``: the largest ``|coordinate|`` of q and p, if read)."""
    if p.shape[1] <= _BRUTE_MAX_POINTS or q.shape[0] == 0 or q.shape[1] == 0:
        return False
    if max_coord is None:
        max_coord = float(torch.maximum(q.abs().amax(), p.abs().amax()))
    return max_coord <= _GRID_MAX_COORD


def _select_on_grid(q, p, sigma, R, K, p_lengths):
    from .gaussian_grid import select_aniso_grid

    return select_aniso_grid(q, p, sigma, R, K, p_lengths)


@on_tensor_device
def select_aniso(q, p, sigma, R, K, p_lengths, max_coord=None):
    """``(B, Q, K)`` int64 indices of the K smallest exponents (ties to the lower index), -1 padded."""
    B, Q, _ = q.shape
    P = p.shape[1]
    if _grid_pays(q, p, K, max_coord):
        return _select_on_grid(q, p, sigma, R, K, p_lengths)[1]
    out_m = torch.full((B, Q, K), float("inf"), dtype=torch.float32, device=q.device)
    out_i = torch.full((B, Q, K), -1, dtype=torch.int64, device=q.device)
    if B == 0 or Q == 0 or P == 0:
        return out_i
    KP = _kp(K)
    BQ, warps = _launch(KP)
    _aniso_select_kernel[(triton.cdiv(Q, BQ), B)](
        q.contiguous(), p.contiguous(), sigma.contiguous(), R.contiguous(), p_lengths.contiguous(),
        out_m, out_i, Q, P, K=K, KP=KP, BQ=BQ, enable_fp_fusion=False, num_warps=warps)
    return out_i


@on_tensor_device
def aggregate_aniso(q, p, f, sigma, R, K, p_lengths, max_coord=None):
    """The forward of ``knn_aggregate_aniso`` (``select="aniso"``, float32 coordinates) in one kernel:
    ``(f_out (B, Q, F) float32, w (B, Q, K), m (B, Q, K), idx (B, Q, K) int64)``, padded like the op."""
    B, Q, _ = q.shape
    P, F = p.shape[1], f.shape[2]
    if _grid_pays(q, p, K, max_coord):  # the grid's selection, then the weighted-sum kernel (neighbors in ascending m)
        from .weighted_sum import gather_sum

        out_m, out_i = _select_on_grid(q, p, sigma, R, K, p_lengths)
        w = torch.where(out_i >= 0, torch.exp(-out_m), 0.0)
        flat = torch.where(out_i >= 0, out_i + (torch.arange(B, device=q.device) * P)[:, None, None], -1)
        out_f = gather_sum(w.reshape(B * Q, K), f.reshape(B * P, F), flat.reshape(B * Q, K))
        return out_f.float().reshape(B, Q, F), w, out_m, out_i
    out_m = torch.full((B, Q, K), float("inf"), dtype=torch.float32, device=q.device)
    out_i = torch.full((B, Q, K), -1, dtype=torch.int64, device=q.device)
    out_f = torch.zeros((B, Q, F), dtype=torch.float32, device=q.device)
    if B == 0 or Q == 0 or P == 0:
        return out_f, torch.zeros_like(out_m), out_m, out_i
    KP = _kp(K)
    BQ, warps = _launch(KP)
    _aniso_aggregate_kernel[(triton.cdiv(Q, BQ), B)](
        q.contiguous(), p.contiguous(), sigma.contiguous(), R.contiguous(), p_lengths.contiguous(),
        f.contiguous(), out_m, out_i, out_f, Q, P, F, K=K, KP=KP, BQ=BQ,
        BF=channel_block(F, 64), enable_fp_fusion=False, num_warps=warps)
    return out_f, torch.where(out_i >= 0, torch.exp(-out_m), 0.0), out_m, out_i

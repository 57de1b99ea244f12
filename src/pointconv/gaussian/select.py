"""Exact selection of the K points with the smallest Gaussian exponent ``m`` (``select="aniso"``).

Ties go to the lower index, as in the reference; no path evaluates the exponent formula on a
dense Q x P matrix unless it must. Three strategies, each exact:

* triton backend, float32: a brute-force kernel with a packed-key top-k (``kernels/gaussian.py``).
* CUDA float64, and CPU clouds where the kd-tree does not pay (``_tree_pays``): ``_select_gemm``. ``m = d^T M d`` is a dot
  product of quadratic features, so one float32 GEMM (float64 where torch's matmul precision
  settings allow TF32 / bf16) ranks every point; the K + 4 best are
  re-ranked with the exact formula, and a bound on both roundings certifies that no other point
  can enter. Near-tie rows are evaluated densely (``_select_dense``).
* large, not too anisotropic clouds on CPU: ``_select_tree``. ``m_ij >= c * |q_i - p_j|^2`` with ``c`` the smallest
  eigenvalue of ``R_j^T diag(sigma_j) R_j`` over the cloud, less a rounding margin
  (``exponent_bounds``). Each query ranks its Euclidean nearest points from a kd-tree; the answer
  is certified when ``c`` times the squared distance of the farthest candidate exceeds the K-th
  m. Uncertified queries try again with 4x more candidates, ending at the whole cloud. A cloud
  with ``c <= 0`` (a singular R) falls back to the GEMM.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .._backend import TRITON_MAX_K, backend_for
from .._func_transforms import outside_func_transforms
from .._matmul_precision import ieee_float32_matmul, no_autocast
from ..neighbors._cpu import build_tree
from ._exponent import exponent_bounds, gaussian_exponent

_CHUNK_ELEMENTS = 1 << 22  # query x point pairs per dense chunk
# On CPU a kd-tree candidate (its query, its exponent, its rank) costs about 60 entries of the GEMM
# path (each a 10-term product and its share of the top-k): about 150 ns against 2.5 ns
# (benchmarks/bench_gaussian.py --selection).
_TREE_CANDIDATE_COST = 60
# Clouds of at most this many points are ranked by every exponent, many clouds per pass: below it
# the GEMM path's fixed cost per cloud (features, a top-k, the re-ranking) outweighs n exponents
_SMALL_CLOUD = 64


def _tree_pays(n: int, K: int, spread: float) -> bool:
    """Whether the kd-tree (``_select_tree``) beats the GEMM on a CPU cloud of ``n`` points: a query
    needs about ``K (1 + spread^1.5)`` candidates from the tree, and the GEMM ranks all ``n``."""
    return _TREE_CANDIDATE_COST * K * (1 + spread ** 1.5) < n


def _rank(m: torch.Tensor, cand: torch.Tensor, K: int):
    """Per row, the K smallest (m, index) pairs: indices (n, K) padded with -1, and the K-th m.

    float32: one top-k over int64 keys ``(bits of m) << 32 | index`` (m >= 0 orders like its bits,
    and equal m order by index). float64: two stable sorts.
    """
    n, c = m.shape
    kk = min(K, c)
    m = torch.where(m.isnan(), float("inf"), m)  # missing, as in the reference (a NaN key's sign bit ranked it first)
    if m.dtype == torch.float32 and c:
        key = (m.view(torch.int32).to(torch.int64) << 32) | cand
        key = torch.topk(key, kk, dim=1, largest=False, sorted=True).values
        m_sel = (key >> 32).to(torch.int32).view(torch.float32)
        cand_sel = key & 0xFFFFFFFF
    else:
        order = torch.argsort(cand, dim=1, stable=True)
        m, cand = m.gather(1, order), cand.gather(1, order)
        order = torch.argsort(m, dim=1, stable=True)
        m_sel, cand_sel = m.gather(1, order)[:, :kk], cand.gather(1, order)[:, :kk]
    idx = torch.full((n, K), -1, dtype=torch.int64, device=m.device)
    idx[:, :kk] = torch.where(torch.isinf(m_sel), -1, cand_sel)
    kth = m_sel[:, K - 1] if c >= K else torch.full((n,), float("inf"), dtype=m.dtype, device=m.device)
    return idx, kth


def _exponents(q, table, cand):
    """m of each query against its candidates; ``table (n, 15)`` packs p, sigma and R per point."""
    rows = table.index_select(0, cand.reshape(-1)).view(*cand.shape, 15)
    return gaussian_exponent(q[:, None, :] - rows[..., :3], rows[..., 3:6], rows[..., 6:].unflatten(-1, (3, 3)))


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


def _select_small_clouds(q, p, sigma, R, K, p_lengths, clouds, out):
    """Exact, for many small clouds at once: every exponent of a chunk of clouds ``(c, Q, n_max)``
    (the padding past each cloud's length made inf, which ranks as missing), written into
    ``out[clouds]``. One pass over a batch where a call per cloud cost more than its work."""
    Q = q.shape[1]
    sel = torch.tensor(clouds, dtype=torch.int64, device=q.device)
    n = p_lengths.to(q.device).index_select(0, sel)
    T = int(n.max())
    step = max(1, _CHUNK_ELEMENTS // (16 * Q * T))
    cols = torch.arange(T, device=q.device)
    for s in range(0, len(clouds), step):
        b = sel[s:s + step]
        m = gaussian_exponent(q.index_select(0, b)[:, :, None] - p.index_select(0, b)[:, None, :T],
                              sigma.index_select(0, b)[:, None, :T], R.index_select(0, b)[:, None, :T])
        m = m.masked_fill(cols >= n[s:s + step, None, None], float("inf"))
        got, _ = _rank(m.flatten(0, 1), cols.expand(m.shape[0] * Q, T), K)
        out[b] = got.view(-1, Q, K)


def _quadratic_features(q, p, sigma, R):
    """``Phi (Q, 10)`` and ``Psi (n, 10)`` (float64) with ``Phi[i] . Psi[j] = m_ij`` in exact arithmetic.

    ``m = d^T M d`` with ``M = R^T diag(sigma) R`` expands into products of a query's quadratic
    monomials and a point's coefficients, so all exponents of a block come from one GEMM. The
    cloud is centered first (m depends on q - p only): smaller terms, smaller rounding.
    """
    center = p.double().mean(0)
    q = q.double() - center
    p = p.double() - center
    M = R.double().transpose(-1, -2) @ (sigma.double().unsqueeze(-1) * R.double())
    Mp = (M @ p.unsqueeze(-1)).squeeze(-1)
    psi = torch.stack([M[:, 0, 0], M[:, 1, 1], M[:, 2, 2], 2 * M[:, 0, 1], 2 * M[:, 0, 2], 2 * M[:, 1, 2],
                       -2 * Mp[:, 0], -2 * Mp[:, 1], -2 * Mp[:, 2], (p * Mp).sum(-1)], 1)
    x, y, z = q.unbind(1)
    phi = torch.stack([x * x, y * y, z * z, x * y, x * z, y * z, x, y, z, torch.ones_like(x)], 1)
    return phi, psi, M, q, p


def _select_gemm(q, p, sigma, R, K):
    """Exact: a float32 GEMM ranks every point approximately, the exact formula re-ranks the best.

    Each query keeps the K + 4 smallest approximate exponents as candidates, evaluates them with
    ``gaussian_exponent`` and ranks by (m, index). Every other point's approximate exponent is at
    least the candidates' largest; with the GEMM's error and the exact formula's rounding bounded
    (``margin``), that certifies the answer. Uncertified rows (near-ties) are evaluated densely.
    """
    n = p.shape[0]
    phi, psi, M, qc, pc = _quadratic_features(q, p, sigma, R)
    table = torch.cat([p, sigma, R.reshape(-1, 9)], 1).contiguous()
    out = torch.full((q.shape[0], K), -1, dtype=torch.int64, device=q.device)
    e = min(K + 4, n)
    # Every product and partial sum of the GEMM is at most max_i sum_l |phi_il| * max |psi|: below
    # float32's range the GEMM runs in float32, else (sigma |R|^2 or centered coordinates past
    # ~1e19, where m itself may still be O(1)) in float64 (its error is within the float32 margin),
    # and beyond float64's range every row is evaluated densely
    gemm_dtype = torch.float64
    if n and q.shape[0]:
        bound = float(phi.abs().sum(1).max()) * float(psi.abs().max())
        if not bound < torch.finfo(torch.float64).max / 16:
            return _select_dense(q, p, sigma, R, K)
        # (and only where float32 products round as IEEE float32: not under TF32 / bf16 settings)
        if bound < torch.finfo(torch.float32).max / 16 and ieee_float32_matmul(q.device):
            gemm_dtype = torch.float32
    # The GEMM's terms are at most lam_max (|q| + |p|)^2 (centered), each rounded once and summed
    # over 10 products; the exact formula's own rounding is at most 8 eps s (|q| + |p|)^2 with
    # s = sum_a sigma_a (sum_b |R_ab|)^2.
    lam_max = float(torch.linalg.eigvalsh(M)[:, -1].max())
    sigma64, R64 = sigma.double(), R.double()
    s = float((sigma64 * R64.abs().sum(-1).square()).sum(-1).max())
    reach = (qc.norm(dim=1) + float(pc.norm(dim=1).max())).square()
    margin = (64 * torch.finfo(torch.float32).eps * lam_max + 8 * torch.finfo(q.dtype).eps * s) * reach
    # Below the normal range a rounding errs absolutely, by up to the smallest subnormal (``tiny``),
    # not relatively: in the GEMM's features, products and sums (the features' absolute sums bound
    # what each costs), and in the exact formula's u = R d, u^2, sigma u^2 and sums (|u_a| <= sum_b
    # |R_ab| |d|). Negligible unless m is itself near the subnormal range of those terms.
    tiny_g, tiny_q = (torch.finfo(dt).smallest_normal * torch.finfo(dt).eps for dt in (gemm_dtype, q.dtype))
    if n:
        s0 = float(sigma64.sum(-1).max())
        s1 = float((sigma64 * R64.abs().sum(-1)).sum(-1).max())
        margin = margin + 2 * (tiny_g * (float(psi.abs().sum(1).max()) + phi.abs().sum(1) + 20)
                               + tiny_q * (10 * s1 * reach.sqrt() + s0 + 5))
    phi, psi = phi.to(gemm_dtype), psi.to(gemm_dtype)
    step = max(1, _CHUNK_ELEMENTS // n)
    for st in range(0, q.shape[0], step):
        approx = phi[st:st + step] @ psi.T
        rows = torch.arange(approx.shape[0], device=q.device)  # (in the chunk) still to certify
        width = e
        while rows.numel():
            # the rows' ``width`` smallest approximate exponents, in pieces of ~ a dense chunk's entries
            piece = max(1, _CHUNK_ELEMENTS // (16 * width))
            failed = []
            for a in range(0, rows.numel(), piece):
                r = rows[a:a + piece]
                vals, cand = torch.topk(approx[r], width, dim=1, largest=False, sorted=True)
                idx, kth = _rank(_exponents(q[st + r], table, cand), cand, K)
                out[st + r] = idx
                if width < n:  # certified only where the bound holds (a NaN, from an overflow, never does)
                    failed.append(r[~(vals[:, -1].double() - margin[st + r] > kth.double())])
            rows = torch.cat(failed) if failed else rows[:0]
            # Near-ties, or a margin wide against the exponents' spread (very anisotropic
            # precisions: lam_max 1e8 made it ~1e3 and every row failed with K + 4): 4x more
            # candidates per round, then every point exactly (the dense pass's Q x P formula cost
            # 40x the GEMM on such clouds)
            if rows.numel() and 4 * width >= n // 4:
                out[st + rows] = _select_dense(q[st + rows], p, sigma, R, K)
                break
            width = 4 * width
    return out


def _select_tree(q, p, sigma, R, K, bound, spread):
    """Exact on CPU with a kd-tree over ``p``; ``bound * |d|^2`` bounds every computed m below.

    ``spread`` (largest eigenvalue over ``bound``) sizes the first round: the K smallest m of a
    query lie within about ``spread**1.5`` times the volume of its K nearest points.
    """
    n = p.shape[0]
    tree = build_tree(p)
    table = torch.cat([p, sigma, R.reshape(-1, 9)], 1).contiguous()
    out = torch.full((q.shape[0], K), -1, dtype=torch.int64)
    rows = torch.arange(q.shape[0])
    # below the normal range the computed m also errs absolutely (``_select_gemm``'s margin): a point
    # at distance x has computed m >= bound x^2 - lin x - const, which grows beyond x = lin / (2 bound)
    tiny = torch.finfo(q.dtype).smallest_normal * torch.finfo(q.dtype).eps
    sigma64 = sigma.double()
    lin = 20 * tiny * float((sigma64 * R.double().abs().sum(-1)).sum(-1).max())
    const = 2 * tiny * (float(sigma64.sum(-1).max()) + 5)
    c = min(n, int(K * (1 + min(spread, 64.0) ** 1.5)))
    q64 = q.double().numpy()
    while rows.numel():
        step = max(1, _CHUNK_ELEMENTS // (c * 16))
        pending = []
        for s in range(0, rows.numel(), step):
            r = rows[s:s + step]
            dd, ii = tree.query(q64[r.numpy()], k=c, workers=-1)
            dd, ii = np.asarray(dd).reshape(len(r), c), np.asarray(ii).reshape(len(r), c)
            cand = torch.from_numpy(ii).to(torch.int64)
            idx, kth = _rank(_exponents(q[r], table, cand), cand, K)
            if c == n:
                certified = torch.ones(len(r), dtype=torch.bool)
            else:
                far = torch.from_numpy(dd[:, -1])
                unseen = bound * far.square() * (1 - 1e-12) - lin * far - const
                certified = (unseen > kth.double()) & (far >= lin / (2 * bound))
            out[r[certified]] = idx[certified]
            pending.append(r[~certified])
        rows = torch.cat(pending)
        c = min(4 * c, n)
    return out


@torch.no_grad()
@outside_func_transforms  # (kd-trees and kernels read values; the selection is not differentiated)
def select_aniso(q, p, sigma, R, K, p_lengths, max_coord=None):
    """Indices ``(B, Q, K)`` of the K smallest exponents (ties to the lower index), -1 padded.
    ``max_coord``: the largest ``|coordinate|`` of q and p, when the caller has read it."""
    # the GEMM's bound and the exact formula are float32's / float64's: an autocast region
    # would run their products in fp16 / bf16
    with no_autocast(q.device):
        B, Q, _ = q.shape
        backend = backend_for(q.device)
        if backend == "triton" and q.dtype == torch.float32 and K <= TRITON_MAX_K:
            from ..kernels.gaussian import select_aniso as select_triton

            return select_triton(q, p, sigma, R, K, p_lengths, max_coord)
        idx = torch.full((B, Q, K), -1, dtype=torch.int64, device=q.device)
        if Q == 0:
            return idx
        use_tree = backend == "torch" and q.device.type == "cpu"
        lengths = p_lengths.tolist()
        # (a chunk holds at least one cloud's Q x n exponents: with many queries, the loop below)
        small_max = _SMALL_CLOUD if 16 * Q * _SMALL_CLOUD <= _CHUNK_ELEMENTS else 0
        small = [b for b, n in enumerate(lengths) if 0 < n <= small_max]
        if small:
            _select_small_clouds(q, p, sigma, R, K, p_lengths, small, idx)
        for b, n in enumerate(lengths):
            if n <= small_max:  # (no points, or done above)
                continue
            qb, pb, sb, Rb = q[b], p[b, :n], sigma[b, :n], R[b, :n]
            # (spread >= 1: no cloud this small pays for the bounds' eigenvalues)
            worth_a_look = use_tree and _tree_pays(n, K, 1.0)
            bound, spread = exponent_bounds(sb, Rb) if worth_a_look else (0.0, math.inf)
            if bound > 0 and math.isfinite(bound) and _tree_pays(n, K, spread):
                idx[b] = _select_tree(qb, pb, sb, Rb, K, bound, spread)
            else:
                idx[b] = _select_gemm(qb, pb, sb, Rb, K)
        return idx

"""kNN feature aggregation with anisotropic Gaussian weights (compatible with ``cuda_knn_aggregate``).

Semantics (DESIGN.md 5.1): for query i and point j, ``d = q_i - p_j``, ``u = R_j d``,
``m_ij = sum_a sigma_j[a] * u_a**2`` (sigma is a per-axis PRECISION), ``w_ij = exp(-m_ij)``.
Neighbors: the K smallest m (``select="aniso"``, the original's rule) or the K nearest points
(``select="euclidean"``). Outputs ``f_out = sum_k w_k f_k`` (not normalized), per-neighbor weights,
ascending ``dists`` and int64 indices; missing neighbors (K > P, or beyond ``p_lengths``) have
``idx = -1``, weight 0 and ``dists = inf``. With ``select="aniso"`` a point whose exponent
overflows the coordinates' dtype (``m = inf``; its weight is 0 either way) counts as missing too.

Neighbor selection is piecewise constant and not differentiated; everything after it is exact to
any order, and ``(B, Q, K, F)`` never exists. The torch backend builds it from differentiable ops
(gathers, the exponent formula, and the weighted sums of ``pointconv._weighted_sum``). The Triton
backend runs ``GaussianSum`` (``_kernel_autograd.py``): a kernel forward, a two-kernel backward and
a double backward in torch ops that calls the backward kernels again. A forward that records no
gradient (inference, ``torch.no_grad``; ``select="aniso"``, float32) runs as one kernel that also
selects (``kernels/gaussian.py``). Weights, exponents and indices are bitwise the same on every
path; the sums agree to rounding (the kernels sum without FMA).
"""
from __future__ import annotations

import torch

from .. import _checks
from .. import _device_transfers as transfers
from .._backend import TRITON_MAX_K, backend_for
from .._func_transforms import has_tangent, under_grad_transforms
from .._matmul_precision import no_autocast
from .._weighted_sum import gather_sum
from ..neighbors import gather, knn
from .._graph_zeros import zeros_like_graph
from ..neighbors._distance import sq_dist
from ._exponent import gaussian_exponent
from ._kernel_autograd import GaussianSum
from ._reference import knn_aggregate_aniso_reference
from .select import select_aniso

__all__ = ["knn_aggregate_aniso", "knn_aggregate_iso"]

_SELECT = ("aniso", "euclidean")


def _check(q, p, f, sigma, R, K, p_lengths, select, sigma_last):
    """``(K, p_lengths, largest |coordinate| of q and p)``, or a ValueError / TypeError. The values'
    checks (finite coordinates, sigma and R) are read from the device at once: each read waits for
    it, and a call on a GPU spent more time in them than in its kernels."""
    _checks.coords("p", p, ndim=3, dim=3, finite=False)
    _checks.tensor("q", q)
    _checks.same_device(p=p, q=q, f=f if isinstance(f, torch.Tensor) else None)
    _checks.coords("q", q, ndim=3, dim=3, finite=False)
    _checks.same_dtype(p=p, q=q)
    B, P, _ = p.shape
    if q.shape[0] != B:
        raise ValueError(f"q has batch size {q.shape[0]} but p has {B}")
    _checks.tensor("f", f)
    if not f.is_floating_point():
        raise TypeError(f"f must be a floating-point tensor, got dtype {f.dtype}")
    if f.dtype == torch.float64 and p.dtype != torch.float64:
        # the weights and sums run in the coordinates' precision: float64 features would be rounded
        raise TypeError(f"f is float64 but the coordinates are {p.dtype}: pass float64 q, p, sigma and R "
                        "(or float16 / bfloat16 / float32 features)")
    if f.dim() != 3 or f.shape[:2] != (B, P):
        raise ValueError(f"f must have shape ({B}, {P}, F), got shape {tuple(f.shape)}")
    _checks.tensor("sigma", sigma)
    if sigma.dtype != p.dtype:
        raise TypeError(f"sigma must have the dtype of p ({p.dtype}), got {sigma.dtype}")
    if sigma.shape != (B, P, sigma_last):
        raise ValueError(f"sigma must have shape ({B}, {P}, {sigma_last}), got shape {tuple(sigma.shape)}")
    _checks.same_device(p=p, sigma=sigma)
    if R is not None:
        _checks.tensor("R", R)
        if R.dtype != p.dtype:
            raise TypeError(f"R must have the dtype of p ({p.dtype}), got {R.dtype}")
        if R.shape != (B, P, 3, 3):
            raise ValueError(f"R must have shape ({B}, {P}, 3, 3), got shape {tuple(R.shape)}")
        _checks.same_device(p=p, R=R)
    K = _checks.positive_int("K", K)
    _checks.output_size("K", B, q.shape[1], K)
    if select not in _SELECT:
        raise ValueError(f"select must be one of {_SELECT}, got {select!r}")
    values = [_checks.max_abs(p), _checks.max_abs(q),
              (~(torch.isfinite(sigma) & (sigma > 0))).any().double(),
              (~torch.isfinite(R)).any().double() if R is not None else torch.zeros_like(_checks.max_abs(p))]
    p_max, q_max, bad_sigma, bad_R = transfers.host_floats(torch.stack(values))
    _checks.finite_coords("p", p_max)
    _checks.finite_coords("q", q_max)
    if bad_sigma:
        raise ValueError("sigma must be finite and > 0 (a per-axis precision)")
    if bad_R:
        raise ValueError("R contains NaN or Inf")
    p_lengths = _checks.lengths("p_lengths", p_lengths, B, P, p.device)
    return K, p_lengths, max(p_max, q_max)


def _empty(q, p, f, sigma, R, K):
    """The result without any point (P = 0): zero sums and weights, idx -1, dists inf; attached
    to the inputs' graph (zero gradients)."""
    B, Q, _ = q.shape
    inputs = (q, p, f, sigma, R)
    f_out = zeros_like_graph((B, Q, f.shape[2]), f.dtype, q.device, *inputs)
    w = zeros_like_graph((B, Q, K), q.dtype, q.device, *inputs)
    dists = w + float("inf")
    return f_out, w, dists, torch.full((B, Q, K), -1, dtype=torch.int64, device=q.device)


def _fused_forward(q, p, f, sigma, R, K, select) -> bool:
    """Whether one Triton kernel computes the whole forward: float32 ``select="aniso"`` on the
    Triton backend when no gradient is recorded (a recorded forward keeps the differentiable ops)."""
    # (nor for forward-mode duals or under torch.func: the kernel has no autograd at all, where the
    # unfused ops raise for want of a jvp / setup_context instead of dropping the derivative)
    recording = (torch.is_grad_enabled() and any(t.requires_grad for t in (q, p, f, sigma, R))) \
        or any(has_tangent(t) for t in (q, p, f, sigma, R)) or under_grad_transforms()
    return (select == "aniso" and q.dtype == torch.float32 and backend_for(q.device) == "triton" and not recording
            and K <= TRITON_MAX_K)


def _aggregate(q, p, f, sigma, R, K, p_lengths, select, max_coord=None):
    if _fused_forward(q, p, f, sigma, R, K, select):
        from ..kernels.gaussian import aggregate_aniso
        f_out, w, m, idx = aggregate_aniso(q, p, f, sigma, R, K, p_lengths, max_coord)
        return f_out.to(f.dtype), w, m, idx
    B, Q, _ = q.shape
    P, F = p.shape[1], f.shape[2]
    if select == "aniso":
        idx = select_aniso(q.detach(), p.detach(), sigma.detach(), R.detach(), K, p_lengths, max_coord)
    else:
        idx = knn(q.detach(), p.detach(), K, points_lengths=p_lengths).idx
    valid = idx >= 0
    if backend_for(q.device) == "triton":
        f_out, w, m = GaussianSum.apply(q, p, f, sigma, R, idx)
        pg = None if select == "aniso" else gather(p, idx)
    else:
        pg = gather(p, idx)
        d = q[:, :, None, :] - pg
        m = gaussian_exponent(d, gather(sigma, idx), gather(R.reshape(B, P, 9), idx).unflatten(-1, (3, 3)))
        w = torch.where(valid, torch.exp(-m), torch.zeros_like(m))
        offsets = (torch.arange(B, device=q.device) * P)[:, None, None]
        flat_idx = torch.where(valid, idx + offsets, -1).reshape(B * Q, K)
        fc = f.to(q.dtype)  # fp16/bf16 features accumulate in the coordinates' precision
        f_out = gather_sum(w.reshape(B * Q, K), fc.reshape(B * P, F), flat_idx).reshape(B, Q, F)
    key = m if select == "aniso" else sq_dist(q[:, :, None, :], pg)
    dists = torch.where(valid, key, torch.full_like(key, float("inf")))
    return f_out.to(f.dtype), w, dists, idx


def knn_aggregate_aniso(q, p, f, sigma, R, K, *, p_lengths=None, select="aniso"):
    """Aggregate the features of each query's K neighbors with anisotropic Gaussian weights.

    Args:
        q: ``(B, Q, 3)`` query points; p: ``(B, P, 3)`` feature points (float32/float64).
        f: ``(B, P, F)`` features (fp16/bf16 accumulate in the coordinates' dtype; float64 needs
           float64 coordinates). Runs in these dtypes inside ``torch.autocast`` regions too.
        sigma: ``(B, P, 3)`` per-axis precisions (> 0); R: ``(B, P, 3, 3)``, applied as ``u = R (q - p)``.
        K: neighbors per query. p_lengths: optional ``(B,)`` valid lengths of ``p``.
        select: ``"aniso"`` (K smallest m) or ``"euclidean"`` (K nearest points).

    Returns:
        ``(f_out (B, Q, F), w_out (B, Q, K), dists (B, Q, K), idxs (B, Q, K) int64)``: the weighted
        sum ``sum_k w_k f_k`` (not normalized), the weights ``exp(-m)``, and per neighbor its ``m``
        (``select="aniso"``) or SQUARED Euclidean distance (``"euclidean"``), ascending (ties to the
        lower index). Missing neighbors (and, with ``select="aniso"``, points whose exponent overflows
        to inf): ``idx = -1``, weight 0, ``dists = inf``. All of
        ``f_out``, ``w_out`` and ``dists`` are differentiable w.r.t. q, p, f, sigma and R to any order.
    """
    _checks.tensor("R", R)  # None is the isotropic call's
    K, p_lengths, max_coord = _check(q, p, f, sigma, R, K, p_lengths, select, 3)
    if p.shape[1] == 0:
        return _empty(q, p, f, sigma, R, K)
    with no_autocast(q.device):  # float32 / float64 math (half features accumulate in it), as documented
        if backend_for(q.device) == "reference":
            return knn_aggregate_aniso_reference(q, p, f, sigma, R, K, p_lengths=p_lengths, select=select)
        return _aggregate(q, p, f, sigma, R, K, p_lengths, select, max_coord)


def knn_aggregate_iso(q, p, f, sigma, K, *, p_lengths=None, select="aniso"):
    """Isotropic version: ``sigma (B, P, 1)``, ``m = sum_a sigma * (q - p)_a**2``. See knn_aggregate_aniso."""
    K, p_lengths, max_coord = _check(q, p, f, sigma, None, K, p_lengths, select, 1)
    B, P, _ = p.shape
    if P == 0:
        return _empty(q, p, f, sigma, None, K)
    eye = torch.eye(3, dtype=p.dtype, device=p.device).expand(B, P, 3, 3)
    sigma3 = sigma.expand(B, P, 3)
    with no_autocast(q.device):
        if backend_for(q.device) == "reference":
            return knn_aggregate_aniso_reference(q, p, f, sigma3, eye, K, p_lengths=p_lengths, select=select)
        return _aggregate(q, p, f, sigma3, eye, K, p_lengths, select, max_coord)

"""The one formula for the Gaussian exponent ``m`` that every path evaluates.

``d = q - p``, ``u_a = sum_b R[a, b] d_b`` (b in order 0, 1, 2), ``m = sum_a sigma_a u_a**2`` (a in
order 0, 1, 2): ``sigma`` is a per-axis PRECISION (no 1/2 factor), ``w = exp(-m)``. Written as
explicit element-wise products and sums, so dense and gathered evaluations round identically.
"""
from __future__ import annotations

import torch


def gaussian_exponent(d: torch.Tensor, sigma: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """``m`` for broadcastable ``d (..., 3)``, ``sigma (..., 3)``, ``R (..., 3, 3)`` -> ``(...)``."""
    m = None
    for a in range(3):
        u = R[..., a, 0] * d[..., 0] + R[..., a, 1] * d[..., 1] + R[..., a, 2] * d[..., 2]
        t = sigma[..., a] * (u * u)
        m = t if m is None else m + t
    return m


def exponent_bounds(sigma: torch.Tensor, R: torch.Tensor) -> tuple[float, float]:
    """``(c, spread)``: ``computed m >= c * |d|^2`` for every point of the cloud, and the largest
    eigenvalue of any ``R^T diag(sigma) R`` over ``c`` (how far, relative to the K nearest points,
    the K smallest m can lie).

    ``lam``, the smallest eigenvalue of ``R^T diag(sigma) R``, bounds the exact ``m``; rounding in
    ``gaussian_exponent`` can lower the computed value by at most about ``8 eps * s |d|^2`` with
    ``s = sum_a sigma_a (sum_b |R_ab|)^2``. ``c <= 0`` means no useful bound.
    """
    if sigma.numel() == 0:
        return 0.0, 1.0
    s = sigma.double()
    Rd = R.double()
    M = Rd.transpose(-1, -2) @ (s.unsqueeze(-1) * Rd)
    if not bool(torch.isfinite(M).all()):  # past float64's range (eigvalsh would fail to converge)
        return 0.0, float("inf")
    eig = torch.linalg.eigvalsh(M)
    scale = (s * Rd.abs().sum(-1).square()).sum(-1).max()
    c = float(eig[..., 0].min() * (1 - 1e-9) - 8 * torch.finfo(sigma.dtype).eps * scale)
    return c, float(eig[..., -1].max()) / c if c > 0 else float("inf")


def cloud_lower_bounds(sigma: torch.Tensor, R: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``(B,)`` float64: for each cloud of a padded batch (``sigma (B, P, 3)``, ``R (B, P, 3, 3)``,
    ``lengths (B,)``) the ``c`` of ``exponent_bounds`` over its first ``lengths[b]`` points, on the
    inputs' device with no host round trip; 0 where there is no bound (c <= 0, an R^T diag(sigma) R
    past float64's range, or no points)."""
    B, P = sigma.shape[:2]
    s = sigma.double()
    Rd = R.double()
    M = Rd.transpose(-1, -2) @ (s.unsqueeze(-1) * Rd)
    valid = torch.arange(P, device=sigma.device)[None, :] < lengths[:, None]
    finite = torch.isfinite(M).all(-1).all(-1)
    bad = (valid & ~finite).any(1)
    eye = torch.eye(3, dtype=M.dtype, device=M.device)
    eig = torch.linalg.eigvalsh(torch.where((valid & finite)[..., None, None], M, eye))[..., 0]
    scale = (s * Rd.abs().sum(-1).square()).sum(-1)
    lam = torch.where(valid, eig, torch.inf).amin(1) if P else torch.full((B,), torch.inf, dtype=M.dtype,
                                                                          device=M.device)
    top = torch.where(valid & finite, scale, 0).amax(1) if P else torch.zeros_like(lam)
    c = lam * (1 - 1e-9) - 8 * torch.finfo(sigma.dtype).eps * top
    return torch.where(bad | ~torch.isfinite(c), 0.0, c.clamp(min=0))

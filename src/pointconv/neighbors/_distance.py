"""The one squared-distance formula every neighbor path uses.

``(a - b)`` per coordinate, squared, summed in coordinate order 0, 1, ..., D-1. The Triton kernels
evaluate the same expression in the same order with floating-point contraction (FMA) disabled, so
every backend returns bitwise the same squared distances as the reference.
"""
from __future__ import annotations

import numpy as np
import torch


def sq_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distance between broadcastable ``(..., D)`` tensors -> ``(...)``."""
    diff = a - b
    out = diff[..., 0] * diff[..., 0]
    for i in range(1, diff.shape[-1]):
        out = out + diff[..., i] * diff[..., i]
    return out


def sq_dist_gathered(q: torch.Tensor, p_columns: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``sq_dist(q[:, None, :], p[idx])`` for ``q (n, D)``, ``p_columns = p.T.contiguous()`` and ``idx (n, k)``.

    The same operations in the same order (bitwise equal), one coordinate at a time: no
    ``(n, k, D)`` temporaries, about 3x faster on CPU.
    """
    flat = idx.reshape(-1)
    out = None
    for c in range(p_columns.shape[0]):
        diff = q[:, c, None] - p_columns[c].index_select(0, flat).view(idx.shape)
        diff.mul_(diff)
        out = diff if out is None else out.add_(diff)
    return out


def radius_squared(radius: float, dtype: torch.dtype) -> float:
    """``radius**2`` rounded to ``dtype``: the threshold every backend compares with (closed ball).
    Computed on the host (a 0-dim torch tensor's ``item()`` reads like a device value)."""
    if dtype == torch.float64:
        return radius * radius
    with np.errstate(over="ignore"):  # beyond float32's range: inf, as torch's cast gives
        return float(np.float32(radius * radius))

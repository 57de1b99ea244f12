"""The one squared-distance formula every neighbor path uses.

``(a - b)`` per coordinate, squared, summed in coordinate order 0, 1, ..., D-1. The Triton kernels
evaluate the same expression in the same order with floating-point contraction (FMA) disabled, so
every backend returns bitwise the same squared distances as the reference.
"""
from __future__ import annotations

import torch


def sq_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distance between broadcastable ``(..., D)`` tensors -> ``(...)``."""
    diff = a - b
    out = diff[..., 0] * diff[..., 0]
    for i in range(1, diff.shape[-1]):
        out = out + diff[..., i] * diff[..., i]
    return out


def radius_squared(radius: float, dtype: torch.dtype) -> float:
    """``radius**2`` rounded to ``dtype``: the threshold every backend compares with (closed ball)."""
    return torch.tensor(radius * radius, dtype=torch.float64).to(dtype).item()

"""Zeros that stay on the autograd graph of the inputs they stand for (empty clouds, no neighbors)."""
from __future__ import annotations

import torch


def zeros_like_graph(shape, dtype: torch.dtype, device, *inputs) -> torch.Tensor:
    """Zeros of ``shape`` that depend on every ``input`` requiring a gradient, so an empty input
    still gives a differentiable result (its gradients are zeros). Each input enters as the sum of
    none of its elements: exactly 0, never NaN, whatever the input holds."""
    out = torch.zeros(shape, dtype=dtype, device=device)
    for t in inputs:
        if isinstance(t, torch.Tensor) and t.requires_grad:
            out = out + t.reshape(-1)[:0].sum().to(dtype)
    return out

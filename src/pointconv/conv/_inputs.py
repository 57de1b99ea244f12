"""Input helpers of the conv, nn and gaussian modules: checked grid origins, the layers' dtype
rule, and the empty results of empty inputs (zeros that stay attached to the autograd graph)."""
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


def origin(value, points: torch.Tensor) -> torch.Tensor:
    """A grid origin ``(3,)``, finite, in the dtype and on the device of ``points``."""
    try:
        o = torch.as_tensor(value, dtype=points.dtype, device=points.device)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"origin must be a sequence of {points.shape[-1]} numbers or a tensor, "
                        f"got {type(value).__name__}") from e
    if o.shape != (points.shape[-1],):
        raise ValueError(f"origin must hold {points.shape[-1]} coordinates, got shape {tuple(o.shape)}")
    if not bool(torch.isfinite(o).all()):
        raise ValueError(f"origin must be finite, got {o.tolist()}")
    return o

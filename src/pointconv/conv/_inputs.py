"""Input helpers of the conv modules: checked grid origins."""
from __future__ import annotations

import torch


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

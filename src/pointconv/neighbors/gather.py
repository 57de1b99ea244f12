"""Gather per-neighbor values: ``(B, P, C)`` values and ``(B, Q, k)`` indices -> ``(B, Q, k, C)``."""
from __future__ import annotations

import torch

from .. import _checks
from .._graph_zeros import zeros_like_graph


def gather_reference(values: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Plain loop-free reference: ``out[b, q, j] = values[b, idx[b, q, j]]``, zeros where idx = -1."""
    B, Q, K = idx.shape
    C = values.shape[-1]
    if B == 0 or values.shape[1] == 0:  # (no point to read: every slot is -1)
        return values.new_zeros((B, Q, K, C))
    safe = idx.clamp(min=0).long()
    out = torch.stack([values[b][safe[b].reshape(-1)].reshape(Q, K, C) for b in range(B)])
    return out.masked_fill((idx < 0)[..., None], 0)  # (0 * an inf in row 0 would be NaN)


def gather(values: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Gather neighbor values.

    Args:
        values: ``(B, P, C)`` per-point values (any dtype).
        idx: ``(B, Q, k)`` int64 (or int32) indices into ``P``; ``-1`` marks a missing neighbor.

    Returns:
        ``(B, Q, k, C)`` with ``out[b, q, j] = values[b, idx[b, q, j]]`` and zeros where ``idx == -1``.
        Differentiable w.r.t. ``values`` to any order. The backward sums the gradients of repeated
        indices: on CPU with ``index_add_`` (sequential, so bitwise repeatable in any mode), on CUDA
        with an accumulating ``index_put_`` (deterministic under
        ``torch.use_deterministic_algorithms(True)``).
    """
    _checks.tensor("values", values)
    _checks.index_tensor("idx", idx, 3)
    if values.dim() != 3:
        raise ValueError(f"values must have shape (B, P, C), got shape {tuple(values.shape)}")
    _checks.same_device(values=values, idx=idx)
    B, P, C = values.shape
    if idx.shape[0] != B:
        raise ValueError(f"idx has batch size {idx.shape[0]} but values has {B}")
    if idx.numel() and (bool((idx < -1).any()) or bool((idx >= P).any())):
        raise ValueError(f"idx must lie in [-1, {P - 1}] (P = {P}), got values in "
                         f"[{int(idx.min())}, {int(idx.max())}]")
    _, Q, K = idx.shape
    idx = idx.long()
    missing = idx < 0
    flat = (idx.clamp(min=0) + torch.arange(B, device=idx.device)[:, None, None] * P).reshape(-1)
    rows = values.reshape(B * P, C)
    if not P:  # every index is -1: zeros, still on values' graph (their gradient: empty)
        out = zeros_like_graph((B, Q, K, C), values.dtype, values.device, values)
    elif values.device.type == "cpu":
        # index_select's backward is index_add_: on CPU sequential, where indexing's accumulating
        # index_put_ runs on threads and rounds in a different order from run to run (and both
        # directions are 1.5x-4x faster than indexing's)
        out = rows.index_select(0, flat).reshape(B, Q, K, C)
    else:
        out = rows[flat].reshape(B, Q, K, C)
    if bool(missing.any()):
        out = out.masked_fill(missing[..., None], 0)
    return out

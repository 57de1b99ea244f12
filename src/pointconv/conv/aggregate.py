"""Reduce per-neighbor values: ``(B, P, C)`` values, ``(B, Q, k)`` indices -> ``(B, Q, C)``.

``idx = -1`` marks a missing neighbor: it is never averaged in, never the maximum, and adds
nothing. mean / sum / weighted go through ``pointconv._weighted_sum`` (chunked, no (B, Q, k, C),
exact gradients of any order, deterministic); max gathers ``(B, rows, k, C)`` blocks of queries
and its gradient goes to the arg-max (the lowest k among exact ties).
"""
from __future__ import annotations

import torch

from .. import _checks
from .._matmul_precision import no_autocast
from .._weighted_sum import _chunk_rows, gather_sum
from ..neighbors import gather
from .._graph_zeros import zeros_like_graph

REDUCE = ("mean", "max", "sum", "weighted")


def _check(values, idx, reduce, weights):
    _checks.tensor("values", values)
    if not values.is_floating_point():
        raise TypeError(f"values must be a floating-point tensor, got dtype {values.dtype}")
    if values.dim() != 3:
        raise ValueError(f"values must have shape (B, P, C), got shape {tuple(values.shape)}")
    _checks.index_tensor("idx", idx, 3)
    _checks.same_device(values=values, idx=idx)
    if idx.shape[0] != values.shape[0]:
        raise ValueError(f"idx has batch size {idx.shape[0]} but values has {values.shape[0]}")
    P = values.shape[1]
    if idx.numel() and (int(idx.min()) < -1 or int(idx.max()) >= P):
        raise ValueError(f"idx must lie in [-1, {P - 1}]")
    if reduce not in REDUCE:
        raise ValueError(f"reduce must be one of {REDUCE}, got {reduce!r}")
    if (reduce == "weighted") != (weights is not None):
        raise ValueError("weights are required with reduce='weighted' and only then")
    if weights is not None:
        _checks.tensor("weights", weights)
        if weights.shape != idx.shape:
            raise ValueError(f"weights must have the shape of idx {tuple(idx.shape)}, got {tuple(weights.shape)}")
        if weights.dtype != values.dtype:
            raise TypeError(f"weights must have the dtype of values ({values.dtype}), got {weights.dtype}")


def aggregate(values: torch.Tensor, idx: torch.Tensor, reduce: str = "mean", weights: torch.Tensor | None = None):
    """Reduce the values of each query's neighbors.

    Args:
        values: ``(B, P, C)`` per-point values. idx: ``(B, Q, k)`` int64 indices into P, -1 = none.
        reduce: ``"mean"`` (over the valid neighbors), ``"max"``, ``"sum"`` or ``"weighted"``
            (``sum_k weights[..., k] * values[idx[..., k]]``).
        weights: ``(B, Q, k)`` with ``reduce="weighted"``.

    Returns:
        ``(B, Q, C)``; a query without valid neighbors gets zeros (so do all queries when P = 0 or
        k = 0). Differentiable w.r.t. values (and weights) to any order. The weight of a missing
        neighbor is ignored, even NaN or Inf.
    """
    _check(values, idx, reduce, weights)
    B, P, C = values.shape
    Q, k = idx.shape[1:]
    if P == 0 or k == 0:  # nobody has a neighbor (P = 0 leaves only idx = -1)
        return zeros_like_graph((B, Q, C), values.dtype, values.device, values, weights)
    idx = idx.long()
    valid = idx >= 0
    if reduce == "max":
        # padded slots repeat the row's first valid neighbor: they never change the max, and where
        # one wins a tie (a real -inf, say) its gradient still reaches that neighbor (a -inf fill
        # would win such a tie and drop the gradient)
        first = torch.gather(idx, 2, valid.to(torch.uint8).argmax(2, keepdim=True))
        safe = torch.where(valid, idx, first.clamp(min=0))
        # by chunks of queries, each gathered block (B, rows, k, C) about 4M entries: max keeps
        # only its arg-max for the backward, so the block is freed before the next (one gather of
        # the whole (B, Q, k, C) peaked at k times the output)
        step = max(1, _chunk_rows(k, C) // max(B, 1))
        with no_autocast(values.device):  # (autocast's cat refused fp16 blocks in a bf16 region)
            out = torch.cat([gather(values, safe[:, s:s + step]).max(dim=2).values
                             for s in range(0, max(Q, 1), step)], dim=1)
        return torch.where(valid.any(-1, keepdim=True), out, torch.zeros_like(out))
    if reduce == "weighted":
        # where, not a product with the mask: a padded slot's NaN / Inf weight must add nothing
        w = torch.where(valid, weights, torch.zeros_like(weights))
    elif reduce == "sum":
        w = valid.to(values.dtype)
    else:
        w = valid.to(values.dtype) / valid.sum(-1, keepdim=True).clamp(min=1).to(values.dtype)
    flat = torch.where(valid, idx + (torch.arange(B, device=idx.device) * P)[:, None, None], -1)
    out = gather_sum(w.reshape(B * Q, k), values.reshape(B * P, C), flat.reshape(B * Q, k))
    return out.reshape(B, Q, C)


def aggregate_reference(values, idx, reduce="mean", weights=None):
    """Loops over queries: plainly right, slow."""
    B, P, C = values.shape
    Q, k = idx.shape[1:]
    rows = []
    for b in range(B):
        for q in range(Q):
            js = [j for j in range(k) if idx[b, q, j] >= 0]
            if not js:
                rows.append(values.new_zeros(C))
                continue
            v = torch.stack([values[b, int(idx[b, q, j])] for j in js])
            if reduce == "max":
                rows.append(v.max(0).values)
            elif reduce == "sum":
                rows.append(v.sum(0))
            elif reduce == "mean":
                rows.append(v.mean(0))
            else:
                rows.append((weights[b, q, js][:, None] * v).sum(0))
    return torch.stack(rows).reshape(B, Q, C) if rows else values.new_zeros((B, Q, C))

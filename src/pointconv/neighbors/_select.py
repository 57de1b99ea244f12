"""Selecting each query's k nearest from its candidates: ascending by (distance, index), padded.

Shared by the kd-tree search (``_cpu``) and the brute force (``_brute_force``).
"""
from __future__ import annotations

import torch


def select_sorted(d: torch.Tensor, idx: torch.Tensor, k: int):
    """Per row, the k smallest (d, idx) pairs ascending; rows with fewer are padded with inf / -1.

    ``d`` holds no NaN and no negative number (squared distances, inf for no candidate)."""
    if d.dtype == torch.float32 and idx.numel() and int(idx.max()) < 1 << 31:
        # one sort of 64-bit keys: the bits of a non-negative float32 order as its value does
        key = (d.view(torch.int32).long() << 32) | (idx & 0xFFFFFFFF)
        order = torch.argsort(key, dim=1)
    else:
        order = torch.argsort(idx, dim=1, stable=True)
        d, idx = d.gather(1, order), idx.gather(1, order)
        order = torch.argsort(d, dim=1, stable=True)
    return first_k(d.gather(1, order), idx.gather(1, order), k)


def first_k(d: torch.Tensor, idx: torch.Tensor, k: int):
    """The first k columns of rows already in order, padded to k with inf / -1 (also where d is inf)."""
    n, m = d.shape
    out_d = torch.full((n, k), float("inf"), dtype=d.dtype, device=d.device)
    out_i = torch.full((n, k), -1, dtype=torch.int64, device=d.device)
    c = min(k, m)
    out_d[:, :c] = d[:, :c]
    out_i[:, :c] = torch.where(torch.isinf(d[:, :c]), -1, idx[:, :c])
    return out_d, out_i


def mask_candidates(d, cand, rows, radius2, exclude_self):
    """``d`` with inf where a candidate is missing (-1), is the query itself (``cand == rows``, for
    ``exclude_self``) or lies beyond ``radius2``."""
    bad = cand < 0
    if exclude_self:
        bad = bad | (cand == rows)
    if radius2 is not None:
        bad = bad | (d > radius2)
    return d.masked_fill(bad, float("inf"))

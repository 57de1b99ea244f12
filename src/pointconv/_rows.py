"""Rows of int64 words ``(n, c)`` (integer coordinates, cloud ids, the bits of float coordinates):
finding the equal ones.

- ``sorted_row_hashes(words)``: one int64 hash per row, sorted (stable), with the sort's order.
  Equal rows have equal hashes; a collision only makes two rows look equal, so callers that
  group by hash confirm with the words themselves.
- ``repeat_cost(hashes, longer_than)``: the sum of L^2 over the runs of L equal sorted hashes with
  L > ``longer_than``: what pairing every repeated row with its copies would cost.
- ``unique_rows(keys)``: ``torch.unique(keys, dim=0, return_inverse=True, return_counts=True)``,
  through one int64 key per row when the rows' ranges allow it (a 1-D unique is about 10x faster).
"""
from __future__ import annotations

import torch

_FNV_PRIME = 1099511628211


def sorted_row_hashes(words: torch.Tensor):
    """``(hashes, order)``: the rows' hashes sorted (stable: equal rows keep their index order)."""
    h = words[:, 0].clone()
    for c in range(1, words.shape[1]):  # FNV-style mixing; int64 products wrap around
        h = (h * _FNV_PRIME) ^ words[:, c]
    return torch.sort(h, stable=True)


def repeat_cost(hashes: torch.Tensor, longer_than: int) -> float:
    runs = torch.unique_consecutive(hashes, return_counts=True)[1]
    runs = runs[runs > longer_than].double()
    return float((runs * runs).sum())


def unique_rows(keys: torch.Tensor):
    """Rows sorted lexicographically, as ``torch.unique(keys, dim=0, ...)``: ``(unique, inverse, counts)``."""
    if keys.shape[0] == 0:
        return torch.unique(keys, dim=0, return_inverse=True, return_counts=True)
    lo = keys.amin(0)
    span = keys.amax(0) - lo + 1
    if float(torch.prod(span.double())) >= 2.0**62:
        return torch.unique(keys, dim=0, return_inverse=True, return_counts=True)
    shifted = keys - lo
    lin = shifted[:, 0]
    for c in range(1, keys.shape[1]):
        lin = lin * span[c] + shifted[:, c]
    uniq_lin, inverse, counts = torch.unique(lin, return_inverse=True, return_counts=True)
    first = torch.zeros(uniq_lin.shape[0], dtype=torch.int64, device=keys.device)
    first = first.scatter_reduce(0, inverse, torch.arange(keys.shape[0], device=keys.device), "amin",
                                 include_self=False)
    return keys[first], inverse, counts

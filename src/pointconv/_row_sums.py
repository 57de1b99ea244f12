"""Row sums whose bits do not depend on threads: ``out[rows[i]] += src[i]`` for every i.

On CPU ``index_add`` adds the rows one after another: the same bits on every run, in any mode.
An accumulating ``index_put`` (what indexing's backward uses) adds them on threads there, in an
order, and so to bits, that change from run to run. On CUDA the accumulating ``index_put`` is
deterministic under ``torch.use_deterministic_algorithms(True)``.
"""
from __future__ import annotations

import torch


def add_rows(out: torch.Tensor, rows: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """A new tensor: ``out`` with ``src[i]`` added to row ``rows[i]`` (int64 rows)."""
    if out.device.type == "cpu":
        return out.index_add(0, rows, src)
    return out.index_put((rows,), src, accumulate=True)


def add_rows_(out: torch.Tensor, rows: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """The same, in place (for a fresh accumulator no autograd node has saved)."""
    if out.device.type == "cpu":
        return out.index_add_(0, rows, src)
    return out.index_put_((rows,), src, accumulate=True)

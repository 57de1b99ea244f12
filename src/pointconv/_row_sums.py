"""Row sums whose bits do not depend on threads: ``out[rows[i]] += src[i]`` for every i; and
row maxima whose gradient splits evenly between exact ties (``max_rows``).

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


def max_rows(n: int, rows: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``(n, C)``: row r is the max of the ``src`` rows i with ``rows[i] == r`` (every row must
    have one; a row without any is NaN). Differentiable: the gradient goes to the maximum, split
    evenly between exact ties.

    The rows start as NaN, which ``include_self=False`` leaves out of the max: torch's backward
    still compares the starting value with the result, and a ``-inf`` start took a share of the
    gradient of every row whose max is ``-inf`` (a lone ``-inf`` got 1/2, two tied ones 1/3 each)."""
    out = src.new_full((n, src.shape[1]), float("nan"))
    return out.scatter_reduce(0, rows[:, None].expand(-1, src.shape[1]), src, "amax", include_self=False)

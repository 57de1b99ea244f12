"""1-D index operations on the hot paths of the CPU neighbor builds, in their fastest CPU form.

- ``take(values, idx)``: ``values[idx]``, through ``gather`` (about twice as fast as indexing on CPU).
- ``flatnonzero(mask, count=None)``: the positions of the True entries of a 1-D bool mask,
  ascending, int64. On CPU through numpy, whose bool ``nonzero`` is several times faster than
  ``torch.nonzero`` on one thread: the neighbor builds compact tens of millions of candidates.
  On an accelerator, given the number of True entries (read before), through
  ``torch.nonzero_static``, which does not wait for the device to learn its output size.
"""
from __future__ import annotations

import numpy as np
import torch


def _gather_takes_int32() -> bool:
    try:
        torch.gather(torch.zeros(1), 0, torch.zeros(1, dtype=torch.int32))
    except RuntimeError:  # torch 2.4: "gather(): Expected dtype int64 for index"
        return False
    return True


_GATHER_TAKES_INT32 = _gather_takes_int32()


def take(values: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``values[idx]`` for 1-D tensors (``idx`` int32 or int64)."""
    if idx.dtype != torch.int64 and not _GATHER_TAKES_INT32:
        return values.index_select(0, idx)  # the same values; index_select takes int32 on every torch
    return torch.gather(values, 0, idx)


def flatnonzero(mask: torch.Tensor, count: int | None = None) -> torch.Tensor:
    """Positions of the True entries of a 1-D bool ``mask``, ascending, as int64. ``count``: their
    number, when the caller knows it (it must be exact)."""
    if mask.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(mask.contiguous().numpy()))
    if count is not None:
        try:
            return torch.nonzero_static(mask, size=count).squeeze(1)
        except NotImplementedError:  # CUDA before torch 2.6
            pass
    return torch.nonzero(mask).squeeze(1)

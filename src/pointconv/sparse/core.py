"""spconv's ``spconv.pytorch.core`` path: ``SparseConvTensor`` and its small helpers, for ported
code that imports them from there (``from spconv.pytorch.core import SparseConvTensor``).

spconv's ``IndiceData`` / ``ImplicitGemmIndiceData`` (its kernel-map records) have no counterpart:
pointconv's ``indice_dict`` holds ``kernel_map.KernelMap`` records.
"""
from __future__ import annotations

import numpy as np
import torch

from .. import _checks
from .conv import _tuple
from .tensor import SparseConvTensor

__all__ = ["SparseConvTensor", "expand_nd", "scatter_nd"]


def expand_nd(ndim: int, val) -> list[int]:
    """``val`` (an int, or ``ndim`` ints in a list, tuple or numpy array) as a list of ``ndim`` ints."""
    return list(_tuple("val", list(val) if isinstance(val, np.ndarray) else val, ndim))


def scatter_nd(indices: torch.Tensor, updates: torch.Tensor, shape) -> torch.Tensor:
    """A zero tensor of ``shape`` with ``updates`` written at ``indices`` (TensorFlow's
    ``scatter_nd``): ``indices (..., m)`` address the first m axes, ``updates`` has shape
    ``indices.shape[:-1] + shape[m:]``. An index given twice raises a ValueError (which update
    would win is unspecified; spconv's version keeps either)."""
    _checks.tensor("updates", updates)
    _checks.tensor("indices", indices)
    if indices.dim() == 0 or indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"indices must be an int64 (or int32) tensor of shape (..., m), got dtype {indices.dtype} "
                        f"and shape {tuple(indices.shape)}")
    shape = [_checks.nonneg_int("shape", s) for s in shape]
    m = indices.shape[-1]
    if m > len(shape):
        raise ValueError(f"scatter_nd: indices address {m} axes, shape {shape} has {len(shape)}")
    want = list(indices.shape[:-1]) + shape[m:]
    if list(updates.shape) != want:
        raise ValueError(f"scatter_nd: updates must have shape {want}, got {list(updates.shape)}")
    flat = indices.reshape(-1, m).long()
    if flat.shape[0] and bool(((flat < 0) | (flat >= flat.new_tensor(shape[:m]))).any()):
        raise ValueError(f"scatter_nd: indices outside the first {m} axes of shape {shape}")
    if flat.shape[0] and torch.unique(flat, dim=0).shape[0] < flat.shape[0]:
        raise ValueError("scatter_nd: an index appears twice")
    out = updates.new_zeros(shape)
    out[tuple(flat.t())] = updates.reshape(flat.shape[0], *shape[m:])
    return out

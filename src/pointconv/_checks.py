"""Input validation shared by every public function.

Each check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong shape,
range, device or value) with a message that names the argument and says what was expected.
"""
from __future__ import annotations

import math
import numbers
import operator

import numpy as np
import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    _has_data(name, x)
    return x


def _has_data(name: str, x: torch.Tensor) -> None:
    # the checks and the searches read values (a meta tensor's .item() raised from inside torch)
    if x.device.type == "meta":
        raise ValueError(f"{name} is on the meta device, which holds no values: pointconv reads its inputs' "
                         "values (their ranges, their neighbors)")


def coords(name: str, x, *, ndim: int, dim: int | None = None, finite: bool = True) -> torch.Tensor:
    """Floating-point coordinates of shape ``(B, N, D)`` (ndim=3) or ``(N, D)`` (ndim=2), all finite
    (``finite=False``: the caller checks that, with ``max_abs``, in one read with its other values)."""
    tensor(name, x)
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} must be float32 or float64 coordinates, got dtype {x.dtype}")
    if x.dim() != ndim:
        shape = "(B, N, D)" if ndim == 3 else "(N, D)"
        raise ValueError(f"{name} must have shape {shape}, got shape {tuple(x.shape)}")
    if x.shape[-1] < 1:
        raise ValueError(f"{name} must have at least one coordinate (D >= 1), got shape {tuple(x.shape)}")
    if dim is not None and x.shape[-1] != dim:
        raise ValueError(f"{name} must have D = {dim} coordinates, got shape {tuple(x.shape)}")
    if finite:
        finite_coords(name, float(max_abs(x.detach())))
    return x


def max_abs(x: torch.Tensor) -> torch.Tensor:
    """``max |x|`` as a 0-dim float64 tensor (0 when empty): NaN or inf exactly when an element is."""
    return x.abs().amax().double() if x.numel() else torch.zeros((), dtype=torch.float64, device=x.device)


def finite_coords(name: str, largest: float) -> None:
    """Raise unless ``largest`` (a ``max_abs`` read) is finite."""
    if not math.isfinite(largest):
        raise ValueError(f"{name} contains NaN or Inf coordinates")


def same_device(**tensors: torch.Tensor | None) -> torch.device:
    named = [(n, t) for n, t in tensors.items() if t is not None]
    device = named[0][1].device
    for n, t in named[1:]:
        if t.device != device:
            raise ValueError(
                f"{n} is on {t.device} but {named[0][0]} is on {device}: all inputs must be on one device"
            )
    return device


def same_dtype(**tensors: torch.Tensor) -> None:
    named = list(tensors.items())
    for n, t in named[1:]:
        if t.dtype != named[0][1].dtype:
            raise TypeError(f"{n} has dtype {t.dtype} but {named[0][0]} has dtype {named[0][1].dtype}")


def integer(name: str, v) -> int:
    """``v`` as an int: Python and numpy ints, integer 0-dim tensors; not bools (nor bool tensors),
    floats or strings (``int(1.7)`` would silently truncate)."""
    if isinstance(v, bool):
        raise TypeError(f"{name} must be an int, got bool")
    if isinstance(v, torch.Tensor):
        if v.dtype == torch.bool or v.is_floating_point() or v.is_complex() or v.dim() != 0:
            raise TypeError(f"{name} must be an int or an integer 0-dim tensor, got a tensor of dtype {v.dtype} "
                            f"and shape {tuple(v.shape)}")
        _has_data(name, v)
    try:
        return operator.index(v)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(v).__name__} {v!r}") from None


def positive_int(name: str, k) -> int:
    k = integer(name, k)
    if k < 1:
        raise ValueError(f"{name} must be >= 1, got {k}")
    return k


def nonneg_int(name: str, k) -> int:
    k = integer(name, k)
    if k < 0:
        raise ValueError(f"{name} must be >= 0, got {k}")
    return k


def flag(name: str, value) -> bool:
    """A bool (numpy's included): a string such as ``"no"`` must not read as True."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def output_size(name: str, *shape: int) -> None:
    """An output of ``shape`` elements must be allocatable at all: beyond 2^40 elements (8 TiB of
    int64) the allocator's own error would not say which argument asked for it."""
    if math.prod(shape) >= 1 << 40:
        raise ValueError(f"{name} asks for an output of shape {tuple(shape)}: 2^40 elements or more")


def positive_float(name: str, r) -> float:
    if isinstance(r, torch.Tensor) and r.numel() == 1:
        _has_data(name, r)
        r = r.item()
    if isinstance(r, bool) or not isinstance(r, numbers.Real):
        raise TypeError(f"{name} must be a positive number, got {type(r).__name__}")
    r = float(r)
    if not (r > 0.0) or r != r or r == float("inf"):
        raise ValueError(f"{name} must be a finite number > 0, got {r}")
    return r


def lengths(name: str, lens, batch: int, n: int, device: torch.device) -> torch.Tensor:
    """Per-cloud lengths ``(B,)`` in [0, N]; ``None`` means every cloud is full. Returns int64."""
    if lens is None:
        return torch.full((batch,), n, dtype=torch.int64, device=device)
    lens = lengths_tensor(name, lens, batch, device)
    if batch and bool(lengths_out_of_range(lens, n)):
        raise_lengths_range(name, lens, n)
    return lens.to(torch.int64)


def lengths_tensor(name: str, lens, batch: int, device: torch.device) -> torch.Tensor:
    """``lengths``' checks that read nothing from the device: an int ``(B,)`` tensor on ``device``.
    The caller checks the range with ``lengths_out_of_range`` among its other values."""
    tensor(name, lens)
    if lens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be an int32 or int64 tensor, got dtype {lens.dtype}")
    if lens.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},), got shape {tuple(lens.shape)}")
    if lens.device != device:
        raise ValueError(f"{name} is on {lens.device} but the coordinates are on {device}")
    return lens


def lengths_out_of_range(lens: torch.Tensor, n: int) -> torch.Tensor:
    """0-dim float64 on ``lens``' device: 1 when a length lies outside [0, n], else 0."""
    return ((lens < 0) | (lens > n)).any().double()


def raise_lengths_range(name: str, lens: torch.Tensor, n: int) -> None:
    raise ValueError(f"{name} must lie in [0, {n}], got {lens.tolist()}")


def batch_vector(name: str, batch, n: int, device: torch.device) -> torch.Tensor:
    """A sorted int64 batch vector ``(N,)`` of non-negative cloud ids."""
    tensor(name, batch)
    if batch.dtype != torch.int64:
        raise TypeError(f"{name} must be an int64 tensor, got dtype {batch.dtype}")
    if batch.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got shape {tuple(batch.shape)}")
    if batch.device != device:
        raise ValueError(f"{name} is on {batch.device} but the coordinates are on {device}")
    if n:
        if bool((batch < 0).any()):
            raise ValueError(f"{name} must hold non-negative cloud ids")
        if n > 1 and bool((batch[1:] < batch[:-1]).any()):
            raise ValueError(f"{name} must be sorted ascending")
    return batch


def index_tensor(name: str, idx, ndim: int) -> torch.Tensor:
    tensor(name, idx)
    if idx.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be an int64 (or int32) index tensor, got dtype {idx.dtype}")
    if idx.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(idx.shape)}")
    return idx

"""Host <-> device transfers of the kernel-map builds, in the forms that keep a CUDA stream busy.

A CUDA launch returns at once, so the host runs ahead of the device until it needs a value the
device computes: ``int(t)``, ``t.tolist()``, ``torch.nonzero`` (its output size), a copy from the
host with ``non_blocking=False``. Each such read waits for all queued work, and the device idles
while the host prepares the next launches; a kernel map built with one read per kernel offset
spent more time waiting than computing. So the builds on an accelerator gather everything the host
must know into one tensor and read it with ``host_ints`` (the reads the tests count; the
Gaussian op's value checks read theirs with ``host_floats``), send host lists with ``to_device``, and compact masks whose counts they have read with
``_index1d.flatnonzero(mask, count)`` (no read of its own).
"""
from __future__ import annotations

import torch


def host_ints(values: torch.Tensor) -> list[int]:
    """``values`` (integer or bool, any shape) flattened into Python ints: one device read."""
    return _to_host(values)


def host_floats(values: torch.Tensor) -> list[float]:
    """``values`` (floating point, any shape) flattened into Python floats: one device read."""
    return _to_host(values)


def _to_host(values: torch.Tensor) -> list:
    try:
        return values.reshape(-1).tolist()
    except RuntimeError:
        # a value batched by torch.func.vmap: raise vmap's own error for a read ("calling .item()"),
        # which says what happened, rather than tolist's about a tensor without storage
        if values.numel():
            values.reshape(-1)[0].item()
        raise


def to_device(values, dtype: torch.dtype, device) -> torch.Tensor:
    """A tensor of the host ``values`` on ``device``, without waiting for the device: the copy is
    issued non-blocking from pageable memory, which the driver stages before it returns (so the
    host list may go at once), and it runs in stream order."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

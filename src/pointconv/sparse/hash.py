"""``HashTable``: spconv's key -> value table, as sorted arrays with ``searchsorted`` lookups.

Same methods as spconv's GPU hash table (``insert``, ``query``, ``insert_exist_keys``,
``assign_arange_``, ``items``), on any device, deterministic: ``items`` returns keys ascending
and ``assign_arange_`` numbers them in that order. A key inserted twice keeps its last value.
"""
from __future__ import annotations

import torch

from .. import _checks

_KEY_DTYPES = (torch.int32, torch.int64)


class HashTable:
    def __init__(self, device, key_dtype, value_dtype, max_size: int = -1):
        if key_dtype not in _KEY_DTYPES:
            raise TypeError(f"key_dtype must be torch.int32 or torch.int64, got {key_dtype}")
        if not isinstance(value_dtype, torch.dtype):
            raise TypeError(f"value_dtype must be a torch.dtype, got {type(value_dtype).__name__}")
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda', got {device!r}") from None
        self.key_dtype, self.value_dtype = key_dtype, value_dtype
        self.max_size = _checks.integer("max_size", max_size)  # < 0: no limit
        self._keys = torch.empty(0, dtype=key_dtype, device=self.device)
        self._values = torch.empty(0, dtype=value_dtype, device=self.device)

    def _check_keys(self, keys):
        if not isinstance(keys, torch.Tensor) or keys.dtype != self.key_dtype or keys.dim() != 1:
            raise TypeError(f"keys must be a 1-D {self.key_dtype} tensor")
        if keys.device != self.device:
            raise ValueError(f"keys are on {keys.device}, the table on {self.device}")

    def _values_for(self, keys, values):
        """``values`` for ``keys``: one row per key, rows shaped as the table's (once it holds any)."""
        row = tuple(self._values.shape[1:]) if self._values.numel() or self._values.dim() > 1 else None
        if values is None:
            return torch.zeros((keys.shape[0], *(row or ())), dtype=self.value_dtype, device=self.device)
        _checks.tensor("values", values)
        if values.dim() < 1 or values.shape[0] != keys.shape[0]:
            raise ValueError(f"values must have one row per key, shape ({keys.shape[0]}, ...), got shape "
                             f"{tuple(values.shape)}")
        if row is not None and tuple(values.shape[1:]) != row:
            raise ValueError(f"values must have shape {(keys.shape[0], *row)}: rows shaped as the table's, got "
                             f"shape {tuple(values.shape)}")
        if values.device != self.device:
            raise ValueError(f"values are on {values.device}, the table on {self.device}")
        if values.is_floating_point() != self.value_dtype.is_floating_point:
            raise TypeError(f"values must be {self.value_dtype} (the table's value_dtype), got {values.dtype}")
        return values.to(self.value_dtype)

    def __len__(self) -> int:
        return self._keys.shape[0]

    def insert(self, keys: torch.Tensor, values: torch.Tensor | None = None) -> None:
        self._check_keys(keys)
        values = self._values_for(keys, values)
        all_keys = torch.cat([self._keys, keys])
        all_values = torch.cat([self._values, values])
        # the last occurrence of each key wins: sort stably, keep each run's last element
        sorted_keys, order = torch.sort(all_keys, stable=True)
        last = torch.ones_like(sorted_keys, dtype=torch.bool)
        last[:-1] = sorted_keys[1:] != sorted_keys[:-1]
        if self.max_size >= 0 and int(last.sum()) > self.max_size:
            raise ValueError(f"the table would hold {int(last.sum())} keys, more than max_size {self.max_size}")
        self._keys = sorted_keys[last]
        self._values = all_values[order[last]]

    def _find(self, keys):
        if self._keys.numel() == 0:
            return torch.zeros_like(keys, dtype=torch.int64), torch.zeros(keys.shape, dtype=torch.bool, device=keys.device)
        pos = torch.searchsorted(self._keys, keys).clamp(max=self._keys.numel() - 1)
        return pos, self._keys[pos] == keys

    def query(self, keys: torch.Tensor, values: torch.Tensor | None = None):
        """``(values, is_empty)``: each key's value (0 where absent) and whether it is absent."""
        self._check_keys(keys)
        pos, found = self._find(keys)
        out = self._values[pos] if self._values.numel() else self._values_for(keys, None)
        out = torch.where(found.view(-1, *[1] * (out.dim() - 1)), out, torch.zeros_like(out))
        if values is not None:
            _checks.tensor("values", values)
            if values.shape != out.shape or values.device != out.device:
                raise ValueError(f"values (the output) must have shape {tuple(out.shape)} on {out.device}, got "
                                 f"shape {tuple(values.shape)} on {values.device}")
            values.copy_(out)
        return out, ~found

    def insert_exist_keys(self, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Update the keys already in the table; returns spconv's ``is_empty``: a uint8 tensor, 1
        where the key was absent (nothing inserted), 0 where its value was updated."""
        self._check_keys(keys)
        values = self._values_for(keys, values)
        pos, found = self._find(keys)
        if bool(found.any()):  # (an empty table's values may be shaped (0,) whatever the rows)
            self._values = self._values.clone()
            self._values[pos[found]] = values[found]
        return (~found).to(torch.uint8)

    def _count(self) -> torch.Tensor:
        """The number of keys as spconv returns it: a ``(1,)`` tensor, int64 on CPU; on a GPU on the
        table's device, int32 for int32 keys (its kernels count in the keys' width)."""
        narrow = self.device.type != "cpu" and self.key_dtype == torch.int32
        return torch.tensor([len(self)], dtype=torch.int32 if narrow else torch.int64, device=self.device)

    def assign_arange_(self) -> torch.Tensor:
        """Values 0, 1, ... in ascending key order; returns the number of keys (``_count``)."""
        self._values = torch.arange(len(self), dtype=self.value_dtype, device=self.device)
        return self._count()

    def items(self, max_size: int | None = -1):
        """``(keys, values, count)`` in ascending key order: the first ``max_size`` keys (negative or
        None, spconv's default -1: all of them)."""
        max_size = -1 if max_size is None else _checks.integer("max_size", max_size)
        n = len(self) if max_size < 0 else min(len(self), max_size)
        return self._keys[:n], self._values[:n], self._count()

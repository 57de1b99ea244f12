"""Kernel maps of sparse convolutions: which input row feeds which output row through which weight.

Sites are linearized as ``batch * prod(shape) + row-major(coords)`` (int64: a grid of more than
2^63 cells raises a ValueError, as does an output shape beyond int32) and looked up in a
dense table of rows (grids up to 2^25 cells) or the sorted input keys (``searchsorted``):
vectorized over all kernel offsets at once, on any device. A submanifold map pads the grid by
the kernel's reach (no bounds tests) and, for odd kernels, looks up half the offsets: the other
half are the same pairs read the other way. Kernel offsets are enumerated row-major over the
kernel window (offset 0 is the corner ``(0, ..., 0)``), the order of spconv's
``(out, k0, ..., k_{n-1}, in)`` weights.

On CPU a fresh dense table costs more in page faults than all its lookups (a 256^3 grid: 18 ms
of a 45 ms submanifold map), so an index that is released hands its table back, cleared, to the
next index: one spare table, of the largest grid seen (at most 128 MiB), stays allocated between
kernel maps.

Compaction (the pairs of each offset out of a (kernel volume, N) mask): on CPU per offset, through
numpy (faster there than one pass with a division of every pair's position); on an accelerator
in one pass over all offsets, after a single read of the counts per offset (with the duplicate
check's answer): each read of a device value stalls the stream (``_device_transfers``), and a map
read per offset spent more time waiting than computing.

Index semantics (dense math, torch's formulas):
  regular / strided conv: output y reads input ``x = y * stride - padding + o * dilation``; the
      output sites are every y whose window holds >= 1 active input, sorted by (batch, coords).
  submanifold conv: output sites are the input sites (same order); site y reads
      ``y + (o - k // 2) * dilation``, i.e. a dense conv with padding ``(k // 2) * dilation``.
  transposed conv: input x writes output ``y = x * stride - padding + o * dilation`` (torch's
      ConvTranspose); the output sites are every y written by >= 1 input, sorted.
  inverse conv: the transposed relation of the conv that shares its ``indice_key``, onto that
      conv's input sites (the same pairs, read the other way).
"""
from __future__ import annotations

import itertools
import math
import threading
from dataclasses import dataclass, field

import torch

from .. import _device_transfers as transfers
from .._func_transforms import outside_func_transforms
from .._index1d import flatnonzero, take
from ._implicit_gemm import conv_tables
from ._pair_gemm import PairTables


@dataclass
class KernelMap:
    """Pairs grouped by kernel offset: ``in_rows[start[o]:start[o+1]]`` feed ``out_rows[...]`` through W[o]."""

    in_rows: torch.Tensor
    out_rows: torch.Tensor
    start: list[int]
    out_indices: torch.Tensor
    out_spatial_shape: list[int]
    in_indices: torch.Tensor
    in_spatial_shape: list[int]
    kernel_size: tuple
    stride: tuple
    padding: tuple
    dilation: tuple
    subm: bool
    # a submanifold map built in one pass: its (V, N) int32 lookup, which is the Triton kernels'
    # table (dropped once they have their own sorted copy)
    _gather: torch.Tensor | None = field(default=None, repr=False, compare=False)
    # a strided or transposed map: the batches of its input sites (an inverse conv's output sites)
    in_batches: int | None = field(default=None, compare=False)
    _tables: object = field(default=None, repr=False, compare=False)
    _pair_tables: object = field(default=None, repr=False, compare=False)

    @outside_func_transforms
    def tables(self):
        """The map as the Triton kernels read it (``_implicit_gemm.ConvTables``), built once."""
        if self._tables is None:
            self._tables = conv_tables(self.in_rows, self.out_rows, self.start, self.in_indices.shape[0],
                                       self.out_indices.shape[0], self._gather,
                                       symmetric=self.identity_offset() is not None)
            self._gather = None
        return self._tables

    @outside_func_transforms
    def pair_tables(self) -> PairTables:
        """The map as the CPU's tiled pair products read it (``_pair_gemm.PairTables``), built once."""
        if self._pair_tables is None:
            self._pair_tables = PairTables(self.in_rows, self.out_rows, self.start, self.in_indices.shape[0],
                                           self.out_indices.shape[0], self.identity_offset())
        return self._pair_tables

    def identity_offset(self):
        """The offset that pairs every site with itself (a submanifold kernel's odd center), or None."""
        if self.subm and all(k % 2 for k in self.kernel_size):
            return (len(self.start) - 1) // 2
        return None


INT32_MAX = 2**31 - 1  # sites and spatial shapes are int32, as in spconv
_INT64_MAX = 2**63 - 1


def check_key_space(batch_size: int, shape, what: str = "the sites") -> None:
    """Raise a ValueError unless every key ``linearize`` gives ``batch_size`` samples of a ``shape``
    grid, ``batch_size * prod(shape) - 1``, fits int64: past that the keys wrap, merging distinct
    sites and unsorting them. Python ints: free next to any kernel map."""
    cells = batch_size * math.prod(shape)
    if cells - 1 > _INT64_MAX:
        raise ValueError(f"{what} span {batch_size} batch(es) x spatial_shape {list(shape)} = {cells} cells, "
                         f"more than the 2**63 that int64 site keys can number: use a smaller spatial_shape")


def _linear_offset(coords, shape) -> int:
    """``linearize`` of the host ints ``coords`` in batch 0: keys are linear, so the key of a site
    moved by ``coords`` is its key plus this (inside the grid)."""
    key = 0
    for c, s in zip(coords, shape):
        key = key * s + c
    return key


def linearize(batch: torch.Tensor, coords: torch.Tensor, shape) -> torch.Tensor:
    """int64 key ``batch * prod(shape) + row-major(coords)``; callers check the key space with
    ``check_key_space`` (the keys of a larger grid wrap)."""
    key = batch.long()
    for d, s in enumerate(shape):
        key = key * s + coords[..., d].long()
    return key


def delinearize(keys: torch.Tensor, shape) -> torch.Tensor:
    cols = []
    for s in reversed(shape):
        cols.append(keys % s)
        keys = keys // s
    cols.append(keys)
    return torch.stack(cols[::-1], 1).to(torch.int32)


def kernel_offsets(kernel_size) -> list[tuple]:
    """The ``prod(kernel_size)`` offsets of a kernel window (tuples of ints), in row-major order."""
    return list(itertools.product(*[range(k) for k in kernel_size]))


def _compacts_in_one_pass(device: torch.device) -> bool:
    """Whether kernel maps on ``device`` compact all offsets' pairs in one pass (see the module's
    docstring): everywhere but on CPU."""
    return device.type != "cpu"


_DENSE_TABLE_MAX_CELLS = 1 << 25  # up to 32M sites (128 MiB of int32): look rows up in a dense table

_spare_tables: list[torch.Tensor] = []  # at most one CPU table, all -1, for the next SiteIndex
_spare_lock = threading.Lock()


def _blank_table(cells: int, device: torch.device) -> torch.Tensor:
    """``(cells,)`` int32, all -1: the spare CPU table when it is large enough, else a new one."""
    if device.type == "cpu":
        with _spare_lock:
            if _spare_tables and _spare_tables[0].numel() >= cells:
                return _spare_tables.pop()[:cells]
    with torch.inference_mode(False):  # a normal tensor: an inference one could not be reused outside
        return torch.full((cells,), -1, dtype=torch.int32, device=device)


def _keep_spare(table: torch.Tensor) -> None:
    """Keep a CPU table whose entries are all -1 again as the spare (the larger of it and the
    current spare: one grid size keeps being reused)."""
    whole = table if table._base is None else table._base
    if whole.device.type != "cpu":
        return
    with _spare_lock:
        if not _spare_tables or _spare_tables[0].numel() < whole.numel():
            _spare_tables[:] = [whole]


class SiteIndex:
    """Row of each site key: a dense int32 table over all cells when the grid is small enough, else
    the sorted keys and ``searchsorted``. Raises on duplicate sites. ``release()`` (or leaving a
    ``with`` block) hands a CPU table back for the next index to reuse; the index is then unusable.

    ``margin`` (cells per axis, default 0) widens the grid on both sides: keys are then linear in
    the padded grid (``self.shape``), and any site plus an offset of at most ``margin`` per axis
    has a key of its own (a cell of the margin, which holds no site), so neighbor lookups need no
    bounds test. ``self.keys``: the key of every site, in row order.

    ``defer_duplicate_check``: do not read whether sites repeat (a device read); the caller reads
    ``self.has_duplicates`` (a 0-dim bool tensor) with its other values, and raises."""

    @outside_func_transforms  # (it writes the sites into a kept table)
    def __init__(self, indices: torch.Tensor, shape, batch_size: int, margin=None, defer_duplicate_check=False):
        margin = [0] * len(shape) if margin is None else list(margin)
        self.shape = [n + 2 * m for n, m in zip(shape, margin)]
        check_key_space(batch_size, self.shape)  # (before the margin's key, which may pass int64 itself)
        keys = linearize(indices[:, 0], indices[:, 1:], self.shape)
        if any(margin):
            keys = keys + _linear_offset(margin, self.shape)
        self._index(keys, batch_size, defer_duplicate_check)

    @classmethod
    def from_keys(cls, keys: torch.Tensor, shape, batch_size: int) -> "SiteIndex":
        """The index of sites given by their linear keys in ``shape`` (no margin)."""
        index = cls.__new__(cls)
        index.shape = list(shape)
        index._index(keys.long(), batch_size)
        return index

    def _index(self, keys: torch.Tensor, batch_size: int, defer_duplicate_check=False):
        check_key_space(batch_size, self.shape)
        self.keys = keys
        self.cells = batch_size * math.prod(self.shape)
        self.released = False
        if self.cells <= _DENSE_TABLE_MAX_CELLS:
            self.table = _blank_table(self.cells, keys.device)
            rows = torch.arange(keys.shape[0], dtype=torch.int32, device=keys.device)
            self.table[keys] = rows
            # a duplicate overwrote a row
            self.has_duplicates = (self.table.index_select(0, keys) != rows).any()
        else:
            self.table = None
            self.sorted_keys, self.order = torch.sort(keys)
            self.has_duplicates = (self.sorted_keys[1:] == self.sorted_keys[:-1]).any()
        if not defer_duplicate_check:
            raise_on_duplicates(bool(self.has_duplicates))

    def __enter__(self) -> "SiteIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    @outside_func_transforms  # (it clears the kept table in place)
    def release(self) -> None:
        """Clear this index's entries of its dense CPU table and keep the table for the next index."""
        if not self.released and self.table is not None:
            if self.table.device.type == "cpu":  # (no spare elsewhere: the caching allocator reuses memory)
                self.table.index_fill_(0, self.keys, -1)
                _keep_spare(self.table)
            self.table = None
        self.released = True

    def lookup(self, keys: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Row of each key, or -1 (also where ``valid`` is False; None: every key is a cell of the
        grid): int32 from a dense table, else int64."""
        if self.released:
            raise RuntimeError("this SiteIndex was released")
        if self.table is not None:
            if valid is None:
                return self.table.index_select(0, keys.reshape(-1)).view(keys.shape)
            rows = self.table[torch.where(valid, keys, 0)]
            return torch.where(valid, rows, -1)
        if self.sorted_keys.numel() == 0:
            return torch.full_like(keys, -1)
        pos = torch.searchsorted(self.sorted_keys, keys).clamp(max=self.sorted_keys.numel() - 1)
        found = self.sorted_keys[pos] == keys
        if valid is not None:
            found &= valid
        return torch.where(found, self.order[pos], -1)


def raise_on_duplicates(has_duplicates: bool) -> None:
    if has_duplicates:
        raise ValueError("indices has duplicate sites (the same batch and coordinates twice)")


def _batch_size(indices: torch.Tensor) -> int:
    return transfers.host_ints(indices[:, 0].max())[0] + 1 if indices.shape[0] else 1


def _starts(counts) -> list[int]:
    """Where each offset's pairs start, from the counts per offset (and the end: len + 1)."""
    return list(itertools.accumulate(counts, initial=0))


def _check_int32_shape(out, what):
    # output indices are int32 (as in spconv): a larger axis would wrap its coordinates
    if any(o > INT32_MAX for o in out):
        raise ValueError(f"{what} would be {out}: its coordinates do not fit the int32 indices "
                         f"(at most {INT32_MAX} per axis)")


def output_shape(in_shape, kernel_size, stride, padding, dilation):
    out = [(n + 2 * p - d * (k - 1) - 1) // s + 1
           for n, k, s, p, d in zip(in_shape, kernel_size, stride, padding, dilation)]
    if any(o < 1 for o in out):
        raise ValueError(f"the output spatial shape would be {out} for input {list(in_shape)}, kernel "
                         f"{list(kernel_size)}, stride {list(stride)}, padding {list(padding)}, "
                         f"dilation {list(dilation)}")
    _check_int32_shape(out, f"the output spatial shape (padding {list(padding)})")
    return out


@outside_func_transforms
def build_subm(indices, shape, kernel_size, dilation) -> KernelMap:
    reach = [k // 2 * d for k, d in zip(kernel_size, dilation)]
    # offsets from the window's center, row-major
    offsets = [[(t - k // 2) * d for t, k, d in zip(taps, kernel_size, dilation)] for taps in kernel_offsets(kernel_size)]
    one_pass = _compacts_in_one_pass(indices.device)
    # a margin as wide as the kernel's reach: every neighbor key is a cell of the padded grid
    with SiteIndex(indices, shape, _batch_size(indices), margin=reach, defer_duplicate_check=one_pass) as sites:
        build = _subm_pairs_one_pass if one_pass else _subm_pairs_per_offset
        in_rows, out_rows, start, gather = build(sites, offsets, all(k % 2 for k in kernel_size))
    return KernelMap(in_rows, out_rows, start, indices, list(shape), indices, list(shape), tuple(kernel_size),
                     (1,) * len(shape), tuple(reach), tuple(dilation), True, gather)


def _neighbor_rows(sites: SiteIndex, offsets) -> torch.Tensor:
    """``(len(offsets), N)``: the row of each site's neighbor at each offset, or -1."""
    # linear keys are additive: key(site + off) = key(site) + key(off) inside the padded grid
    off_keys = [_linear_offset(off, sites.shape) for off in offsets]
    if sites.table is None:
        # searchsorted reads the sorted keys in order when its queries ascend too: look up the
        # sites' neighbors in key order, then put them in row order (bench_sparse's (b) scene,
        # 120K sites in random order: searchsorted 77 -> 24 ms, the whole map 84 -> 46 ms)
        shifts = transfers.to_device(off_keys, torch.int64, sites.keys.device)
        in_key_order = sites.lookup(sites.sorted_keys[None] + shifts[:, None])
        found = torch.empty_like(in_key_order)
        found[:, sites.order] = in_key_order
        return found
    # keys of a dense table fit in int32: half the bytes to move
    keys = sites.keys.to(torch.int32)
    return sites.lookup(keys[None] + transfers.to_device(off_keys, torch.int32, keys.device)[:, None])


def _subm_pairs_per_offset(sites: SiteIndex, offsets, odd: bool):
    """The CPU build: ``(in_rows, out_rows, start, None)``."""
    n = sites.keys.shape[0]
    V = len(offsets)
    # an odd kernel is point-symmetric: offset V - 1 - o is -off[o], whose pairs are those of o read
    # the other way, and the center V // 2 pairs every site with itself; look up the first half only
    looked = V // 2 if odd else V
    found = _neighbor_rows(sites, offsets[:looked])  # (looked, n) rows or -1
    # per looked-up offset: its sites with a neighbor (the output rows, ascending) and the neighbors
    hit = found >= 0
    out_rows = [flatnonzero(hit[o]) for o in range(looked)]
    in_rows = [take(found[o], rows).long() for o, rows in enumerate(out_rows)]
    if odd:
        # the mirrored offsets V // 2 + 1, ..., V - 1 are offsets V // 2 - 1, ..., 0 swapped
        ident = torch.arange(n, device=sites.keys.device)
        in_rows, out_rows = in_rows + [ident] + out_rows[::-1], out_rows + [ident] + in_rows[::-1]
    start = _starts(rows.numel() for rows in out_rows)
    return torch.cat(in_rows), torch.cat(out_rows), start, None


def _subm_pairs_one_pass(sites: SiteIndex, offsets, odd: bool):
    """The accelerators' build: every offset looked up (no mirroring: lookups are cheap there, and
    the lookup table is then the Triton kernels' gather table) and compacted in one pass, after one
    read of the counts and the duplicate check. ``(in_rows, out_rows, start, (V, N) lookup)``."""
    n = sites.keys.shape[0]
    found = _neighbor_rows(sites, offsets)  # (V, n)
    hit = found >= 0
    *counts, duplicates = transfers.host_ints(torch.cat([hit.sum(1), sites.has_duplicates.long().view(1)]))
    raise_on_duplicates(duplicates)
    start = _starts(counts)
    pos = flatnonzero(hit.view(-1), start[-1])  # (offset, output row) order
    offset = pos // max(n, 1)
    out_rows = pos - offset * n
    gather = found.to(torch.int32) if n <= INT32_MAX else None  # (the kernels refuse more rows anyway)
    return found.view(-1).index_select(0, pos).long(), out_rows, start, gather


def _target_pairs(indices, out_shape, per_axis, duplicates):
    """``(in_rows, keys, start)``: every (offset, input row) pair whose output site lies in the
    grid, in (offset, row) order (offsets row-major over the kernel's axes): its input row, the
    output site's ``linearize`` key, and per offset the position of its first pair (kvol + 1).
    ``duplicates``: the input's deferred duplicate check (``_input_duplicates``), or None.

    ``per_axis[a] = (y, ok)``, each ``(k_a, N)``: a site's coordinate along axis a for each of the
    axis' kernel taps, and whether it is one. Only a bool (kvol, N) array is formed; the keys,
    sums of one term per axis, are computed for the valid pairs alone (a strided 3^3 kernel pairs
    about 1 in 8 candidates): a fully occupied 64^3 block's map in about a third of the time that
    a (kvol, N, ndim) coordinate array took."""
    n = indices.shape[0]
    valid = None
    for _, ok in per_axis:
        valid = ok if valid is None else (valid[:, None] & ok[None]).flatten(0, 1)
    kvol = valid.shape[0]
    if duplicates is not None:  # one pass: the counts per offset and the check in one read
        *counts, duplicated = transfers.host_ints(torch.cat([valid.sum(1), duplicates.long().view(1)]))
        raise_on_duplicates(duplicated)
        start = _starts(counts)
        pos = flatnonzero(valid.reshape(-1), start[-1])
    else:
        pos = flatnonzero(valid.reshape(-1))
    rows, offset = (pos % n, pos // n) if n else (pos, pos)
    keys = indices[:, 0].long().index_select(0, rows) * math.prod(out_shape)  # (the key space was checked)
    rest = offset
    for a in reversed(range(len(per_axis))):  # the offset's digits, last axis fastest
        y = per_axis[a][0]
        tap, rest = rest % y.shape[0], rest // y.shape[0]
        keys += y.reshape(-1).index_select(0, tap * n + rows) * math.prod(out_shape[a + 1:])
    if duplicates is None:
        start = transfers.host_ints(torch.searchsorted(offset, torch.arange(kvol + 1, device=offset.device)))
    return rows, keys, start


def _input_duplicates(indices, shape, batch_size):
    """Check the input sites of a strided or transposed map for duplicates: raise here (CPU), or
    return the check's 0-dim bool tensor for ``_target_pairs`` to read with its counts."""
    one_pass = _compacts_in_one_pass(indices.device)
    with SiteIndex(indices, shape, batch_size, defer_duplicate_check=one_pass) as sites:
        return sites.has_duplicates if one_pass else None


def _map_to_targets(indices, shape, per_axis, out_shape, kernel_size, stride, padding, dilation,
                    duplicates, batch_size) -> KernelMap:
    """The map whose pairs are ``_target_pairs``: input row n writes an output site through offset o."""
    in_rows, keys, start = _target_pairs(indices, out_shape, per_axis, duplicates)
    out_keys, out_rows = torch.unique(keys, sorted=True, return_inverse=True)
    out_indices = delinearize(out_keys, out_shape) if out_keys.numel() else indices.new_zeros((0, 1 + len(shape)))
    return KernelMap(in_rows, out_rows, start, out_indices, list(out_shape), indices, list(shape), tuple(kernel_size),
                     tuple(stride), tuple(padding), tuple(dilation), False, in_batches=batch_size)


@outside_func_transforms
def build_conv(indices, shape, kernel_size, stride, padding, dilation) -> KernelMap:
    batch_size = _batch_size(indices)
    duplicates = _input_duplicates(indices, shape, batch_size)
    out_shape = output_shape(shape, kernel_size, stride, padding, dilation)
    check_key_space(batch_size, out_shape, "the output sites")
    per_axis = []
    for a, (k, s, p, d, size) in enumerate(zip(kernel_size, stride, padding, dilation, out_shape)):
        taps = torch.arange(k, device=indices.device)[:, None] * d
        t = indices[:, 1 + a].long()[None] + p - taps  # = y * stride where a site is hit
        y = torch.div(t, s, rounding_mode="floor")
        per_axis.append((y, (t == y * s) & (y >= 0) & (y < size)))
    return _map_to_targets(indices, shape, per_axis, out_shape, kernel_size, stride, padding, dilation, duplicates,
                           batch_size)


def build_in_place(indices, shape, kernel_size, stride, padding, dilation) -> KernelMap:
    """The map of a one-tap window that leaves every site where it is (stride 1, no padding): each
    site is its own output, in the input's order (where ``build_conv`` would sort them), as spconv's
    one-tap layers keep them."""
    rows = torch.arange(indices.shape[0], device=indices.device)
    return KernelMap(rows, rows, [0, indices.shape[0]], indices, list(shape), indices, list(shape),
                     tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation), False)


def transposed_output_shape(in_shape, kernel_size, stride, padding, dilation, output_padding):
    out = [(n - 1) * s - 2 * p + d * (k - 1) + op + 1
           for n, k, s, p, d, op in zip(in_shape, kernel_size, stride, padding, dilation, output_padding)]
    if any(o < 1 for o in out):
        raise ValueError(f"the transposed output spatial shape would be {out} for input {list(in_shape)}")
    _check_int32_shape(out, f"the transposed output spatial shape (input {list(in_shape)}, stride {list(stride)})")
    return out


@outside_func_transforms
def build_transposed(indices, shape, kernel_size, stride, padding, dilation, output_padding) -> KernelMap:
    batch_size = _batch_size(indices)
    duplicates = _input_duplicates(indices, shape, batch_size)
    out_shape = transposed_output_shape(shape, kernel_size, stride, padding, dilation, output_padding)
    check_key_space(batch_size, out_shape, "the output sites")
    per_axis = []
    for a, (k, s, p, d, size) in enumerate(zip(kernel_size, stride, padding, dilation, out_shape)):
        taps = torch.arange(k, device=indices.device)[:, None] * d
        y = indices[:, 1 + a].long()[None] * s - p + taps
        per_axis.append((y, (y >= 0) & (y < size)))
    return _map_to_targets(indices, shape, per_axis, out_shape, kernel_size, stride, padding, dilation, duplicates,
                           batch_size)


def inverse_of(kmap: KernelMap) -> KernelMap:
    """The map that sends a conv's outputs back onto its input sites (same offsets, rows swapped)."""
    return KernelMap(kmap.out_rows, kmap.in_rows, kmap.start, kmap.in_indices, kmap.in_spatial_shape,
                     kmap.out_indices, kmap.out_spatial_shape, kmap.kernel_size, kmap.stride, kmap.padding,
                     kmap.dilation, False)

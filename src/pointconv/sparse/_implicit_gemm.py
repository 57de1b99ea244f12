"""Sparse convolution on the Triton backend: implicit GEMM over kernel-map tables.

``ConvTables`` holds a kernel map as the kernels read it and computes the two bilinear products of
``_bilinear`` with them: ``conv`` (``gather_gemm``: each output row gathers its inputs, one program
per row block) and ``weight_grad`` (``pair_gemm_t``: per chunk of pairs, then the chunks of each
offset summed in a fixed order). Deterministic without atomics.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from .. import _device_transfers as transfers
from .._backend import backend_for
from .._func_transforms import outside_func_transforms
from ._bilinear import bilinear_conv

_TARGET_CHUNKS = 16  # per offset, for the weight gradient's parallelism
_SORT_COLUMNS = True  # gather tables' columns grouped by their offsets (``_sorted_columns``)
_MASK_WORD = 31  # offsets per sort key (int32 bit masks, one stable sort per word)
_PAIR_BLOCK = 32  # the pair kernel's BLOCK_P: chunks are whole blocks
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRANSPOSE_LOCK = threading.Lock()  # (two backwards on one map would build its transpose once)


@dataclass
class ConvTables:
    """A kernel map as the kernels read it (int32 rows; every row index fits: checked on build).

    ``gather (V, M_out)``: the input row feeding output ``rows[j]`` through offset o in column j, or
    -1; ``rows (M_out,)``: the output row of each column (a permutation, ``_sorted_columns``).
    ``in_rows``, ``out_rows``: the pairs grouped by offset; ``chunk_start``, ``chunk_end`` (int64)
    cut each offset's pairs into chunks; ``chunk_table (V, max chunks)`` lists each offset's chunks
    in order (-1 pads). ``transposed`` is the same map read from the input side, built when first
    asked for (a forward alone never needs it) from ``pair_counts`` (per offset, on the device),
    ``n_in`` and ``symmetric`` (point-symmetric offsets: offset o's transpose is offset V - 1 - o).
    Plain data throughout: a map (and a tensor holding it) pickles and deep-copies."""

    gather: torch.Tensor
    rows: torch.Tensor
    in_rows: torch.Tensor
    out_rows: torch.Tensor
    chunk_start: torch.Tensor
    chunk_end: torch.Tensor
    chunk_table: torch.Tensor
    pair_counts: torch.Tensor
    n_in: int
    symmetric: bool
    _transposed: "ConvTables | None" = field(default=None, repr=False, compare=False)

    @property
    def transposed(self) -> "ConvTables":
        if self._transposed is None:
            with _TRANSPOSE_LOCK:
                if self._transposed is None:
                    self._transposed = _transpose(self)
        return self._transposed

    def conv(self, x, w):
        from ..kernels.sparse_conv import gather_gemm
        return gather_gemm(self.gather, self.rows, x, w)

    def weight_grad(self, x, g):
        from ..kernels.sparse_conv import pair_gemm_t
        part = pair_gemm_t(self.in_rows, self.out_rows, self.chunk_start, self.chunk_end, x, g)
        # each offset's chunks summed by one reduction (a zero row stands in for the -1 pads): the
        # same order on every run, as torch's reductions are deterministic
        part = torch.cat([part, part.new_zeros((1, *part.shape[1:]))])
        return part[self.chunk_table].sum(1).to(x.dtype)


def _table(dst_rows, src_rows, offset_of_pair, V, n_dst):
    table = torch.full((V, n_dst), -1, dtype=torch.int32, device=dst_rows.device)
    table.view(-1)[offset_of_pair * n_dst + dst_rows] = src_rows  # one pair per (offset, row): no clash
    return table


def _sorted_columns(gather: torch.Tensor):
    """``(table, rows)``: the columns of ``gather (V, M)`` int32 reordered so that columns fed
    through the same offsets sit side by side, and the output row of each column (int32).

    A program of ``gather_gemm`` runs an offset's product for its whole block of columns when any
    column in it has an input through that offset. In site order (by coordinates) the sites of a
    block rarely share their offsets: on bench_sparse (b)'s street scene a block of 64 ran 14.3 of
    the 27 offsets for 1.3 pairs per site. The columns are sorted by their offsets' bits, the
    rarest offset the most significant (the blocks that need a rare offset are then few; a common
    one runs in most blocks anyway): 1.8 there, 12.3 instead of 25.1 on (a)'s shell
    (``bench_sparse.py --tile-work``). Stable sorts of int32 keys of ``_MASK_WORD`` offsets each,
    the least significant word first; the order is a function of the table alone."""
    V, M = gather.shape
    dev = gather.device
    if not _SORT_COLUMNS or M < 2:
        return gather.contiguous(), torch.arange(M, dtype=torch.int32, device=dev)
    hit = gather >= 0
    hit = hit.index_select(0, torch.argsort(hit.sum(1), stable=True))  # the rarest offset first
    rows = None
    for word in reversed(range(0, V, _MASK_WORD)):
        end = min(word + _MASK_WORD, V)
        bits = transfers.to_device([1 << (end - 1 - o) for o in range(word, end)], torch.int32, dev)
        key = (hit[word:end] * bits[:, None]).sum(0, dtype=torch.int32)  # (the word's first offset: its top bit)
        order = torch.argsort(key if rows is None else key.index_select(0, rows), stable=True)
        rows = order if rows is None else rows.index_select(0, order)
    return gather.index_select(1, rows), rows.to(torch.int32)


def _chunks(start: list[int]):
    """Each offset's pairs cut into about ``_TARGET_CHUNKS`` chunks of whole pair blocks: the host
    lists ``(chunk_start, chunk_end, chunk_table)``, the table flattened ``(V, width)``."""
    counts = [b - a for a, b in zip(start[:-1], start[1:])]
    blocks = -(-max(counts + [1]) // _PAIR_BLOCK)
    size = _PAIR_BLOCK * -(-blocks // _TARGET_CHUNKS)
    lo, hi, per_offset = [], [], []
    for a, b in zip(start[:-1], start[1:]):
        first = len(lo)
        for s in range(a, b, size):
            lo.append(s)
            hi.append(min(s + size, b))
        per_offset.append(list(range(first, len(lo))))
    width = max([len(c) for c in per_offset] + [1])
    table = [i for c in per_offset for i in c + [-1] * (width - len(c))]
    return lo, hi, table


def _offset_of_pair(counts: torch.Tensor, pairs: int) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts, output_size=pairs)


@outside_func_transforms  # (built lazily, maybe inside a backward under torch.func's transforms)
def _transpose(fwd: ConvTables) -> ConvTables:
    """``fwd`` read from the input side (``ConvTables.transposed``)."""
    V, n_out = fwd.gather.shape
    if fwd.symmetric:  # the forward's table in row order, offsets reversed
        by_row = torch.empty_like(fwd.gather).index_copy_(1, fwd.rows.long(), fwd.gather)
        gather = by_row.flip(0)
    else:
        gather = _table(fwd.in_rows.long(), fwd.out_rows, _offset_of_pair(fwd.pair_counts, fwd.in_rows.numel()), V,
                        fwd.n_in)
    return ConvTables(*_sorted_columns(gather), fwd.out_rows, fwd.in_rows, fwd.chunk_start, fwd.chunk_end,
                      fwd.chunk_table, fwd.pair_counts, n_out, fwd.symmetric, _transposed=fwd)


def conv_tables(in_rows, out_rows, start: list[int], n_in: int, n_out: int, gather=None,
                symmetric=False) -> ConvTables:
    """The tables of a kernel map (pairs ``in_rows -> out_rows`` grouped by offset); its transpose
    is built when first read. ``gather``: the ``(V, n_out)`` int32 gather table when the map's
    build has it (else it is scattered from the pairs); ``symmetric``: point-symmetric offsets (a
    submanifold map of an odd kernel), whose transpose is the table's offsets reversed."""
    if max(n_in, n_out) >= 1 << 31:
        raise ValueError(f"sparse tensors of {max(n_in, n_out)} sites exceed the Triton kernels' int32 rows")
    V = len(start) - 1
    dev = in_rows.device
    counts = [b - a for a, b in zip(start[:-1], start[1:])]
    lo, hi, table = _chunks(start)
    # the host's numbers in one copy that does not wait for the device
    sent = transfers.to_device(counts + lo + hi + table, torch.int64, dev)
    counts, lo, hi, table = sent.split([V, len(lo), len(hi), len(table)])
    table = table.view(V, -1)
    ir, orow = in_rows.to(torch.int32), out_rows.to(torch.int32)
    if gather is None:
        gather = _table(out_rows, ir, _offset_of_pair(counts, start[-1]), V, n_out)
    return ConvTables(*_sorted_columns(gather), ir, orow, lo, hi, table, counts, n_in, symmetric)


def use_triton(features: torch.Tensor, groups: int) -> bool:
    """Whether the Triton kernels take this convolution (else the torch ops of ``conv.py``)."""
    return backend_for(features.device) == "triton" and groups == 1 and features.dtype in _DTYPES


def implicit_gemm_conv(x, w, T: ConvTables):
    """``(M_out, C_out)``: ``sum_o x[T.gather[o]] @ w[o]``, differentiable to any order in x and w
    ``(V, C_in, C_out)``."""
    return bilinear_conv(x, w, T)

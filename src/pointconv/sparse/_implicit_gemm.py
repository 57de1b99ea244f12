"""Sparse convolution on the Triton backend: implicit GEMM over kernel-map tables.

``ConvTables`` holds a kernel map as the kernels read it and computes the two bilinear products of
``_bilinear`` with them: ``conv`` (``gather_gemm``: each output row gathers its inputs, one program
per row block) and ``weight_grad`` (``pair_gemm_t``: per chunk of pairs, then the chunks of each
offset summed in a fixed order). Deterministic without atomics.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import _device_transfers as transfers
from .._backend import backend_for
from ._bilinear import bilinear_conv

_TARGET_CHUNKS = 16  # per offset, for the weight gradient's parallelism
_PAIR_BLOCK = 32  # the pair kernel's BLOCK_P: chunks are whole blocks
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class ConvTables:
    """A kernel map as the kernels read it (int32 rows; every row index fits: checked on build).

    ``gather (V, M_out)``: the input row feeding output m through offset o, or -1.
    ``in_rows``, ``out_rows``: the pairs grouped by offset; ``chunk_start``, ``chunk_end`` (int64)
    cut each offset's pairs into chunks; ``chunk_table (V, max chunks)`` lists each offset's chunks
    in order (-1 pads). ``transposed`` is the same map read from the input side."""

    gather: torch.Tensor
    in_rows: torch.Tensor
    out_rows: torch.Tensor
    chunk_start: torch.Tensor
    chunk_end: torch.Tensor
    chunk_table: torch.Tensor
    transposed: "ConvTables | None" = field(default=None, repr=False, compare=False)

    def conv(self, x, w):
        from ..kernels.sparse_conv import gather_gemm
        return gather_gemm(self.gather, x, w)

    def weight_grad(self, x, g):
        from ..kernels.sparse_conv import pair_gemm_t
        part = pair_gemm_t(self.in_rows, self.out_rows, self.chunk_start, self.chunk_end, x, g)
        # each offset's chunks added in order (a zero row stands in for the -1 pads)
        part = torch.cat([part, part.new_zeros((1, *part.shape[1:]))])
        out = part[self.chunk_table[:, 0]]
        for c in range(1, self.chunk_table.shape[1]):
            out = out + part[self.chunk_table[:, c]]
        return out.to(x.dtype)


def _table(dst_rows, src_rows, offset_of_pair, V, n_dst):
    table = torch.full((V, n_dst), -1, dtype=torch.int32, device=dst_rows.device)
    table.view(-1)[offset_of_pair * n_dst + dst_rows] = src_rows  # one pair per (offset, row): no clash
    return table


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


def conv_tables(in_rows, out_rows, start: list[int], n_in: int, n_out: int, gather=None,
                gather_transposed=None) -> ConvTables:
    """The tables of a kernel map (pairs ``in_rows -> out_rows`` grouped by offset) and its transpose.
    ``gather`` / ``gather_transposed``: the two ``(V, M)`` gather tables when the map's build has
    them (else they are scattered from the pairs)."""
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
    if gather is None or gather_transposed is None:
        offset_of_pair = torch.repeat_interleave(torch.arange(V, device=dev), counts, output_size=start[-1])
        if gather is None:
            gather = _table(out_rows, ir, offset_of_pair, V, n_out)
        if gather_transposed is None:
            gather_transposed = _table(in_rows, orow, offset_of_pair, V, n_in)
    fwd = ConvTables(gather.to(torch.int32).contiguous(), ir, orow, lo, hi, table)
    fwd.transposed = ConvTables(gather_transposed.to(torch.int32).contiguous(), orow, ir, lo, hi, table, fwd)
    return fwd


def use_triton(features: torch.Tensor, groups: int) -> bool:
    """Whether the Triton kernels take this convolution (else the torch ops of ``conv.py``)."""
    return backend_for(features.device) == "triton" and groups == 1 and features.dtype in _DTYPES


def implicit_gemm_conv(x, w, T: ConvTables):
    """``(M_out, C_out)``: ``sum_o x[T.gather[o]] @ w[o]``, differentiable to any order in x and w
    ``(V, C_in, C_out)``."""
    return bilinear_conv(x, w, T)

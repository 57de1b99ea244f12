"""Sparse convolution on the Triton backend: implicit GEMM over kernel-map tables.

``ConvTables`` holds a kernel map as the kernels read it and computes the two bilinear products of
``_bilinear`` with them: ``conv`` (``gather_gemm``: each output row gathers its inputs, one program
per row block) and ``weight_grad`` (``pair_gemm_t``: per chunk of pairs, then the chunks of each
offset summed in a fixed order). Deterministic without atomics.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

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


def _chunks(start: list[int], device):
    """Each offset's pairs cut into about ``_TARGET_CHUNKS`` chunks of whole pair blocks."""
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
    table = [c + [-1] * (width - len(c)) for c in per_offset]
    as_t = lambda v, dt: torch.tensor(v, dtype=dt, device=device)  # noqa: E731
    return as_t(lo, torch.int64), as_t(hi, torch.int64), as_t(table, torch.int64).view(len(per_offset), width)


def conv_tables(in_rows, out_rows, start: list[int], n_in: int, n_out: int) -> ConvTables:
    """The tables of a kernel map (pairs ``in_rows -> out_rows`` grouped by offset) and its transpose."""
    if max(n_in, n_out) >= 1 << 31:
        raise ValueError(f"sparse tensors of {max(n_in, n_out)} sites exceed the Triton kernels' int32 rows")
    V = len(start) - 1
    dev = in_rows.device
    counts = torch.tensor([b - a for a, b in zip(start[:-1], start[1:])], device=dev)
    offset_of_pair = torch.repeat_interleave(torch.arange(V, device=dev), counts)
    ir, orow = in_rows.to(torch.int32), out_rows.to(torch.int32)
    lo, hi, table = _chunks(start, dev)
    fwd = ConvTables(_table(out_rows, ir, offset_of_pair, V, n_out), ir, orow, lo, hi, table)
    fwd.transposed = ConvTables(_table(in_rows, orow, offset_of_pair, V, n_in), orow, ir, lo, hi, table, fwd)
    return fwd


def use_triton(features: torch.Tensor, groups: int) -> bool:
    """Whether the Triton kernels take this convolution (else the torch ops of ``conv.py``)."""
    return backend_for(features.device) == "triton" and groups == 1 and features.dtype in _DTYPES


def implicit_gemm_conv(x, w, T: ConvTables):
    """``(M_out, C_out)``: ``sum_o x[T.gather[o]] @ w[o]``, differentiable to any order in x and w
    ``(V, C_in, C_out)``."""
    return bilinear_conv(x, w, T)

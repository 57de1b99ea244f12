"""Sparse convolution on the Triton backend: implicit GEMM over kernel-map tables.

``conv(x, w; T)[m] = sum_o x[T.gather[o, m]] @ w[o]`` with ``w (V, C_in, C_out)`` is bilinear in
(x, w), and so is its weight gradient ``wgrad(x, g; T)[o] = sum_{pairs (i, m) of o} x[i]^T g[m]``.
Every derivative of either is again one of the two, on the map or on its transpose ``T'`` (the
same pairs read from the input side, ``T'.gather[o, i] = m``):

    conv:   d/dx = conv(g, w^T; T'),   d/dw = wgrad(x, g; T)
    wgrad:  d/dx = conv(g, h^T; T'),   d/dg = conv(x, h; T)        (h: the cotangent, w's shape)

so one autograd Function that calls itself in backward is exact to any order. The kernels
(``pointconv.kernels.sparse_conv``) write every output row from one program and sum the weight
gradient's chunks in a fixed order: deterministic without atomics.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .._backend import backend_for

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


def _conv(x, w, T: ConvTables):
    from ..kernels.sparse_conv import gather_gemm
    return gather_gemm(T.gather, x, w)


def _weight_grad(x, g, T: ConvTables):
    from ..kernels.sparse_conv import pair_gemm_t
    part = pair_gemm_t(T.in_rows, T.out_rows, T.chunk_start, T.chunk_end, x, g)
    # each offset's chunks added in order (a zero row stands in for the -1 pads)
    part = torch.cat([part, part.new_zeros((1, *part.shape[1:]))])
    out = part[T.chunk_table[:, 0]]
    for c in range(1, T.chunk_table.shape[1]):
        out = out + part[T.chunk_table[:, c]]
    return out.to(x.dtype)


def implicit_gemm_conv(x, w, T: ConvTables):
    """``(M_out, C_out)``: ``sum_o x[T.gather[o]] @ w[o]``, differentiable to any order in x and w
    ``(V, C_in, C_out)``."""
    return _Bilinear.apply("conv", x, w, T)


class _Bilinear(torch.autograd.Function):
    """``"conv"``: ``(x, w) -> conv(x, w; T)``; ``"weight_grad"``: ``(x, g) -> wgrad(x, g; T)``."""

    @staticmethod
    def forward(ctx, mode, x, y, T):
        ctx.save_for_backward(x, y)
        ctx.mode, ctx.tables = mode, T
        compute = _conv if mode == "conv" else _weight_grad
        return compute(x.contiguous(), y.contiguous(), T)

    @staticmethod
    def backward(ctx, grad):
        x, y = ctx.saved_tensors
        T = ctx.tables
        need_x, need_y = ctx.needs_input_grad[1:3]
        grad = grad.contiguous()
        if ctx.mode == "conv":  # y = w, grad = g
            gx = _Bilinear.apply("conv", grad, y.transpose(1, 2), T.transposed) if need_x else None
            gy = _Bilinear.apply("weight_grad", x, grad, T) if need_y else None
        else:  # y = g, grad = h (w's shape)
            gx = _Bilinear.apply("conv", y, grad.transpose(1, 2), T.transposed) if need_x else None
            gy = _Bilinear.apply("conv", x, grad, T) if need_y else None
        return None, gx, gy, None

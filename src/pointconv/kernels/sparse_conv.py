"""Triton kernels for sparse convolution (``pointconv.sparse._implicit_gemm``): implicit GEMM.

A kernel map with ``V`` offsets is stored as a table ``(V, M)`` of int32 rows and the output row
of each of its columns, ``rows (M,)``: ``table[o, j]`` is the input row that feeds output row
``rows[j]`` through offset ``o`` (-1: none). The columns come sorted by which offsets feed them
(``_implicit_gemm``), so a block of columns needs few offsets, and a block skips every offset that
feeds none of its columns. Two kernels:

  gather_gemm   out[rows[j]] = sum_o x[table[o, j]] @ w[o]     one program per block of columns
  pair_gemm_t   part[c] = sum_{pairs t in chunk c} x[a_t]^T y[b_t]   one program per chunk of pairs

``gather_gemm`` writes each output row from one program, summing the offsets in order, and
``pair_gemm_t``'s per-chunk partial sums are added on the host in chunk order: no atomics, the same
bits on every run. The products accumulate in float32 (float64 for float64 inputs) on tensor
cores; float32 inputs multiply in IEEE float32 unless TF32 is asked for.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._matmul_precision import ieee_float32_matmul
from . import accumulator, channel_block, on_tensor_device


@triton.jit
def _gather_gemm_kernel(table_ptr, rows_ptr, x_ptr, w_ptr, out_ptr, M, CIN, COUT, V,
                        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                        ACC: tl.constexpr, PRECISION: tl.constexpr):
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # table columns
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask, nmask = m < M, n < COUT
    m64 = m.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), ACC)
    t_ptr = table_ptr + m64  # advanced by M per offset: 64-bit pointer arithmetic, never o * M in int32
    w_off = w_ptr
    for _ in range(V):
        rows = tl.load(t_ptr, mask=mmask, other=-1)
        if tl.max(rows, axis=0) >= 0:  # skip offsets that feed no row of this block
            ok = rows >= 0
            r64 = rows.to(tl.int64)
            for k0 in range(0, CIN, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                kmask = k < CIN
                a = tl.load(x_ptr + r64[:, None] * CIN + k[None, :], mask=ok[:, None] & kmask[None, :], other=0.0)
                b = tl.load(w_off + k[:, None] * COUT + n[None, :], mask=kmask[:, None] & nmask[None, :], other=0.0)
                acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC)
        t_ptr += M
        w_off += CIN * COUT
    out_rows = tl.load(rows_ptr + m64, mask=mmask, other=0).to(tl.int64)
    tl.store(out_ptr + out_rows[:, None] * COUT + n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


@triton.jit
def _pair_gemm_t_kernel(a_rows_ptr, b_rows_ptr, chunk_start_ptr, chunk_end_ptr, x_ptr, y_ptr, part_ptr, CX, CY,
                        BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                        ACC: tl.constexpr, PRECISION: tl.constexpr):
    c = tl.program_id(0)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    kmask, nmask = k < CX, n < CY
    start = tl.load(chunk_start_ptr + c)
    end = tl.load(chunk_end_ptr + c)
    acc = tl.zeros((BLOCK_K, BLOCK_N), ACC)
    for p0 in range(start, end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        pmask = p < end
        i = tl.load(a_rows_ptr + p, mask=pmask, other=0).to(tl.int64)
        j = tl.load(b_rows_ptr + p, mask=pmask, other=0).to(tl.int64)
        a = tl.load(x_ptr + i[:, None] * CX + k[None, :], mask=pmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(y_ptr + j[:, None] * CY + n[None, :], mask=pmask[:, None] & nmask[None, :], other=0.0)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=PRECISION, out_dtype=ACC)
    rows = c.to(tl.int64) * CX + k
    tl.store(part_ptr + rows[:, None] * CY + n[None, :], acc, mask=kmask[:, None] & nmask[None, :])


def _precision(dtype: torch.dtype) -> str:
    """TF32 products where torch's own float32 matmuls on CUDA would use them, as in nn.Linear."""
    return "tf32" if dtype == torch.float32 and not ieee_float32_matmul(torch.device("cuda")) else "ieee"


def _caps(dtype: torch.dtype):
    """(BLOCK_K cap, BLOCK_N cap): wider tiles for 2-byte types, narrower for float64's registers."""
    return {torch.float64: (16, 32), torch.float32: (32, 64)}.get(dtype, (64, 64))


@on_tensor_device
def gather_gemm(table: torch.Tensor, rows: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``out[rows[j]] = sum_o x[table[o, j]] @ w[o]`` for ``table (V, M)`` int32, ``rows (M,)`` int32 (a
    permutation of the output rows), ``x (N, C_in)``, ``w (V, C_in, C_out)`` of x's dtype -> ``(M, C_out)``
    in x's dtype."""
    V, M = table.shape
    cin, cout = w.shape[1], w.shape[2]
    out = torch.empty((M, cout), dtype=x.dtype, device=x.device)
    if M == 0 or cout == 0:
        return out
    kcap, ncap = _caps(x.dtype)
    BM, BN = 64, channel_block(cout, ncap)
    _gather_gemm_kernel[(triton.cdiv(M, BM), triton.cdiv(cout, BN))](
        table, rows, x.contiguous(), w.contiguous(), out, M, cin, cout, V,
        BLOCK_M=BM, BLOCK_K=channel_block(cin, kcap), BLOCK_N=BN, ACC=accumulator(x.dtype),
        PRECISION=_precision(x.dtype))
    return out


@on_tensor_device
def pair_gemm_t(a_rows, b_rows, chunk_start, chunk_end, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per chunk c of the pairs ``(a_rows[t], b_rows[t])``, ``t in [chunk_start[c], chunk_end[c])``:
    ``sum_t x[a_rows[t]]^T y[b_rows[t]]`` -> ``(chunks, C_x, C_y)`` in the accumulator's dtype."""
    cx, cy = x.shape[1], y.shape[1]
    chunks = chunk_start.numel()
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    part = torch.empty((chunks, cx, cy), dtype=acc_dtype, device=x.device)
    if chunks == 0 or cx == 0 or cy == 0:
        return part
    kcap, ncap = _caps(x.dtype)
    BK, BN = channel_block(cx, kcap), channel_block(cy, ncap)
    _pair_gemm_t_kernel[(chunks, triton.cdiv(cx, BK), triton.cdiv(cy, BN))](
        a_rows, b_rows, chunk_start, chunk_end, x.contiguous(), y.contiguous(), part, cx, cy,
        BLOCK_P=32, BLOCK_K=BK, BLOCK_N=BN, ACC=accumulator(x.dtype), PRECISION=_precision(x.dtype))
    return part

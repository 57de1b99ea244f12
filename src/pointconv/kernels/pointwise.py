"""Triton kernels for the Pointwise convolution (``pointconv.conv._cell_means``).

A ``CellMeans`` matrix A ``(27 R, R)`` in CSR (``crow``, ``col``, values ``1 / count``) maps features
``x (R, C_in)`` to per-(point, cell) means. Two kernels, fused so the means never reach memory:

  cell_conv         out[p, :] = sum_c mean_c(p) @ w[c]                 one program per block of points
  cell_weight_grad  w_grad[c] = sum_p mean_c(p)^T g[p]                 one program per (cell, chunk of points)

``mean_c(p) = sum_{t in row p*27+c} val[t] * x[col[t]]`` is summed in the row's stored order, and the
weight gradient's per-chunk partial sums are added on the host in chunk order: no atomics, the
same bits on every run. float32 in and out; the products run in IEEE float32 (not TF32), so the
results match the CPU path to rounding. Channels up to 128 (the caller falls back above).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import channel_block, on_tensor_device

MAX_CHANNELS = 128
_CHUNKS = 64  # point chunks of the weight gradient: 27 x 64 programs


@triton.jit
def _cell_mean(crow_ptr, col_ptr, val_ptr, x_ptr, p64, pmask, c, i, imask, CIN,
               BLOCK_P: tl.constexpr, BLOCK_I: tl.constexpr):
    """The ``(BLOCK_P, BLOCK_I)`` means of cell ``c`` around points ``p64``."""
    row = p64 * 27 + c
    s0 = tl.load(crow_ptr + row, mask=pmask, other=0).to(tl.int64)
    n = tl.load(crow_ptr + row + 1, mask=pmask, other=0).to(tl.int64) - s0
    mean = tl.zeros((BLOCK_P, BLOCK_I), tl.float32)
    for t in range(0, tl.max(n, axis=0)):
        ok = t < n
        j = tl.load(col_ptr + s0 + t, mask=ok, other=0).to(tl.int64)
        v = tl.load(val_ptr + s0 + t, mask=ok, other=0.0)
        xv = tl.load(x_ptr + j[:, None] * CIN + i[None, :], mask=ok[:, None] & imask[None, :], other=0.0)
        mean += v[:, None] * xv
    return mean


@triton.jit
def _cell_conv_kernel(crow_ptr, col_ptr, val_ptr, x_ptr, w_ptr, out_ptr, R, CIN, COUT,
                      BLOCK_P: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_O: tl.constexpr):
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    i = tl.arange(0, BLOCK_I)
    pmask, imask, omask = p < R, i < CIN, o < COUT
    p64 = p.to(tl.int64)
    acc = tl.zeros((BLOCK_P, BLOCK_O), tl.float32)
    for c in range(27):
        mean = _cell_mean(crow_ptr, col_ptr, val_ptr, x_ptr, p64, pmask, c, i, imask, CIN, BLOCK_P, BLOCK_I)
        w = tl.load(w_ptr + (c * CIN + i).to(tl.int64)[:, None] * COUT + o[None, :],
                    mask=imask[:, None] & omask[None, :], other=0.0)
        acc += tl.dot(mean, w, input_precision="ieee")
    tl.store(out_ptr + p64[:, None] * COUT + o[None, :], acc, mask=pmask[:, None] & omask[None, :])


@triton.jit
def _cell_weight_grad_kernel(crow_ptr, col_ptr, val_ptr, x_ptr, g_ptr, part_ptr, R, CIN, COUT, blocks_per_chunk,
                             BLOCK_P: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_O: tl.constexpr):
    c = tl.program_id(0)
    chunk = tl.program_id(1)
    i = tl.arange(0, BLOCK_I)
    o = tl.arange(0, BLOCK_O)
    imask, omask = i < CIN, o < COUT
    acc = tl.zeros((BLOCK_I, BLOCK_O), tl.float32)
    for b in range(0, blocks_per_chunk):
        p = (chunk * blocks_per_chunk + b) * BLOCK_P + tl.arange(0, BLOCK_P)
        pmask = p < R
        p64 = p.to(tl.int64)
        mean = _cell_mean(crow_ptr, col_ptr, val_ptr, x_ptr, p64, pmask, c, i, imask, CIN, BLOCK_P, BLOCK_I)
        g = tl.load(g_ptr + p64[:, None] * COUT + o[None, :], mask=pmask[:, None] & omask[None, :], other=0.0)
        acc += tl.dot(tl.trans(mean), g, input_precision="ieee")
    rows = ((chunk * 27 + c) * CIN + i).to(tl.int64)
    tl.store(part_ptr + rows[:, None] * COUT + o[None, :], acc, mask=imask[:, None] & omask[None, :])


@on_tensor_device
def cell_conv(crow, col, val, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``(A x).view(R, 27 C_in) @ w`` for float32 ``x (R, C_in)``, ``w (27 C_in, C_out)``."""
    R, cin = x.shape
    cout = w.shape[1]
    out = torch.empty((R, cout), dtype=torch.float32, device=x.device)
    if R == 0 or cout == 0:
        return out
    BP, BO = 32, channel_block(cout, MAX_CHANNELS)
    _cell_conv_kernel[(triton.cdiv(R, BP), triton.cdiv(cout, BO))](
        crow, col, val, x.contiguous(), w.contiguous(), out, R, cin, cout,
        BLOCK_P=BP, BLOCK_I=channel_block(cin, MAX_CHANNELS), BLOCK_O=BO)
    return out


@on_tensor_device
def cell_weight_grad(crow, col, val, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``sum_p mean(p)^T g[p]`` -> ``(27 C_in, C_out)`` float32, summed in a fixed order."""
    R, cin = x.shape
    cout = g.shape[1]
    if R == 0:
        return torch.zeros((27 * cin, cout), dtype=torch.float32, device=x.device)
    BP = 32
    blocks = triton.cdiv(R, BP)
    chunks = min(blocks, _CHUNKS)
    per_chunk = triton.cdiv(blocks, chunks)
    chunks = triton.cdiv(blocks, per_chunk)
    part = torch.empty((chunks, 27 * cin, cout), dtype=torch.float32, device=x.device)
    _cell_weight_grad_kernel[(27, chunks)](
        crow, col, val, x.contiguous(), g.contiguous(), part, R, cin, cout, per_chunk,
        BLOCK_P=BP, BLOCK_I=channel_block(cin, MAX_CHANNELS), BLOCK_O=channel_block(cout, MAX_CHANNELS))
    return part.sum(0)

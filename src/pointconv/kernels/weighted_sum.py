"""Triton kernels for the weighted neighbor sums of ``pointconv._weighted_sum``.

  gather_sum   out[q, :] = sum_k w[q, k] * f[idx[q, k], :]          one program per (rows, channels) tile
  pair_dot     out[q, k] = g[q, :] . f[idx[q, k], :]                one program per (rows, k) tile
  scatter_sum  out[j, :] = sum_{(q, k): idx[q, k] = j} w[q, k] g[q, :]

scatter_sum is deterministic without atomics: the host sorts the flat neighbor list by target row
(a stable sort, so equal targets keep their (q, k) order) and each program sums one target's
segment in that order. Accumulation is float32 (inputs may be fp16/bf16/fp32); ``idx = -1``
contributes nothing. Offsets are int64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import channel_block, on_tensor_device


@triton.jit
def _gather_sum_kernel(w_ptr, f_ptr, idx_ptr, out_ptr, Q, C, K,
                       BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask = rows < Q
    cmask = cols < C
    rows64 = rows.to(tl.int64)
    acc = tl.zeros((BLOCK_Q, BLOCK_C), tl.float32)
    for k in range(0, K):
        j = tl.load(idx_ptr + rows64 * K + k, mask=rmask, other=-1)
        wk = tl.load(w_ptr + rows64 * K + k, mask=rmask, other=0.0).to(tl.float32)
        ok = rmask & (j >= 0)
        fv = tl.load(f_ptr + j.to(tl.int64)[:, None] * C + cols[None, :], mask=ok[:, None] & cmask[None, :],
                     other=0.0).to(tl.float32)
        acc += tl.where(ok, wk, 0.0)[:, None] * fv
    tl.store(out_ptr + rows64[:, None] * C + cols[None, :], acc, mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _pair_dot_kernel(g_ptr, f_ptr, idx_ptr, out_ptr, Q, C, K,
                     BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    k = tl.program_id(1)
    rmask = rows < Q
    rows64 = rows.to(tl.int64)
    j = tl.load(idx_ptr + rows64 * K + k, mask=rmask, other=-1)
    ok = rmask & (j >= 0)
    acc = tl.zeros((BLOCK_Q,), tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        m = ok[:, None] & (cols < C)[None, :]
        gv = tl.load(g_ptr + rows64[:, None] * C + cols[None, :], mask=m, other=0.0).to(tl.float32)
        fv = tl.load(f_ptr + j.to(tl.int64)[:, None] * C + cols[None, :], mask=m, other=0.0).to(tl.float32)
        acc += tl.sum(gv * fv, axis=1)
    tl.store(out_ptr + rows64 * K + k, acc, mask=rmask)


@triton.jit
def _segment_sum_kernel(order_ptr, start_ptr, w_ptr, g_ptr, out_ptr, C, K,
                        BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    target = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    s0 = tl.load(start_ptr + target)
    s1 = tl.load(start_ptr + target + 1)
    acc = tl.zeros((BLOCK_C,), tl.float32)
    for t0 in range(s0, s1, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tm = t < s1
        pos = tl.load(order_ptr + t, mask=tm, other=0)  # flat (q, k) position
        wv = tl.load(w_ptr + pos, mask=tm, other=0.0).to(tl.float32)
        gv = tl.load(g_ptr + (pos // K)[:, None] * C + cols[None, :], mask=tm[:, None] & cmask[None, :],
                     other=0.0).to(tl.float32)
        # a fixed-shape tile reduced in a fixed order: the same sum on every run
        acc += tl.sum(wv[:, None] * gv, axis=0)
    tl.store(out_ptr + target * C + cols, acc, mask=cmask)


@on_tensor_device
def gather_sum(w: torch.Tensor, f: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    Q, K = idx.shape
    C = f.shape[1]
    out = torch.empty((Q, C), dtype=torch.float32, device=f.device)
    if Q == 0 or C == 0:
        return out.to(f.dtype)
    BQ, BC = 32, channel_block(C, 128)
    _gather_sum_kernel[(triton.cdiv(Q, BQ), triton.cdiv(C, BC))](
        w.contiguous(), f.contiguous(), idx.contiguous(), out, Q, C, K, BLOCK_Q=BQ, BLOCK_C=BC)
    return out.to(f.dtype)


@on_tensor_device
def pair_dot(g: torch.Tensor, f: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    Q, K = idx.shape
    C = f.shape[1]
    out = torch.empty((Q, K), dtype=torch.float32, device=f.device)
    if Q == 0 or K == 0:
        return out.to(g.dtype)
    BQ, BC = 32, channel_block(C, 128)
    _pair_dot_kernel[(triton.cdiv(Q, BQ), K)](
        g.contiguous(), f.contiguous(), idx.contiguous(), out, Q, C, K, BLOCK_Q=BQ, BLOCK_C=BC)
    return out.to(g.dtype)


@on_tensor_device
def scatter_sum(w: torch.Tensor, g: torch.Tensor, idx: torch.Tensor, num_rows: int) -> torch.Tensor:
    Q, K = idx.shape
    C = g.shape[1]
    out = torch.zeros((num_rows, C), dtype=torch.float32, device=g.device)
    if Q == 0 or num_rows == 0 or C == 0:
        return out.to(g.dtype)
    flat = idx.reshape(-1)
    # Missing neighbors (-1) sort first and fall outside every target's segment.
    sorted_idx, order = torch.sort(flat, stable=True)
    start = torch.searchsorted(sorted_idx, torch.arange(num_rows + 1, device=g.device))
    BC = channel_block(C, 128)
    _segment_sum_kernel[(num_rows, triton.cdiv(C, BC))](
        order.contiguous(), start.contiguous(), w.contiguous().reshape(-1), g.contiguous(), out, C, K,
        BLOCK_T=32, BLOCK_C=BC)
    return out.to(g.dtype)

"""Triton farthest point sampling: one program per cloud, one pass over the cloud per sample.

Same algorithm and tie rule as ``pointconv.neighbors.sampling._fps_torch`` (the reference): the
running min-distance of each point lives in a scratch buffer; chosen points are marked -1 and
padded points -2 so neither is picked again; the maximum goes to the lowest index. Distances
are evaluated in coordinate order without FMA, so the indices equal the reference's exactly.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import on_tensor_device


@triton.jit
def _fps_kernel(p_ptr, len_ptr, start_ptr, mind_ptr, out_ptr, N, n_samples,
                D: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    npts = tl.load(len_ptr + b)
    cur = tl.load(start_ptr + b)
    base = p_ptr + b * N * D
    mind_base = mind_ptr + b * N
    ar = tl.arange(0, BLOCK)
    for s in range(0, tl.minimum(n_samples, npts)):
        tl.store(out_ptr + b * n_samples + s, cur)
        best_val = tl.zeros((), tl.float32) - 3.0
        best_idx = cur.to(tl.int64)
        for start in range(0, npts, BLOCK):
            offs = start + ar
            m = offs < npts
            for c in tl.static_range(D):
                pc = tl.load(base + offs.to(tl.int64) * D + c, mask=m, other=0.0)
                cc = tl.load(base + cur * D + c)
                diff = pc - cc
                if c == 0:
                    dist = diff * diff
                else:
                    dist = dist + diff * diff
            old = tl.load(mind_base + offs, mask=m, other=-2.0)
            new = tl.minimum(old, dist)
            new = tl.where(offs == cur, -1.0, new)
            new = tl.where(m, new, -2.0)
            tl.store(mind_base + offs, new, mask=m)
            tile_max = tl.max(new, axis=0)
            tile_arg = tl.argmax(new, axis=0, tie_break_left=True)
            better = tile_max > best_val  # strict: an earlier tile keeps ties
            best_idx = tl.where(better, (start + tile_arg).to(tl.int64), best_idx)
            best_val = tl.where(better, tile_max, best_val)
        cur = best_idx.to(tl.int64)


@on_tensor_device
def farthest_point_sample_triton(points, n, lengths, start):
    """``points (B, N, D)`` float32 -> ``(B, n)`` int64 sample indices (see the module docstring)."""
    B, N, D = points.shape
    out = torch.full((B, n), -1, dtype=torch.int64, device=points.device)
    if B == 0 or N == 0:
        return out
    valid = torch.arange(N, device=points.device)[None, :] < lengths[:, None]
    mind = torch.where(valid, float("inf"), -2.0).to(torch.float32).contiguous()
    BLOCK = min(1024, triton.next_power_of_2(N))
    _fps_kernel[(B,)](points.contiguous(), lengths.contiguous(), start.contiguous(), mind, out, N, n,
                      D=D, BLOCK=BLOCK, enable_fp_fusion=False)
    return out

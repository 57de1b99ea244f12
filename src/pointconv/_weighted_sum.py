"""Weighted neighbor sums, differentiable to any order, without materializing ``(Q, k, C)``.

Three ops over flat tensors (batches are folded into the row dimension by the caller):

  ``gather_sum(w, f, idx)[q]   = sum_k w[q, k] * f[idx[q, k]]``          -> (Q, C)
  ``scatter_sum(w, g, idx)[j]  = sum_{q, k : idx[q, k] = j} w[q, k] * g[q]``   -> (P, C)
  ``pair_dot(g, f, idx)[q, k]  = g[q] . f[idx[q, k]]``                    -> (Q, k)

``idx = -1`` marks a missing neighbor: it contributes nothing. The three are closed under
differentiation (the gradient of each is made of the others), so each backward is written with
them and autograd differentiates it again: exact gradients of every order. Each op works over
chunks of rows, so memory stays at ``chunk x k x C`` whatever Q is. ``scatter_sum`` accumulates with
``_row_sums.add_rows_``: ``index_add_`` on CPU (sequential, deterministic), ``index_put_(accumulate=True)`` on CUDA
(deterministic under ``torch.use_deterministic_algorithms``). On the triton backend (CUDA,
float32/16) the three run as the kernels of ``pointconv.kernels.weighted_sum`` (deterministic by
construction: no atomics).
"""
from __future__ import annotations

import torch

from ._backend import backend_for
from ._row_sums import add_rows_
from ._func_transforms import bilinear_tangent
from ._matmul_precision import autocast_state, in_forward_autocast, no_autocast

_CHUNK_ELEMENTS = 1 << 22  # rows x k x C per chunk


def _chunk_rows(k: int, c: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(1, k * c))


def _gather_rows(f: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``f[idx]`` with zeros for ``idx = -1``: (n, k) -> (n, k, C)."""
    out = f.index_select(0, idx.clamp(min=0).reshape(-1)).view(*idx.shape, f.shape[1])
    missing = idx < 0
    return out.masked_fill(missing.unsqueeze(-1), 0) if bool(missing.any()) else out


def _gather_sum(w, f, idx):
    Q, k = idx.shape
    out = f.new_empty((Q, f.shape[1]))
    step = _chunk_rows(k, f.shape[1])
    for s in range(0, Q, step):
        out[s:s + step] = torch.einsum("qk,qkc->qc", w[s:s + step], _gather_rows(f, idx[s:s + step]))
    return out


def _scatter_sum(w, g, idx, num_rows):
    Q, k = idx.shape
    out = g.new_zeros((num_rows, g.shape[1]))
    step = _chunk_rows(k, g.shape[1])
    for s in range(0, Q, step):
        ii = idx[s:s + step]
        contrib = (w[s:s + step] * (ii >= 0).to(w.dtype)).unsqueeze(-1) * g[s:s + step].unsqueeze(1)
        flat = ii.clamp(min=0).reshape(-1)
        contrib = contrib.flatten(0, 1)  # (not reshape(-1, C): ambiguous for C = 0)
        add_rows_(out, flat, contrib)
    return out


def _pair_dot(g, f, idx):
    Q, k = idx.shape
    out = g.new_empty((Q, k))
    step = _chunk_rows(k, g.shape[1])
    for s in range(0, Q, step):
        out[s:s + step] = torch.einsum("qc,qkc->qk", g[s:s + step], _gather_rows(f, idx[s:s + step]))
    return out


def _triton_ok(*tensors) -> bool:
    # The kernels accumulate in float32: float64 stays on the torch path.
    return backend_for(tensors[0].device) == "triton" and all(t.dtype != torch.float64 for t in tensors)


_TORCH_OPS = {"gather_sum": _gather_sum, "scatter_sum": _scatter_sum, "pair_dot": _pair_dot}


def _dispatch(name, a, b, *rest):
    """Run op ``name`` as a Triton kernel on the triton backend, else as chunked torch; in the
    inputs' dtype inside autocast regions too (the einsums would run in fp16 / bf16 there and their
    results be copied into the inputs' dtype: float32 tensors of bf16 precision)."""
    if _triton_ok(a, b):
        from .kernels import weighted_sum as kernels

        return getattr(kernels, name)(a, b, *rest)
    with no_autocast(a.device):
        return _TORCH_OPS[name](a, b, *rest)


class _WeightedSum(torch.autograd.Function):
    """One of the three ops, ``name`` applied to ``(a, b, idx)`` (``num_rows`` for scatter_sum);
    its backward is written with the three, so autograd differentiates it again."""

    @staticmethod
    def forward(name, a, b, idx, num_rows):
        return _dispatch(name, a, b, idx, num_rows) if name == "scatter_sum" else _dispatch(name, a, b, idx)

    @staticmethod
    def setup_context(ctx, inputs, output):  # (apart from forward: torch.func.grad can transform it)
        name, a, b, idx, num_rows = inputs
        ctx.save_for_backward(a, b, idx)
        ctx.save_for_forward(a, b, idx)
        ctx.name, ctx.num_rows = name, num_rows
        ctx.autocast = autocast_state(a.device)

    @staticmethod
    @in_forward_autocast
    def jvp(ctx, _, a_t, b_t, __, ___):
        a, b, idx = ctx.saved_tensors
        return bilinear_tangent(lambda u, v: _WeightedSum.apply(ctx.name, u, v, idx, ctx.num_rows), a, b, a_t, b_t)

    @staticmethod
    @in_forward_autocast
    def backward(ctx, grad):
        a, b, idx = ctx.saved_tensors
        op = _WeightedSum.apply
        need_a, need_b = ctx.needs_input_grad[1:3]
        if ctx.name == "gather_sum":  # (w, f): out = sum_k w f[idx]
            ga = op("pair_dot", grad, b, idx, None) if need_a else None
            gb = op("scatter_sum", a, grad, idx, b.shape[0]) if need_b else None
        elif ctx.name == "scatter_sum":  # (w, g): out[j] = sum_{idx = j} w g
            ga = op("pair_dot", b, grad, idx, None) if need_a else None
            gb = op("gather_sum", a, grad, idx, None) if need_b else None
        else:  # pair_dot (g, f): out = g . f[idx]
            ga = op("gather_sum", grad, b, idx, None) if need_a else None
            gb = op("scatter_sum", grad, a, idx, b.shape[0]) if need_b else None
        return None, ga, gb, None, None


def gather_sum(w: torch.Tensor, f: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``out[q] = sum_k w[q, k] * f[idx[q, k]]`` for ``w (Q, k)``, ``f (P, C)``, ``idx (Q, k)`` int64."""
    return _WeightedSum.apply("gather_sum", w, f, idx, None)


def scatter_sum(w: torch.Tensor, g: torch.Tensor, idx: torch.Tensor, num_rows: int) -> torch.Tensor:
    """``out[j] = sum_{(q, k): idx[q, k] = j} w[q, k] * g[q]`` for ``w (Q, k)``, ``g (Q, C)`` -> ``(num_rows, C)``."""
    return _WeightedSum.apply("scatter_sum", w, g, idx, num_rows)


def pair_dot(g: torch.Tensor, f: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``out[q, k] = g[q] . f[idx[q, k]]`` for ``g (Q, C)``, ``f (P, C)`` -> ``(Q, k)``."""
    return _WeightedSum.apply("pair_dot", g, f, idx, None)


def gather_sum_reference(w, f, idx):
    """Plain PyTorch: materializes ``(Q, k, C)``."""
    nbr = f[idx.clamp(min=0)] * (idx >= 0).unsqueeze(-1).to(f.dtype)
    return (w.unsqueeze(-1) * nbr).sum(1)

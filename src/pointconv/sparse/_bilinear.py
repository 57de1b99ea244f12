"""A sparse convolution as one bilinear autograd Function, exact to any order of derivatives.

``conv(x, w; T)[m] = sum_o sum_{pairs (i, m) of offset o} x[i] @ w[o]`` with ``w (V, C_in, C_out)``
is bilinear in (x, w), and so is its weight gradient ``wgrad(x, g; T)[o] = sum_{pairs (i, m) of o}
x[i]^T g[m]``. Every derivative of either is again one of the two, on the map or on its transpose
``T'`` (the same pairs read from the input side):

    conv:   d/dx = conv(g, w^T; T'),   d/dw = wgrad(x, g; T)
    wgrad:  d/dx = conv(g, h^T; T'),   d/dg = conv(x, h; T)        (h: the cotangent, w's shape)

so one Function that calls itself in backward is exact to any order. ``T`` is any object with
``conv(x, w)``, ``weight_grad(x, g)`` and ``transposed``: the Triton tables of ``_implicit_gemm``
(CUDA) or the tiled pair products of ``_pair_gemm`` (CPU).
"""
from __future__ import annotations

import torch

from .._func_transforms import bilinear_tangent


def bilinear_conv(x: torch.Tensor, w: torch.Tensor, T) -> torch.Tensor:
    """``(M_out, C_out)``: ``conv(x, w; T)``, differentiable to any order in x and w ``(V, C_in, C_out)``."""
    return _Bilinear.apply("conv", x, w, T)


class _Bilinear(torch.autograd.Function):
    """``"conv"``: ``(x, w) -> conv(x, w; T)``; ``"weight_grad"``: ``(x, g) -> wgrad(x, g; T)``."""

    @staticmethod
    def forward(mode, x, y, T):
        compute = T.conv if mode == "conv" else T.weight_grad
        return compute(x.contiguous(), y.contiguous())

    @staticmethod
    def setup_context(ctx, inputs, output):  # (apart from forward: torch.func.grad can transform it)
        mode, x, y, T = inputs
        ctx.save_for_backward(x, y)
        ctx.save_for_forward(x, y)
        ctx.mode, ctx.tables = mode, T

    @staticmethod
    def jvp(ctx, _, x_t, y_t, __):
        x, y = ctx.saved_tensors
        return bilinear_tangent(lambda u, v: _Bilinear.apply(ctx.mode, u, v, ctx.tables), x, y, x_t, y_t)

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

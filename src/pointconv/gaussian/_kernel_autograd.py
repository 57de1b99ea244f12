"""The Gaussian weighted sum over given neighbors on the Triton backend, differentiable to any order.

``GaussianSum.apply(q, p, f, sigma, R, idx) -> (f_out, w, m)``: the outputs of
``knn_aggregate_aniso`` once the neighbors are chosen (``w`` and ``m`` zero and inf where
``idx = -1``). Three levels, each exact:

* forward: one kernel (``kernels/gaussian_sum.forward``); ``w = torch.exp(-m)`` of the kernel's
  ``m``, bitwise the weights of the torch path.
* backward: ``GaussianSumGrad``, two kernels (a pass per block of queries, a pass per point over
  its sorted pairs; ``kernels/gaussian_sum.backward``).
* double backward: ``GaussianSumGradGrad``, two kernels (``kernels/gaussian_sum_double.py``) that
  evaluate ``double_backward`` below; that function, written in torch ops and the weighted sums of
  ``pointconv._weighted_sum``, is their reference and what a third derivative differentiates.

The double backward. With ``gm = g_m - w (g_w + g_fout . f_j)`` the cotangent reaching ``m`` of a
pair, the backward is linear in the pair terms, and for cotangents ``a_*`` of its outputs

    <a, backward> = sum over pairs of  gm * h + w * (g_fout[i] . a_f[j])
    h = 2 (sigma * u) . c + a_sigma[j] . u**2,   c = R b + a_R[j] d,   b = a_q[i] - a_p[j]

(``dm/dd = 2 R^T (sigma * u)``, ``dm/dsigma = u**2``, ``dm/dR = 2 (sigma * u) d^T``). Its partial
derivatives w.r.t. g_m, g_w, g_fout, f and the geometry are written out below; the one w.r.t. ``w``
(``-(g_w + g_fout . f_j) h + g_fout . a_f[j]``) is returned as the gradient of the input ``w``,
which autograd passes back through ``GaussianSum``'s backward: the kernels again.
"""
from __future__ import annotations

import torch

from .._matmul_precision import autocast_state, in_forward_autocast
from .._weighted_sum import gather_sum, pair_dot, scatter_sum


class GaussianSum(torch.autograd.Function):
    @staticmethod
    def forward(q, p, f, sigma, R, idx):
        from ..kernels import gaussian_sum as kernels

        f_out, m = kernels.forward(q, p, f, sigma, R, idx)
        w = torch.where(idx >= 0, torch.exp(-m), 0.0)
        return f_out, w, m

    @staticmethod
    def setup_context(ctx, inputs, output):  # (apart from forward: torch.func.grad can transform it)
        ctx.save_for_backward(*inputs, output[1])
        ctx.set_materialize_grads(False)
        ctx.autocast = autocast_state(inputs[0].device)

    @staticmethod
    @in_forward_autocast
    def backward(ctx, g_fout, g_w, g_m):
        q, p, f, sigma, R, idx, w = ctx.saved_tensors
        if g_fout is None and g_w is None and g_m is None:
            return (None,) * 6
        grads = GaussianSumGrad.apply(q, p, f, sigma, R, idx, w, g_fout, g_w, g_m, ctx.needs_input_grad[2])
        g_q, g_p, g_f, g_s, g_R = grads
        return g_q, g_p, g_f if ctx.needs_input_grad[2] else None, g_s, g_R, None


class GaussianSumGrad(torch.autograd.Function):
    """``(g_q, g_p, g_f, g_sigma, g_R)`` of GaussianSum for the cotangents ``(g_fout, g_w, g_m)``
    (any of them None); ``g_f`` is an empty tensor unless ``need_f``."""

    @staticmethod
    def forward(q, p, f, sigma, R, idx, w, g_fout, g_w, g_m, need_f):
        from ..kernels import gaussian_sum as kernels

        g_q, g_p, g_f, g_s, g_R = kernels.backward(q, p, f, sigma, R, idx, w, g_fout, g_w, g_m, need_f)
        g_f = f.new_zeros((0,)) if g_f is None else g_f.to(f.dtype)
        return g_q, g_p, g_f, g_s, g_R

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:10])
        ctx.set_materialize_grads(False)
        ctx.autocast = autocast_state(inputs[0].device)

    @staticmethod
    @in_forward_autocast
    def backward(ctx, a_q, a_p, a_f, a_s, a_R):
        a_f = a_f if a_f is not None and a_f.numel() else None
        grads = GaussianSumGradGrad.apply(*ctx.saved_tensors, a_q, a_p, a_f, a_s, a_R)
        # inputs: q, p, f, sigma, R, idx, w, g_fout, g_w, g_m, need_f
        return (*grads[:5], None, *grads[5:], None)


class GaussianSumGradGrad(torch.autograd.Function):
    """``double_backward`` as two kernels (``kernels/gaussian_sum_double.py``); differentiating it
    again (third order) differentiates the torch-ops ``double_backward``."""

    @staticmethod
    def forward(q, p, f, sigma, R, idx, w, g_fout, g_w, g_m, a_q, a_p, a_f, a_s, a_R):
        from ..kernels import gaussian_sum_double as kernels

        d_q, d_p, d_f, d_s, d_R, d_w, d_gf, d_gw, d_gm = kernels.double_backward(
            q, p, f, sigma, R, idx, w, g_fout, g_w, g_m, a_q, a_p, a_f, a_s, a_R)
        return d_q, d_p, d_f.to(f.dtype), d_s, d_R, d_w, None if d_gf is None else d_gf.to(g_fout.dtype), d_gw, d_gm

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)
        ctx.set_materialize_grads(False)
        ctx.autocast = autocast_state(inputs[0].device)

    @staticmethod
    @in_forward_autocast
    def backward(ctx, *cotangents):
        create_graph = torch.is_grad_enabled()
        saved = ctx.saved_tensors
        with torch.enable_grad():
            # partial derivatives w.r.t. each input: fresh nodes (w depends on q, p, ..., but its alias
            # does not), still attached to the inputs' graphs so that a fourth derivative reaches them
            inputs = [None if t is None or i == 5 else t.view_as(t) if t.requires_grad else t.detach().requires_grad_()
                      for i, t in enumerate(saved)]
            outs = double_backward(*(saved[5] if i == 5 else t for i, t in enumerate(inputs)))
            used = [(o, c) for o, c in zip(outs, cotangents) if o is not None and c is not None and o.requires_grad]
            wrt = [t for t in inputs if t is not None]
            grads = iter(torch.autograd.grad([o for o, _ in used], wrt, [c for _, c in used], allow_unused=True,
                                             create_graph=create_graph) if used else [None] * len(wrt))
        return tuple(None if t is None else next(grads) for t in inputs)


def double_backward(q, p, f, sigma, R, idx, w, g_fout, g_w, g_m, a_q, a_p, a_f, a_s, a_R):
    """The gradients of ``<a, GaussianSumGrad(...)>`` w.r.t. ``q, p, f, sigma, R, w, g_fout, g_w,
    g_m`` (None where the input is None or the gradient is zero), in differentiable ops."""
    B, Q, K = idx.shape
    P, F = p.shape[1], f.shape[2]
    valid = idx >= 0
    flat = torch.where(valid, idx + (torch.arange(B, device=idx.device) * P)[:, None, None], -1).reshape(B * Q, K)
    safe = flat.clamp(min=0).reshape(-1)
    vmask = valid.unsqueeze(-1).to(q.dtype)

    def take(x):  # (B, P, ...) per point -> (B, Q, K, ...) per pair, zero where idx = -1
        rows = x.reshape(B * P, -1).index_select(0, safe).reshape(B, Q, K, -1) * vmask
        return rows.reshape(B, Q, K, *x.shape[2:])

    def scatter(pairs):  # (B, Q, K, ...) per pair -> (B, P, ...) summed per point (deterministic)
        rows = pairs.reshape(B * Q * K, -1)
        out = scatter_sum(vmask.reshape(-1, 1), rows, flat.reshape(-1, 1), B * P)
        return out.reshape(B, P, *pairs.shape[3:])

    def add(a, b):
        return b if a is None else a if b is None else a + b

    def fold(x):  # (B, Q, F) or (B, P, F) -> rows for the weighted sums
        return x.reshape(-1, x.shape[-1])

    # the cotangent reaching w, and gm, the one reaching m
    s_dot = pair_dot(fold(g_fout), fold(f.to(q.dtype)), flat).reshape(B, Q, K) if g_fout is not None else None
    gw_total = add(g_w, s_dot)
    gm = (g_m if g_m is not None else 0) - (w * gw_total if gw_total is not None else 0)
    gm = gm * valid.to(q.dtype) if isinstance(gm, torch.Tensor) else None

    d = q.unsqueeze(2) - take(p)
    Rg, sg = take(R), take(sigma)
    u = (Rg @ d.unsqueeze(-1)).squeeze(-1)
    b = add(a_q.unsqueeze(2) if a_q is not None else None, -take(a_p) if a_p is not None else None)
    aRg = take(a_R) if a_R is not None else None
    c = add((Rg @ b.unsqueeze(-1)).squeeze(-1) if b is not None else None,
            (aRg @ d.unsqueeze(-1)).squeeze(-1) if aRg is not None else None)
    asg = take(a_s) if a_s is not None else None
    h = add(2 * (sg * u * c).sum(-1) if c is not None else None, (asg * u * u).sum(-1) if asg is not None else None)

    grad = dict.fromkeys(("q", "p", "f", "sigma", "R", "w", "g_fout", "g_w", "g_m"))
    t_dot = pair_dot(fold(g_fout), fold(a_f.to(q.dtype)), flat).reshape(B, Q, K) if (
        g_fout is not None and a_f is not None) else None
    if h is not None:
        grad["g_m"] = h * valid.to(q.dtype) if g_m is not None else None
        grad["g_w"] = -w * h if g_w is not None else None
        if g_fout is not None:
            wh = (-w * h).reshape(B * Q, K)
            grad["g_fout"] = gather_sum(wh, fold(f.to(q.dtype)), flat).reshape(B, Q, F)
            grad["f"] = scatter_sum(wh, fold(g_fout), flat, B * P).reshape(B, P, F).to(f.dtype)
        grad["w"] = -gw_total * h if gw_total is not None else None
        if gm is not None:
            hu = add(2 * sg * c if c is not None else None, 2 * asg * u if asg is not None else None)
            g_u = gm.unsqueeze(-1) * hu
            g_d = (Rg.transpose(-1, -2) @ g_u.unsqueeze(-1)).squeeze(-1)
            g_R = g_u.unsqueeze(-1) * d.unsqueeze(-2)
            g_s = None
            if c is not None:
                g_c = gm.unsqueeze(-1) * (2 * sg * u)
                g_s = gm.unsqueeze(-1) * (2 * u * c)
                if aRg is not None:
                    g_d = g_d + (aRg.transpose(-1, -2) @ g_c.unsqueeze(-1)).squeeze(-1)
                if b is not None:
                    g_R = g_R + g_c.unsqueeze(-1) * b.unsqueeze(-2)
            grad["q"] = g_d.sum(2)
            # one scatter (one sort of the neighbor list) for p, sigma and R
            per_point = scatter(torch.cat([-g_d, g_s if g_s is not None else torch.zeros_like(g_d),
                                           g_R.flatten(-2)], dim=-1))
            grad["p"] = per_point[..., :3]
            grad["sigma"] = per_point[..., 3:6] if g_s is not None else None
            grad["R"] = per_point[..., 6:].unflatten(-1, (3, 3))
    if t_dot is not None:
        grad["w"] = add(grad["w"], t_dot)
        grad["g_fout"] = add(grad["g_fout"], gather_sum(w.reshape(B * Q, K), fold(a_f.to(q.dtype)), flat).reshape(B, Q, F))
    if grad["g_fout"] is not None:
        grad["g_fout"] = grad["g_fout"].to(g_fout.dtype)
    return tuple(grad.values())

"""Index structures built inside torch.func's ``grad`` / ``jvp`` transforms.

Inside those transforms every op's output is a wrapper that tracks it, and a wrapper has no data
pointer: kd-trees (NumPy views), ``nonzero``-based compactions and writes into kept site tables
fail on it. The structures (neighbor lists, kernel maps, site tables) are not differentiated;
the differentiable parts recompute from the wrapped inputs through them. So they are built on
the inputs' values with the transforms suspended (``suspended``, ``outside_func_transforms``;
also the structures' lazily built parts, which would otherwise be cached as the transforms'
wrappers).
``vmap`` is not handled: its batched tensors stop at the inputs' data-dependent checks.
"""
from __future__ import annotations

import contextlib
import functools

import torch

_functorch = getattr(torch._C, "_functorch", None)
_disable = getattr(torch._C, "_DisableFuncTorch", None)


def under_grad_transforms() -> bool:
    """Inside torch.func's grad / jvp / vjp transforms only (none of them under a vmap)."""
    if _functorch is None or _disable is None or _functorch.maybe_current_level() is None:
        return False
    kinds = (_functorch.TransformType.Grad, _functorch.TransformType.Jvp)
    return all(i.key() in kinds for i in _functorch.get_interpreter_stack())


def _value(x):
    if not isinstance(x, torch.Tensor):
        return x
    while _functorch.is_gradtrackingtensor(x):
        x = _functorch.get_unwrapped(x)
    return x.detach()


@contextlib.contextmanager
def suspended(*tensors):
    """The tensors detached; inside grad / jvp transforms their values, the transforms suspended
    until the block ends (what it computes comes out as constants of the transforms)."""
    if not under_grad_transforms():
        yield [x.detach() if isinstance(x, torch.Tensor) else x for x in tensors]
        return
    with _disable():  # (a detach inside the transforms would wrap the values again)
        yield [_value(x) for x in tensors]


def has_tangent(t: torch.Tensor) -> bool:
    """Whether ``t`` is a forward-mode dual tensor (an op that runs on detached values, or on a
    kernel without a jvp, would otherwise return no tangent, silently)."""
    return torch.autograd.forward_ad.unpack_dual(t).tangent is not None


def bilinear_tangent(op, x, y, x_t, y_t):
    """The forward-mode tangent of ``op(x, y)``, bilinear in ``(x, y)``: ``op(x_t, y) + op(x, y_t)``,
    a term for each tangent given (None: no tangent)."""
    terms = [op(x_t, y)] if x_t is not None else []
    if y_t is not None:
        terms.append(op(x, y_t))
    return sum(terms[1:], terms[0])


def outside_func_transforms(build):
    """``build(*args, **kwargs)`` (a structure builder) run by ``suspended`` on its arguments."""
    @functools.wraps(build)
    def wrapper(*args, **kwargs):
        if not under_grad_transforms():
            return build(*args, **kwargs)
        names = list(kwargs)
        with suspended(*args, *kwargs.values()) as values:
            return build(*values[:len(args)], **dict(zip(names, values[len(args):])))
    return wrapper

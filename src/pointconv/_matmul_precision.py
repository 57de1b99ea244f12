"""Whether float32 matrix products run in IEEE float32 on a device, or may round more.

Exact neighbor selection ranks candidates with a float32 GEMM and certifies the ranking with a
bound on float32 rounding. ``torch.set_float32_matmul_precision("high")``,
``torch.backends.cuda.matmul.allow_tf32 = True`` and their newer ``fp32_precision`` forms let
float32 products use TF32 on CUDA (10-bit mantissa) or bf16 / TF32 through oneDNN on CPU: a
bound written for float32 would then certify wrong answers. Where this says no, the callers
compute the product in float64, which has no reduced-precision mode. An autocast region would
run a float32 product in fp16 / bf16 whatever these settings say: ``no_autocast`` turns it off
around the products that a bound covers.
"""
from __future__ import annotations

import functools

import torch


def _setting(path: str) -> str:
    """The first ``fp32_precision`` other than "none" from ``torch.backends.<path>`` up to the root."""
    parts = path.split(".")
    for depth in range(len(parts), -1, -1):
        obj = torch.backends
        for name in parts[:depth]:
            obj = getattr(obj, name, None)
        value = getattr(obj, "fp32_precision", "none") if obj is not None else "none"
        if value != "none":
            return value
    return "none"


def ieee_float32_matmul(device: torch.device) -> bool:
    """True when float32 matmuls on ``device`` round as IEEE float32 under the current settings."""
    if hasattr(torch.backends, "fp32_precision"):  # torch >= 2.9: per-backend settings
        path = "cuda.matmul" if device.type == "cuda" else "mkldnn.matmul"
        return _setting(path) in ("none", "ieee")
    if device.type == "cuda":
        return not torch.backends.cuda.matmul.allow_tf32
    return torch.get_float32_matmul_precision() == "highest"


def no_autocast(device: torch.device):
    """A context without autocast on ``device``: float32 products inside stay float32."""
    return torch.autocast(device.type, enabled=False)


def autocast_state(device: torch.device) -> tuple[str, bool, torch.dtype]:
    """The autocast state on ``device`` here: ``(device type, enabled, dtype)``; a custom Function's
    ``setup_context`` records it as ``ctx.autocast`` for ``in_forward_autocast``."""
    return device.type, torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type)


def in_forward_autocast(derivative):
    """Runs a custom Function's ``backward`` / ``jvp`` in the autocast state of its forward
    (``ctx.autocast``, from ``autocast_state``).

    torch runs them in the state of whoever asks for the derivative (``torch.autograd.grad`` inside
    an autocast region, say): their products would be cast to fp16 / bf16 although the forward ran
    without autocast (the Gaussian op and the Pointwise convolution turn it off), or the other way
    round. ``torch.amp.custom_fwd`` / ``custom_bwd`` do this for one device type, fixed when the
    class is defined; this takes the device of the forward's inputs.
    """
    @functools.wraps(derivative)
    def run(ctx, *args):
        device_type, enabled, dtype = ctx.autocast
        with torch.autocast(device_type, enabled=enabled, dtype=dtype):
            return derivative(ctx, *args)

    return run

"""Triton kernels, one module per family. Imported lazily: never on a CPU-only path.

Each function that launches a kernel is wrapped in ``on_tensor_device``: Triton launches on torch's
CURRENT CUDA device and its stream, not on the device of the tensors it is given, so a cuda:1
tensor with cuda:0 current (the default) would run on the wrong GPU.
"""
import functools


def channel_block(channels: int, cap: int) -> int:
    """A tile width for ``channels``: the next power of two, at least 16 (``tl.dot``'s smallest
    dimension), at most ``cap`` (wider layers loop over tiles)."""
    return min(max(16, 1 << max(channels - 1, 0).bit_length()), cap)


def accumulator(dtype):
    """The Triton type kernels accumulate in for inputs of ``dtype``: float64 for float64, else float32."""
    import torch
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32


def on_tensor_device(launcher):
    """Run ``launcher`` with the device of its first CUDA tensor argument current (a no-op for CPU
    tensors, as under Triton's interpreter)."""
    @functools.wraps(launcher)
    def wrapped(*args, **kwargs):
        import torch

        device = next((a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.is_cuda),
                      None)
        if device is None:
            return launcher(*args, **kwargs)
        with torch.cuda.device(device):
            return launcher(*args, **kwargs)

    wrapped.launches_on_tensor_device = True
    return wrapped

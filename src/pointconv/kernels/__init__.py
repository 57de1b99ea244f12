"""Triton kernels, one module per family. Imported lazily: never on a CPU-only path."""


def channel_block(channels: int, cap: int) -> int:
    """A tile width for ``channels``: the next power of two, at least 16 (``tl.dot``'s smallest
    dimension), at most ``cap`` (wider layers loop over tiles)."""
    return min(max(16, 1 << max(channels - 1, 0).bit_length()), cap)


def accumulator(dtype):
    """The Triton type kernels accumulate in for inputs of ``dtype``: float64 for float64, else float32."""
    import torch
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32

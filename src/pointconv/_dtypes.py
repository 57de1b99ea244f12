"""Dtype rules shared by the layers and ops.

- ``accumulation_dtype``: where products of half-precision values are summed: float32 for fp16 /
  bf16 (their own range and precision would lose the sums), any other dtype in itself.
- ``layer_dtype``: a layer's input has its parameters' dtype (outside autocast; or fp16 / bf16
  under float32 parameters where the layer allows it), or a TypeError.
"""
from __future__ import annotations

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for float16 / bfloat16, else ``dtype`` itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def layer_dtype(name: str, x: torch.Tensor, dtype: torch.dtype, *, float32_for_half: bool = False) -> None:
    """A layer's input must have the dtype of its parameters (as torch.nn requires, but said as a
    TypeError that names the input, instead of a RuntimeError from inside a matmul).
    ``float32_for_half``: float32 parameters also take fp16 / bf16 inputs (the layer sums in float32)."""
    if torch.is_autocast_enabled(x.device.type):  # autocast casts the inputs of each op itself
        return
    if not x.is_floating_point():  # (a layer cannot become an integer one)
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dtype != dtype and not (float32_for_half and dtype == accumulation_dtype(x.dtype)):
        raise TypeError(f"{name} has dtype {x.dtype} but the layer's parameters are {dtype}: convert "
                        f"the input (x.to({dtype})) or the layer (layer.to({x.dtype}))")

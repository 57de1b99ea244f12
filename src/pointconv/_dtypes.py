"""Where products of half-precision values are summed: float32 for fp16 / bf16 (their own range and
precision would lose the sums), any other dtype in itself."""
from __future__ import annotations

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for float16 / bfloat16, else ``dtype`` itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype

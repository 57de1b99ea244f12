"""Wall-clock timing for the demos and benchmarks: synchronizes CUDA around each run."""
from __future__ import annotations

import statistics
import time

import torch


def timed_ms(fn, device, repeat: int = 1, warmup: int = 0):
    """``(median milliseconds over repeat runs after warmup runs, the last result)``."""
    device = torch.device(device)
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), out

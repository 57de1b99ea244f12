"""Wall-clock timing for the demos and benchmarks: synchronizes CUDA around each run."""
from __future__ import annotations

import pathlib
import statistics
import time

import torch


def timed_ms(fn, device, repeat: int = 1, warmup: int = 0):
    """``(median milliseconds over repeat runs after warmup runs, the last result)``.

    Each run starts with the previous run's result released: held, it would keep everything its
    autograd graph references alive (a forward's neighbor structures, say) while the next run
    allocates its own, a peak no loop that uses its results meets."""
    device = torch.device(device)
    out = None
    for _ in range(warmup):
        out = None
        out = fn()
    times = []
    for _ in range(repeat):
        out = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), out


def timed_ms_alternating(fns: dict, device, repeat: int = 1, warmup: int = 1) -> dict:
    """``{name: median milliseconds}`` of several callables timed in turns (one run of each per
    round), so that a machine whose load drifts during the benchmark slows them all alike. A
    callable that raises in its warmup gets the exception (the first line) instead of a time."""
    device = torch.device(device)
    results, live = {}, {}
    for name, fn in fns.items():
        try:
            for _ in range(warmup):
                fn()
            live[name] = []
        except (AssertionError, RuntimeError) as e:
            results[name] = e
    for _ in range(repeat):
        for name in live:
            live[name].append(timed_ms(fns[name], device, 1)[0])
    results.update({name: statistics.median(times) for name, times in live.items()})
    return {name: results[name] for name in fns}


def provenance(script: str, device) -> str:
    """The first line of a benchmark table: script, device, torch, threads, commit and date."""
    import subprocess

    device = torch.device(device)
    try:
        # pointconv's own checkout, wherever the script runs from; "unknown" for an installed copy,
        # also one inside another repository (a project's .venv)
        root = pathlib.Path(__file__).resolve().parents[2]
        top, rev = subprocess.run(["git", "rev-parse", "--show-toplevel", "--short", "HEAD"], capture_output=True,
                                  text=True, check=True, cwd=root).stdout.split()
        if pathlib.Path(top).resolve() != root:
            rev = "unknown"
    except (OSError, subprocess.CalledProcessError, ValueError):
        rev = "unknown"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return (f"> {script}: device {device} ({name}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"commit {rev}, {time.strftime('%Y-%m-%d')}")

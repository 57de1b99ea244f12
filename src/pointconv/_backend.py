"""Chooses the implementation of each call.

Backends:
  ``"triton"``     Triton kernels; the default for CUDA tensors when Triton >= 3.5 is installed
                   (``MIN_TRITON``: the oldest that compiles every kernel; older Triton, as shipped
                   with torch 2.4-2.8, leaves CUDA tensors to ``"torch"``).
  ``"torch"``      vectorized PyTorch (and scipy on CPU); the default everywhere else.
  ``"reference"``  the plain PyTorch reference of each op; any device, never the default.

Force one with the environment variable ``POINTCONV_BACKEND`` or, for a block of code, with
``pointconv.use_backend(name)`` (the context manager wins over the variable). Forcing ``"triton"``
on CPU tensors runs the kernels in Triton's interpreter and needs ``TRITON_INTERPRET=1`` set before
the kernels are first imported; it exists for testing.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.metadata
import importlib.util
import os
import re

import torch

BACKENDS = ("reference", "torch", "triton")

# The Triton top-k kernels (kNN, ball query, the Gaussian selection) keep a query block's k best
# packed keys in registers and merge (BQ, 2 k) tiles: beyond 32,768 that tile passes Triton's 2^20
# elements (an error on every device), and long before, the registers spill. Larger k takes the
# torch path on the same device (a GEMM and torch.topk: exact too).
TRITON_MAX_K = 128
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("pointconv_backend", default=None)


# The oldest Triton that compiles every kernel for sm_90 (tests/compile_kernels.py, run with each
# release on 2026-11-22): 3.4 has no float64 tl.dot (sparse convolution in float64), 3.3 fails on
# the Gaussian double-backward kernels, 3.0-3.2 on tuples returned by jit functions.
MIN_TRITON = (3, 5)


@functools.cache
def triton_version_string() -> str | None:
    """The installed Triton's version, None when there is none. Read from the package metadata
    (importing Triton takes a second), or from the module where metadata is missing; once per
    process (a lookup takes ~0.25 ms, and every op on a CUDA tensor asks)."""
    if importlib.util.find_spec("triton") is None:
        return None
    for dist in ("triton", "pytorch-triton", "triton-nightly"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    import triton

    return getattr(triton, "__version__", "0")


def triton_version() -> tuple[int, ...] | None:
    """The installed Triton's ``(major, minor)``, None when there is none."""
    text = triton_version_string()
    return None if text is None else tuple(int(part) for part in re.findall(r"\d+", text)[:2])


def dotted(version: tuple[int, ...]) -> str:
    """``(3, 5)`` -> ``"3.5"``."""
    return ".".join(map(str, version))


def triton_available() -> bool:
    """Whether Triton is installed and new enough (``MIN_TRITON``) for the kernels."""
    version = triton_version()
    return version is not None and version >= MIN_TRITON


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Run the enclosed calls on backend ``name`` ("reference", "torch" or "triton")."""
    token = _forced.set(_check_name(name, "backend"))
    try:
        yield
    finally:
        _forced.reset(token)


def forced_backend() -> str | None:
    name = _forced.get()
    if name is None:
        env = os.environ.get("POINTCONV_BACKEND", "").strip()
        name = _check_name(env, "POINTCONV_BACKEND") if env else None
    return name


def backend_for(device: torch.device) -> str:
    """The backend a call on ``device`` runs on."""
    name = forced_backend()
    if name == "triton":
        if not triton_available():
            version = triton_version()
            found = "Triton is not installed" if version is None else f"Triton {dotted(version)} is installed"
            raise RuntimeError(f"the triton backend was forced but needs Triton >= {dotted(MIN_TRITON)} ({found})")
        if device.type != "cuda" and not triton_interpreted():
            raise RuntimeError(
                "the triton backend was forced for a CPU tensor: set TRITON_INTERPRET=1 "
                "(before pointconv's kernels are imported) to run the kernels in Triton's interpreter"
            )
        return name
    if name is not None:
        return name
    if device.type == "cuda" and triton_available():
        return "triton"
    return "torch"

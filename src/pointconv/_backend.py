"""Chooses the implementation of each call.

Backends:
  ``"triton"``     Triton kernels; the default for CUDA tensors when Triton is importable.
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
import importlib.util
import os

import torch

BACKENDS = ("reference", "torch", "triton")
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("pointconv_backend", default=None)


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


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
            raise RuntimeError("the triton backend was forced but Triton is not installed")
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

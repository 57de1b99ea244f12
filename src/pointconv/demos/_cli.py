"""Checks of command-line options shared by the demos and the examples: they fail before any work."""
from __future__ import annotations

import argparse
import os
import pathlib

import torch


def positive_int(text: str) -> int:
    """argparse ``type=`` for an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def shape_spec(count: int):
    """argparse ``type=`` for ``count`` integers >= 1 joined by "x" ("32x1024"), kept as text."""
    def parse(text: str) -> str:
        parts = text.lower().split("x")
        if len(parts) != count or not all(p.isdigit() and int(p) >= 1 for p in parts):
            raise argparse.ArgumentTypeError(f"expected {count} integers >= 1 joined by x (like "
                                             f"{'x'.join(['16'] * count)}), got {text!r}")
        return text.lower()
    return parse


def seed_int(text: str) -> int:
    """argparse ``type=`` for a random seed: an integer in torch's range, 0 to 2**63 - 1 (negative
    seeds are taken modulo 2**64 by torch, so -1 is allowed too, down to -2**63)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if not -(2**63) <= value < 2**63:
        raise argparse.ArgumentTypeError(f"expected a seed between -2**63 and 2**63 - 1, got {value}")
    return value


def check_device(name: str) -> torch.device:
    """The torch device named ``name`` (cpu or cuda[:N]); ValueError when it cannot be used here."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device name: use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available in this torch {torch.__version__}; "
                             "use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices")
    elif device.type != "cpu":
        raise ValueError(f"--device {name}: only cpu and cuda[:N] are supported")
    return device


def check_out(path: str) -> None:
    """ValueError unless matplotlib can write a figure to ``path``: a writable existing directory and an
    extension matplotlib knows (png, pdf, svg, ...)."""
    from matplotlib.figure import Figure

    p = pathlib.Path(path)
    # (pgf needs a LaTeX installation, and would fail only after the training)
    formats = sorted(set(Figure().canvas.get_supported_filetypes()) - {"pgf"})
    ext = p.suffix.lower().lstrip(".")
    if ext not in formats:
        raise ValueError(f"--out {path!r}: the extension must be one of {', '.join(formats)}")
    folder = p.parent
    if not folder.is_dir():
        raise ValueError(f"--out {path!r}: the directory {str(folder)!r} does not exist")
    if p.is_dir():
        raise ValueError(f"--out {path!r} is a directory")
    if not os.access(folder, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise ValueError(f"--out {path!r} is not writable")

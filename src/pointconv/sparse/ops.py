"""spconv's ``spconv.pytorch.ops`` path: ``ConvAlgo`` and the output-size formulas, for ported code
that imports them from there.

spconv's kernel-map and convolution primitives (``get_indice_pairs``, ``indice_conv``,
``implicit_gemm``, ...) have no counterpart: their tensors are spconv's internal formats. The
layers build and cache pointconv's kernel maps (``kernel_map.py``) themselves.
"""
from __future__ import annotations

from .kernel_map import output_shape, transposed_output_shape
from .modules import ConvAlgo

__all__ = ["ConvAlgo", "get_conv_output_size", "get_deconv_output_size"]


def get_conv_output_size(input_size, kernel_size, stride, padding, dilation) -> list[int]:
    """Output spatial shape of a (strided) sparse convolution or pooling: torch's formula per axis;
    a kernel size of -1 (spconv's whole-axis kernel) gives 1. ValueError where an axis would be
    empty (spconv returns 0 or less there)."""
    _same_lengths(input_size, kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation)
    whole = [k == -1 for k in kernel_size]
    # a whole-axis kernel is as wide as its padded axis: exactly one output
    kernel = [n + 2 * p if w else k for n, k, p, w in zip(input_size, kernel_size, padding, whole)]
    dil = [1 if w else d for d, w in zip(dilation, whole)]
    return output_shape(input_size, kernel, stride, padding, dil)


def get_deconv_output_size(input_size, kernel_size, stride, padding, dilation, output_padding) -> list[int]:
    """Output spatial shape of ``SparseConvTranspose``: torch's ``ConvTranspose`` formula, dilation
    included (spconv's version leaves dilation out; the two agree at dilation 1)."""
    _same_lengths(input_size, kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation,
                  output_padding=output_padding)
    if any(k == -1 for k in kernel_size):
        raise ValueError("get_deconv_output_size: a kernel size of -1 has no transposed convolution")
    return transposed_output_shape(input_size, kernel_size, stride, padding, dilation, output_padding)


def _same_lengths(input_size, **per_axis) -> None:
    """Every per-axis list as long as ``input_size`` (a shorter one would drop axes silently)."""
    for name, values in per_axis.items():
        if len(values) != len(input_size):
            raise ValueError(f"{name} must have one value per axis of input_size ({len(input_size)}), got "
                             f"{list(values)}")

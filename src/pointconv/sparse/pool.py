"""Sparse pooling: max / average over the ACTIVE inputs of each window, and global pooling.

Windows and output sites follow the regular sparse convolution (torch's pooling formulas; stride
defaults to the kernel size, as in torch). ``SparseMaxPoolNd`` takes the max over active inputs
only (a dense max pool over -inf at inactive sites); ``SparseAvgPoolNd`` averages the active inputs.
The bases ``SparseMaxPool(ndim, ...)`` / ``SparseAvgPool`` take spconv's arguments (stride 1 by
default; ``subm=True``: the window centered on each input site, whose output keeps the input's
sites). Gradients: max sends the gradient to the maximum (split evenly between exact ties), average to
every active input.
"""
from __future__ import annotations

import math

import torch

from .._dtypes import accumulation_dtype
from .._row_sums import max_rows
from .conv import _tuple, check_key_unused
from .kernel_map import build_conv, build_in_place, build_subm
from .modules import SparseModule, VoxelCountRecorder
from .tensor import SparseConvTensor, check_layer_input, has_duplicate_sites


def _check_unique_sites(x: SparseConvTensor) -> None:
    # a duplicate site would count twice in its sample's max / mean (a sort of the N keys)
    if has_duplicate_sites(x.indices, x.spatial_shape, x.batch_size):
        raise ValueError("indices has duplicate sites (the same batch and coordinates twice)")


class _SparsePool(VoxelCountRecorder, SparseModule):
    reduce = "amax"  # or "mean"

    # spconv's SparseMaxPool(ndim, ...) arguments, in its order and with its defaults (the Nd classes
    # default the stride to the kernel size)
    def __init__(self, ndim, kernel_size=3, stride=1, padding=0, dilation=1, indice_key=None, subm=False,
                 algo=None, record_voxel_count=False, name=None):
        super().__init__(name=name)
        self.ndim = ndim
        self.kernel_size = _tuple("kernel_size", kernel_size, ndim)
        self.stride = self.kernel_size if stride is None else _tuple("stride", stride, ndim)
        self.padding = _tuple("padding", padding, ndim)
        self.dilation = _tuple("dilation", dilation, ndim)
        if any(v < 1 for v in self.kernel_size + self.stride + self.dilation) or any(p < 0 for p in self.padding):
            raise ValueError("kernel_size, stride and dilation must be >= 1 and padding >= 0")
        self.subm = bool(subm)
        if self.subm and any(v != 1 for v in self.stride):
            raise ValueError(f"a submanifold pool has stride 1, got {list(self.stride)}")
        self.indice_key, self.algo = indice_key, algo
        self._init_voxel_count(record_voxel_count and not self.subm)

    def forward(self, x: SparseConvTensor) -> SparseConvTensor:
        check_layer_input(x, self.ndim)
        if self.subm:  # the window centered on each input site, which is its output site (no key)
            kmap = build_subm(x.indices, x.spatial_shape, self.kernel_size, self.dilation)
            return x.replace_feature(self._reduce(x.features, kmap))
        check_key_unused(self.indice_key, x.find_indice_pair(self.indice_key), subm=False)
        if math.prod(self.kernel_size) == 1 and all(v == 1 for v in self.stride) and not any(self.padding):
            # each site its own window: the output keeps the input's sites in their order, so
            # ``pool(x).features * x.features`` (channel attention) lines up row by row
            _check_unique_sites(x)
            kmap = build_in_place(x.indices, x.spatial_shape, self.kernel_size, self.stride, self.padding,
                                  self.dilation)
        else:
            kmap = build_conv(x.indices, x.spatial_shape, self.kernel_size, self.stride, self.padding,
                              self.dilation)
        indice_dict = dict(x.indice_dict)  # the output's copy, as in spconv
        if self.indice_key is not None:
            indice_dict[self.indice_key] = kmap
        self._record_voxel_count(kmap.out_indices.shape[0])
        return SparseConvTensor._from_layer(self._reduce(x.features, kmap), kmap.out_indices, kmap.out_spatial_shape,
                                            x.batch_size, indice_dict, x.benchmark)

    def _reduce(self, f, kmap):
        """Max or mean of each output site's active inputs (the pairs of ``kmap``)."""
        n_out, C = kmap.out_indices.shape[0], f.shape[1]
        src = f.index_select(0, kmap.in_rows)
        if self.reduce == "amax":
            out = max_rows(n_out, kmap.out_rows, src)
        else:  # summed in float32 for fp16 / bf16 (an fp16 sum passes 65504 where the mean does not)
            acc = accumulation_dtype(f.dtype)
            rows = kmap.out_rows[:, None].expand(-1, C)
            out = src.new_zeros((n_out, C), dtype=acc).scatter_add(0, rows, src.to(acc))
            count = torch.bincount(kmap.out_rows, minlength=n_out).to(acc)
            out = (out / count[:, None]).to(f.dtype)
        return out


class SparseMaxPool(_SparsePool):
    """spconv's base of ``SparseMaxPoolNd``: ``SparseMaxPool(ndim, kernel_size, ...)``."""
    reduce = "amax"


class SparseAvgPool(_SparsePool):
    """spconv's base of ``SparseAvgPoolNd``: ``SparseAvgPool(ndim, kernel_size, ...)``."""
    reduce = "mean"


def _pool_class(base, ndim, name):
    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, indice_key=None, algo=None,
                 record_voxel_count=False, name=None):  # spconv's SparseMaxPoolNd arguments, in its order
        base.__init__(self, ndim, kernel_size, stride, padding, dilation, indice_key, algo=algo,
                      record_voxel_count=record_voxel_count, name=name)

    kind = "max" if base is SparseMaxPool else "average"
    return type(name, (base,), {"__init__": __init__, "__doc__": f"{ndim}-D sparse {kind} pooling over active inputs."})


SparseMaxPool1d = _pool_class(SparseMaxPool, 1, "SparseMaxPool1d")
SparseMaxPool2d = _pool_class(SparseMaxPool, 2, "SparseMaxPool2d")
SparseMaxPool3d = _pool_class(SparseMaxPool, 3, "SparseMaxPool3d")
SparseMaxPool4d = _pool_class(SparseMaxPool, 4, "SparseMaxPool4d")
SparseAvgPool1d = _pool_class(SparseAvgPool, 1, "SparseAvgPool1d")
SparseAvgPool2d = _pool_class(SparseAvgPool, 2, "SparseAvgPool2d")
SparseAvgPool3d = _pool_class(SparseAvgPool, 3, "SparseAvgPool3d")
SparseAvgPool4d = _pool_class(SparseAvgPool, 4, "SparseAvgPool4d")


class SparseGlobalMaxPool(SparseModule):
    """``(B, C)`` dense: the max over each sample's active sites (0 for a sample without sites)."""

    def forward(self, x: SparseConvTensor) -> torch.Tensor:
        check_layer_input(x)
        _check_unique_sites(x)
        b = x.indices[:, 0].long()
        out = max_rows(x.batch_size, b, x.features)  # (NaN for a sample without sites)
        has_sites = torch.bincount(b, minlength=x.batch_size) > 0
        return torch.where(has_sites[:, None], out, torch.zeros_like(out))


class SparseGlobalAvgPool(SparseModule):
    """``(B, C)`` dense: the mean over each sample's active sites (0 for a sample without sites)."""

    def forward(self, x: SparseConvTensor) -> torch.Tensor:
        check_layer_input(x)
        _check_unique_sites(x)
        C = x.features.shape[1]
        b = x.indices[:, 0].long()
        acc = accumulation_dtype(x.features.dtype)  # as in SparseAvgPool: an fp16 sum overflows first
        out = x.features.new_zeros((x.batch_size, C), dtype=acc).index_add(0, b, x.features.to(acc))
        count = torch.bincount(b, minlength=x.batch_size).clamp(min=1).to(acc)
        return (out / count[:, None]).to(x.features.dtype)

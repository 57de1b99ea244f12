"""Sparse voxel convolution with spconv 2.x's API: ``import pointconv.sparse as spconv``.

Implemented so far: ``SparseConvTensor``, ``SubMConv1d..4d``, ``SparseConv1d..4d``,
``SparseModule``, ``SparseSequential``. Transposed / inverse convolutions, pooling, ``PointToVoxel``,
``HashTable`` and the Triton kernels are the rest of the sparse-convolution issue.
"""
from .conv import (SparseConv1d, SparseConv2d, SparseConv3d, SparseConv4d, SparseConvolution, SubMConv1d,
                   SubMConv2d, SubMConv3d, SubMConv4d)
from .modules import SparseModule, SparseSequential
from .tensor import SparseConvTensor

__all__ = ["SparseConvTensor", "SparseConvolution", "SparseModule", "SparseSequential", "SparseConv1d",
           "SparseConv2d", "SparseConv3d", "SparseConv4d", "SubMConv1d", "SubMConv2d", "SubMConv3d", "SubMConv4d"]

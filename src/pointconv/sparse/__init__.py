"""Sparse voxel convolution with spconv 2.x's API: ``import pointconv.sparse as spconv``.

Implemented: ``SparseConvTensor``; ``SubMConvNd``, ``SparseConvNd``, ``SparseConvTransposeNd``,
``SparseInverseConvNd`` (N = 1..4); ``SparseMaxPoolNd``, ``SparseAvgPoolNd``, ``SparseGlobalMaxPool``,
``SparseGlobalAvgPool``; ``SparseModule``, ``SparseSequential``, ``ToDense``, ``SparseReLU``,
``SparseBatchNorm``, ``SparseSyncBatchNorm``, ``SparseIdentity``, ``Identity``, ``RemoveGrid``,
``AddTable``, ``ConcatTable``, ``JoinTable``, ``ConvAlgo``, ``assign_name_for_sparse_modules``;
``functional.sparse_add``.
``utils.PointToVoxel`` / ``utils.gather_features_by_pc_voxel_id`` and ``hash.HashTable``.
spconv's submodule paths that ported code imports from: ``core`` (``SparseConvTensor``,
``expand_nd``, ``scatter_nd``), ``tables`` (``AddTable``, ``AddTableMisaligned``, ``ConcatTable``,
``JoinTable``), ``identity`` (``Identity``), ``ops`` (``ConvAlgo`` and the output-size formulas),
besides ``conv``, ``pool``, ``modules``, ``functional``, ``utils`` and ``hash``.
fp16 and bf16 under ``torch.autocast``; Triton implicit-GEMM kernels on CUDA, per-offset gather-GEMM-
scatter in torch on the CPU (``conv.py``).
"""
from . import functional, hash, utils
from .hash import HashTable
from .conv import (SparseConv1d, SparseConv2d, SparseConv3d, SparseConv4d, SparseConvolution,
                   SparseConvTranspose1d, SparseConvTranspose2d, SparseConvTranspose3d, SparseConvTranspose4d,
                   SparseInverseConv1d, SparseInverseConv2d, SparseInverseConv3d, SparseInverseConv4d, SubMConv1d,
                   SubMConv2d, SubMConv3d, SubMConv4d)
from .modules import (AddTable, ConcatTable, ConvAlgo, Identity, JoinTable, RemoveGrid, SparseBatchNorm,
                      SparseIdentity, SparseModule, SparseReLU, SparseSequential, SparseSyncBatchNorm, ToDense,
                      assign_name_for_sparse_modules)
from .pool import (SparseAvgPool1d, SparseAvgPool2d, SparseAvgPool3d, SparseAvgPool4d, SparseGlobalAvgPool,
                   SparseGlobalMaxPool, SparseMaxPool1d, SparseMaxPool2d, SparseMaxPool3d, SparseMaxPool4d)
from .tensor import SparseConvTensor
from . import core, identity, ops, tables  # (after the modules they re-export)

__all__ = [
    "SparseConvTensor", "SparseConvolution", "HashTable", "functional", "hash", "utils",
    "core", "identity", "ops", "tables",
    "SubMConv1d", "SubMConv2d", "SubMConv3d", "SubMConv4d",
    "SparseConv1d", "SparseConv2d", "SparseConv3d", "SparseConv4d",
    "SparseConvTranspose1d", "SparseConvTranspose2d", "SparseConvTranspose3d", "SparseConvTranspose4d",
    "SparseInverseConv1d", "SparseInverseConv2d", "SparseInverseConv3d", "SparseInverseConv4d",
    "SparseMaxPool1d", "SparseMaxPool2d", "SparseMaxPool3d", "SparseMaxPool4d",
    "SparseAvgPool1d", "SparseAvgPool2d", "SparseAvgPool3d", "SparseAvgPool4d",
    "SparseGlobalMaxPool", "SparseGlobalAvgPool",
    "SparseModule", "SparseSequential", "ToDense", "SparseReLU", "SparseBatchNorm", "SparseSyncBatchNorm",
    "SparseIdentity", "Identity", "RemoveGrid", "AddTable", "ConcatTable", "JoinTable", "ConvAlgo",
    "assign_name_for_sparse_modules",
]

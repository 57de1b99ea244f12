"""spconv's module glue: ``SparseModule``, ``SparseSequential`` and the feature-wise wrappers.

``SparseSequential`` runs sparse layers on the ``SparseConvTensor`` and any plain module
(``nn.BatchNorm1d``, ``nn.ReLU``, ...) on its features, as spconv does; unlike spconv, also on a
tensor without sites (so ``nn.Linear`` sets the width), except a batch norm in training. ``SparseBatchNorm``,
``SparseSyncBatchNorm``, ``SparseReLU`` and ``SparseIdentity`` subclass the torch module they wrap,
as spconv's do, so a checkpoint's keys (``bn.weight``, not ``bn.bn.weight``) load unchanged; they
take a ``SparseConvTensor`` (applied to its features) or a plain tensor.
"""
from __future__ import annotations

import enum
from collections import OrderedDict

import torch
from torch import nn

from .functional import sparse_add
from .tensor import SparseConvTensor


class SparseModule(nn.Module):
    """Base of the modules that take and return a ``SparseConvTensor``."""

    def __init__(self, name=None):
        super().__init__()
        self.name = name
        self._sparse_unique_name = ""  # spconv's (assign_name_for_sparse_modules sets it)


def is_spconv_module(module) -> bool:
    """spconv's: does ``module`` take a ``SparseConvTensor`` (a ``SparseModule``, or a batch norm or
    ReLU of this package's)?"""
    return isinstance(module, (SparseModule, SparseBatchNorm, SparseReLU))


def is_sparse_conv(module) -> bool:
    """spconv's: is ``module`` a sparse convolution?"""
    from .conv import SparseConvolution  # (conv imports this module)

    return isinstance(module, SparseConvolution)


# spconv's name for the buffer of record_voxel_count (in its checkpoints' state_dicts)
MAX_NUM_VOXELS = "max_num_voxels_during_training"


class VoxelCountRecorder:
    """spconv's ``record_voxel_count`` for strided / transposed convolutions and pools: the
    largest number of output sites seen (training and inference), kept in an int32 buffer of
    spconv's name, so the checkpoints of spconv models built with the flag load unchanged."""

    def _init_voxel_count(self, record: bool, device=None) -> None:
        self.record_voxel_count = bool(record)
        if record:
            self.register_buffer(MAX_NUM_VOXELS, torch.zeros(1, dtype=torch.int32, device=device))
            self._register_load_state_dict_pre_hook(self._voxel_count_default)

    def _voxel_count_default(self, state_dict, prefix, *args) -> None:
        # as spconv: a checkpoint saved without the flag loads into a model built with it
        state_dict.setdefault(prefix + MAX_NUM_VOXELS, torch.zeros(1, dtype=torch.int32))

    def _record_voxel_count(self, n_out: int) -> None:
        count = getattr(self, MAX_NUM_VOXELS, None)
        if count is not None:
            count.clamp_(min=n_out)

    def get_max_num_voxels(self):
        """The largest number of output sites seen (an int32 ``(1,)`` tensor), or None without
        ``record_voxel_count``."""
        return getattr(self, MAX_NUM_VOXELS, None)


class SparseSequential(SparseModule):
    def __init__(self, *args, **kwargs):
        super().__init__()
        if len(args) == 1 and isinstance(args[0], OrderedDict):
            for key, module in args[0].items():
                self.add_module(key, module)
        else:
            for i, module in enumerate(args):
                self.add_module(str(i), module)
        for key, module in kwargs.items():
            self.add_module(key, module)

    def __len__(self):
        return len(self._modules)

    def __getitem__(self, idx):
        return list(self._modules.values())[idx]

    def add(self, module, name=None):
        name = str(len(self._modules)) if name is None else name
        if name in self._modules:
            raise ValueError(f"SparseSequential already has a module named {name!r}")
        self.add_module(name, module)

    def forward(self, x):
        for module in self._modules.values():
            if isinstance(module, _TAKES_SPARSE_TENSORS):
                x = module(x)
            elif isinstance(x, SparseConvTensor):
                # On no sites, spconv skips every plain module, so an nn.Linear(2, 5) leaves 2 channels:
                # run them (torch's modules take 0 rows), except a training batch norm, which would
                # count the empty batch in its running statistics (it keeps the width anyway).
                if x.features.shape[0] or not _skip_when_empty(module):
                    x = x.replace_feature(module(x.features))
            else:
                x = module(x)
        return x


def _skip_when_empty(module: nn.Module) -> bool:
    """Whether ``SparseSequential`` leaves a plain module out on a tensor without sites."""
    return isinstance(module, nn.modules.batchnorm._NormBase) and module.training


class ToDense(SparseModule):
    """``x.dense()``: ``(B, C, *spatial)``."""

    def forward(self, x: SparseConvTensor):
        return x.dense()


class RemoveGrid(SparseModule):
    """spconv's: drops the tensor's pre-allocated ``grid`` buffer (pointconv allocates none)."""

    def forward(self, x: SparseConvTensor):
        if not isinstance(x, SparseConvTensor):
            raise TypeError(f"input must be a SparseConvTensor, got {type(x).__name__}")
        x.grid = None
        return x


class Identity(nn.Module):
    """spconv's ``Identity`` (from SparseConvNet): returns its input."""

    def forward(self, input):
        return input

    def input_spatial_size(self, out_size):
        return out_size


def _on_features(forward):
    """Apply a feature-wise module to a ``SparseConvTensor``'s features (none: unchanged) or a tensor."""
    def wrapped(self, input):
        if isinstance(input, SparseConvTensor):
            return input.replace_feature(forward(self, input.features)) if input.features.shape[0] else input
        return forward(self, input)
    wrapped.__doc__ = forward.__doc__
    return wrapped


class SparseBatchNorm(nn.BatchNorm1d):
    """``nn.BatchNorm1d`` over the active sites' features."""
    forward = _on_features(nn.BatchNorm1d.forward)


class SparseSyncBatchNorm(nn.SyncBatchNorm):
    """``nn.SyncBatchNorm`` over the active sites' features."""
    forward = _on_features(nn.SyncBatchNorm.forward)


class SparseReLU(nn.ReLU):
    """``nn.ReLU`` on the features."""
    forward = _on_features(nn.ReLU.forward)


class SparseIdentity(nn.Identity):
    """``nn.Identity`` on the features."""
    forward = _on_features(nn.Identity.forward)


# spconv's SparseSequential hands these the whole tensor, like any SparseModule
_TAKES_SPARSE_TENSORS = (SparseModule, SparseBatchNorm, SparseReLU)


def assign_name_for_sparse_modules(module: nn.Module) -> None:
    """spconv's: each ``SparseModule`` gets its qualified name as ``_sparse_unique_name``."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    for name, child in module.named_modules():
        if isinstance(child, SparseModule):
            child._sparse_unique_name = name


class ConvAlgo(enum.Enum):
    """spconv's algorithm choice, accepted as ``algo=`` and ignored: pointconv picks per device."""
    Native = 0
    MaskImplicitGemm = 1
    MaskSplitImplicitGemm = 2


class ConcatTable(SparseSequential):
    """Applies each child to the same input; returns the list of outputs."""

    def forward(self, x):
        return [module(x) for module in self._modules.values()]


def _same_sites(tensors):
    if not isinstance(tensors, (list, tuple)) or not tensors:
        raise ValueError("expected a non-empty list of SparseConvTensors (a ConcatTable's output)")
    first = tensors[0]
    for t in tensors[1:]:
        if t.indices.shape != first.indices.shape or not torch.equal(t.indices, first.indices):
            raise ValueError("the tensors must have the same sites in the same order (use functional.sparse_add "
                             "for different sites)")
    return first


class AddTable(SparseModule):
    """Sum of a list of SparseConvTensors with the same sites."""

    def forward(self, tensors):
        first = _same_sites(tensors)
        return first.replace_feature(sum(t.features for t in tensors))


class AddTableMisaligned(SparseModule):
    """Sum of a list of SparseConvTensors with possibly different sites: ``functional.sparse_add``
    (output sites sorted by batch, then coordinates)."""

    def forward(self, tensors):
        if not isinstance(tensors, (list, tuple)) or not tensors:
            raise ValueError("expected a non-empty list of SparseConvTensors (a ConcatTable's output)")
        return sparse_add(*tensors)


class JoinTable(SparseModule):
    """Channel concatenation of a list of SparseConvTensors with the same sites."""

    def forward(self, tensors):
        first = _same_sites(tensors)
        return first.replace_feature(torch.cat([t.features for t in tensors], 1))

"""spconv's module glue: ``SparseModule`` and ``SparseSequential``.

``SparseSequential`` runs sparse layers on the ``SparseConvTensor`` and any plain module
(``nn.BatchNorm1d``, ``nn.ReLU``, ...) on its features, as spconv does.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .tensor import SparseConvTensor


class SparseModule(nn.Module):
    """Base of the modules that take and return a ``SparseConvTensor``."""

    def __init__(self, name=None):
        super().__init__()
        self.name = name


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
        self.add_module(str(len(self._modules)) if name is None else name, module)

    def forward(self, x):
        for module in self._modules.values():
            if isinstance(module, SparseModule):
                x = module(x)
            elif isinstance(x, SparseConvTensor):
                if x.features.shape[0]:
                    x = x.replace_feature(module(x.features))
            else:
                x = module(x)
        return x


class ToDense(SparseModule):
    """``x.dense()``: ``(B, C, *spatial)``."""

    def forward(self, x: SparseConvTensor):
        return x.dense()


class SparseReLU(SparseModule):
    def __init__(self, inplace: bool = False):
        super().__init__()
        self.act = nn.ReLU(inplace=inplace)

    def forward(self, x: SparseConvTensor) -> SparseConvTensor:
        return x.replace_feature(self.act(x.features))


class SparseBatchNorm(SparseModule):
    """``nn.BatchNorm1d`` over the active sites' features."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True):
        super().__init__()
        self.bn = nn.BatchNorm1d(num_features, eps, momentum, affine, track_running_stats)

    def forward(self, x: SparseConvTensor) -> SparseConvTensor:
        return x.replace_feature(self.bn(x.features)) if x.features.shape[0] else x


class ConcatTable(SparseSequential):
    """Applies each child to the same input; returns the list of outputs."""

    def forward(self, x):
        return [module(x) for module in self._modules.values()]


def _same_sites(tensors):
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


class JoinTable(SparseModule):
    """Channel concatenation of a list of SparseConvTensors with the same sites."""

    def forward(self, tensors):
        first = _same_sites(tensors)
        return first.replace_feature(torch.cat([t.features for t in tensors], 1))

"""spconv's module glue: ``SparseModule`` and ``SparseSequential``.

``SparseSequential`` runs sparse layers on the ``SparseConvTensor`` and any plain module
(``nn.BatchNorm1d``, ``nn.ReLU``, ...) on its features, as spconv does.
"""
from __future__ import annotations

from collections import OrderedDict

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

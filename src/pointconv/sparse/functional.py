"""Functional sparse ops: ``sparse_add`` of tensors with different sites."""
from __future__ import annotations

import torch

from .._row_sums import add_rows
from .kernel_map import check_key_space, delinearize, linearize
from .tensor import SparseConvTensor


def sparse_add(*tensors: SparseConvTensor) -> SparseConvTensor:
    """Sum over the union of the tensors' sites (a site missing from a tensor adds zero).

    All tensors need the same spatial shape, batch size and channels, and no site twice in one
    tensor (ValueError; spconv would sum such rows). Output sites are sorted by (batch, coordinates). Differentiable w.r.t. every tensor's features.
    """
    if not tensors:
        raise ValueError("sparse_add needs at least one tensor")
    for i, t in enumerate(tensors):
        if not isinstance(t, SparseConvTensor):
            raise TypeError(f"sparse_add takes SparseConvTensors, argument {i} is a {type(t).__name__}")
    first = tensors[0]
    for t in tensors[1:]:
        if t.spatial_shape != first.spatial_shape or t.batch_size != first.batch_size:
            raise ValueError("sparse_add needs tensors with the same spatial_shape and batch_size")
        if t.features.shape[1] != first.features.shape[1]:
            raise ValueError("sparse_add needs tensors with the same number of channels")
    check_key_space(first.batch_size, first.spatial_shape)  # larger grids: keys would wrap and merge sites
    keys = [linearize(t.indices[:, 0], t.indices[:, 1:], t.spatial_shape) for t in tensors]
    uniq, inverse = torch.unique(torch.cat(keys), sorted=True, return_inverse=True)
    # a site twice in one tensor would be summed in silently (the layers reject such tensors too)
    source = torch.cat([torch.full_like(k, i) for i, k in enumerate(keys)])
    repeats = torch.bincount(inverse * len(tensors) + source, minlength=uniq.numel() * len(tensors)) > 1
    if bool(repeats.any()):
        which = int(torch.nonzero(repeats)[0, 0]) % len(tensors)
        raise ValueError(f"sparse_add: tensor {which} has duplicate sites (the same batch and coordinates twice)")
    feats = torch.cat([t.features for t in tensors])
    out = feats.new_zeros((uniq.shape[0], feats.shape[1]))
    out = add_rows(out, inverse, feats)
    indices = delinearize(uniq, first.spatial_shape) if uniq.numel() else first.indices[:0]
    return SparseConvTensor(out, indices, first.spatial_shape, first.batch_size, indice_dict=first.indice_dict)


# spconv's hash-based variant of the same sum (its outputs come in hash order, ours sorted)
sparse_add_hash_based = sparse_add

"""Neighbor lists as torch sparse matrices: ``adj @ features`` is the neighbor aggregation."""
from __future__ import annotations

import torch

from .. import _checks


class _FirstOrderEntries(torch.autograd.Function):
    """The identity on the matrix's entries, differentiable once. Torch's backward of a sparse
    matrix's values (``sparse_coo_tensor``, ``coalesce``) returns gradients cut from the graph: a
    second derivative through the weights' gradient came out wrong (``normalize="row"``) or
    missing, silently. Through this Function it raises instead. (Second derivatives through the
    features' gradient pass through the entries once, and stay exact.)"""

    @staticmethod
    def forward(ctx, values):
        ctx.save_for_backward(values)
        return values.clone()

    @staticmethod
    def backward(ctx, grad):
        if not torch.is_grad_enabled():  # (create_graph=False)
            return grad
        # the gradient, tied to the entries' graph (and so to the weights) by a node that raises
        # when a second derivative reaches it
        return _SecondDerivativeRaises.apply(grad, *ctx.saved_tensors)


class _SecondDerivativeRaises(torch.autograd.Function):
    @staticmethod
    def forward(ctx, grad, values):
        return grad.clone()

    @staticmethod
    def backward(ctx, _):
        raise RuntimeError("the gradient of adjacency()'s weights cannot be differentiated again: torch's "
                           "backward of sparse matrix values is first-order only (differentiate through the "
                           "features' gradient, or build the matrix densely)")


def adjacency(idx: torch.Tensor, num_points: int, *, weights: torch.Tensor | None = None, normalize: str | None = "row",
              dtype: torch.dtype | None = None):
    """A sparse COO matrix whose product with features aggregates neighbors.

    Args:
        idx: ``(Q, k)`` neighbor indices of one cloud (-1 = none), or ``(B, Q, k)`` for a batch.
        num_points: P, the number of columns per cloud.
        weights: optional ``(Q, k)`` / ``(B, Q, k)`` entry values (default 1); differentiable.
        normalize: ``"row"`` divides each row by its number of valid neighbors (the mean; with
            weights, by the sum of the row's weights; a row whose weights sum to 0 is all zeros,
            like a row without neighbors), ``None`` keeps the raw values.
        dtype: the entries' floating dtype, to match the features it multiplies (``torch.sparse.mm``
            takes one dtype): default the weights' dtype, or float32 without weights.

    Returns:
        ``(Q, P)``, or block-diagonal ``(B * Q, B * P)`` for a batch: row ``b * Q + q`` holds query q
        of cloud b. Repeated neighbors add up (as in the aggregation). Works with autograd to
        first order w.r.t. ``weights`` (a second derivative through the weights' gradient raises:
        torch's sparse backward is not differentiable), to any order through the features it
        multiplies.
    """
    _checks.tensor("idx", idx)
    _checks.index_tensor("idx", idx, idx.dim())
    if idx.dim() not in (2, 3):
        raise ValueError(f"idx must have shape (Q, k) or (B, Q, k), got {tuple(idx.shape)}")
    P = _checks.nonneg_int("num_points", num_points)
    rows_total = idx.shape[0] * idx.shape[1] if idx.dim() == 3 else idx.shape[0]
    cols_total = P * (idx.shape[0] if idx.dim() == 3 else 1)
    if rows_total * cols_total >= 1 << 63:  # torch counts a sparse matrix's elements in int64
        raise ValueError(f"num_points = {P} is too large: the ({rows_total}, {cols_total}) matrix must have "
                         f"fewer than 2^63 entries")
    if normalize not in ("row", None):
        raise ValueError(f"normalize must be 'row' or None, got {normalize!r}")
    batched = idx.dim() == 3
    idx3 = idx if batched else idx[None]
    B, Q, k = idx3.shape
    if idx3.numel() and (int(idx3.min()) < -1 or int(idx3.max()) >= P):
        raise ValueError(f"idx must lie in [-1, {P - 1}] (num_points = {P})")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if weights is None:
        w = torch.ones(idx3.shape, dtype=dtype or torch.float32, device=idx.device)
    else:
        _checks.tensor("weights", weights)
        if weights.shape != idx.shape:
            raise ValueError(f"weights must have the shape of idx {tuple(idx.shape)}, got {tuple(weights.shape)}")
        if not weights.is_floating_point():
            raise TypeError(f"weights must be a floating-point tensor, got dtype {weights.dtype}")
        w = (weights if batched else weights[None]).to(dtype or weights.dtype)
    valid = idx3 >= 0
    w = torch.where(valid, w, torch.zeros_like(w))
    if normalize == "row":
        # rows without neighbors, or whose weights cancel, stay zeros instead of 0/0 or x/0
        total = w.sum(-1, keepdim=True)
        nonzero = total != 0
        w = torch.where(nonzero, w / torch.where(nonzero, total, torch.ones_like(total)), torch.zeros_like(w))
    rows = (torch.arange(B, device=idx.device)[:, None, None] * Q + torch.arange(Q, device=idx.device)[None, :, None])
    cols = idx3.long() + (torch.arange(B, device=idx.device) * P)[:, None, None]
    keep = valid.reshape(-1)
    indices = torch.stack([rows.expand_as(idx3).reshape(-1)[keep], cols.reshape(-1)[keep]])
    # checked (cheap next to the coalesce), and said through torch's switch as well: torch 2.11
    # warns about unchecked tensors while the switch was never set, whatever the argument says
    values = w.reshape(-1)[keep]
    if values.requires_grad:
        values = _FirstOrderEntries.apply(values)
    with torch.sparse.check_sparse_tensor_invariants(enable=True):
        adj = torch.sparse_coo_tensor(indices, values, (B * Q, B * P) if batched else (Q, P), check_invariants=True)
    return adj.coalesce()

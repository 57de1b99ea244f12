"""Validation and output assembly shared by knn, ball_query and NeighborIndex."""
from __future__ import annotations

from typing import NamedTuple

import torch

from .. import _checks
from .._func_transforms import has_tangent
from ._distance import sq_dist


class KNN(NamedTuple):
    """Result of a neighbor search.

    dists: ``(B, Q, k)`` SQUARED Euclidean distances, ascending (ties by lower index); ``inf`` in
        slots with no neighbor. Differentiable w.r.t. the query and point coordinates.
    idx: ``(B, Q, k)`` int64 indices into the points' second dimension; ``-1`` where no neighbor.
    """

    dists: torch.Tensor
    idx: torch.Tensor


def check_magnitude(name: str, x: torch.Tensor, largest: float | None = None) -> None:
    """Squared distances between coordinates of ``x`` must be finite in its dtype: an overflow to
    ``inf`` would read as a missing neighbor (float32: |x| up to about 5e18 in 3-D). ``largest``:
    ``max |x|`` if the caller has read it already."""
    limit = (torch.finfo(x.dtype).max / (4 * max(x.shape[-1], 1))) ** 0.5
    if largest is None and x.numel():
        largest = float(x.detach().abs().amax())
    if x.numel() and largest > limit:
        advice = "rescale the coordinates" if x.dtype == torch.float64 else "use float64 or rescale the coordinates"
        raise ValueError(f"{name} has coordinates beyond {limit:.3g} in magnitude: their squared distances "
                         f"overflow {x.dtype} ({advice})")


def check_query(query, points, *, query_lengths, exclude_self):
    """Validate ``query`` against already-validated ``points``; return int64 query lengths."""
    _checks.tensor("query", query)
    _checks.same_device(points=points, query=query)
    _check_coords("query", query)
    _checks.flag("exclude_self", exclude_self)
    _checks.same_dtype(points=points, query=query)
    if query.shape[0] != points.shape[0]:
        raise ValueError(f"query has batch size {query.shape[0]} but points has {points.shape[0]}")
    if query.shape[2] != points.shape[2]:
        raise ValueError(f"query has D = {query.shape[2]} but points has D = {points.shape[2]}")
    if exclude_self and query.shape[1] != points.shape[1]:
        raise ValueError("exclude_self=True needs query and points to be the same cloud, got "
                         f"{query.shape[1]} queries and {points.shape[1]} points per cloud")
    return _checks.lengths("query_lengths", query_lengths, query.shape[0], query.shape[1], query.device)


def _check_coords(name: str, x) -> None:
    """``(B, N, D)`` float coordinates, finite and within ``check_magnitude``'s range: one read of
    ``max |x|`` for both (each read waits for a CUDA device)."""
    _checks.coords(name, x, ndim=3, finite=False)
    largest = float(_checks.max_abs(x.detach()))
    _checks.finite_coords(name, largest)
    check_magnitude(name, x, largest)


def check_points(points, points_lengths, name="points", lengths_name="points_lengths"):
    _check_coords(name, points)
    return _checks.lengths(lengths_name, points_lengths, points.shape[0], points.shape[1], points.device)


def differentiable_dists(dists, idx, query, points):
    """Recompute the selected squared distances with autograd when coordinates need gradients
    (recorded for backward, or carrying a forward-mode tangent of ``torch.autograd.forward_ad``).

    Same formula as the search, so the values are unchanged; missing neighbors stay ``inf``.
    """
    backward = torch.is_grad_enabled() and (query.requires_grad or points.requires_grad)
    if not (backward or has_tangent(query) or has_tangent(points)):
        return dists
    from .gather import gather

    nbr = gather(points, idx)
    d = sq_dist(query[:, :, None, :], nbr)
    return torch.where(idx >= 0, d, torch.full_like(d, float("inf")))



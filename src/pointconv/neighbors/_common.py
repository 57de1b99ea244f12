"""Validation and output assembly shared by knn, ball_query and NeighborIndex."""
from __future__ import annotations

from typing import NamedTuple

import torch

from .. import _checks
from .. import _device_transfers as transfers
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
    query_lengths = _check_query_shape(query, points, exclude_self, query_lengths)
    return _read_values([("query", query, "query_lengths", query_lengths)])[0]


def check_search(query, points, *, query_lengths, points_lengths, exclude_self):
    """Validate a search's ``points`` and ``query``; ``(query_lengths, points_lengths)`` as int64.
    Their shapes first, then all their values in one read of the device (a self-search, ``query
    is points``, reads the coordinates' range once)."""
    points_lengths = _check_cloud_shape("points", points, "points_lengths", points_lengths)
    query_lengths = _check_query_shape(query, points, exclude_self, query_lengths)
    points_lengths, query_lengths = _read_values([("points", points, "points_lengths", points_lengths),
                                                  ("query", query, "query_lengths", query_lengths)])
    return query_lengths, points_lengths


def check_points(points, points_lengths, name="points", lengths_name="points_lengths", distances=True):
    """Validate ``(B, N, D)`` coordinates and their lengths; return int64 lengths. ``distances``:
    the caller takes squared distances of the coordinates (``check_magnitude``)."""
    points_lengths = _check_cloud_shape(name, points, lengths_name, points_lengths)
    return _read_values([(name, points, lengths_name, points_lengths)], distances)[0]


def _check_cloud_shape(name, x, lengths_name, lens):
    """The checks of coordinates and lengths that read nothing from the device: the lengths
    tensor (or None)."""
    _checks.coords(name, x, ndim=3, finite=False)
    return None if lens is None else _checks.lengths_tensor(lengths_name, lens, x.shape[0], x.device)


def _check_query_shape(query, points, exclude_self, query_lengths):
    """``_check_cloud_shape`` of the query, and its agreement with ``points``."""
    _checks.tensor("query", query)
    _checks.same_device(points=points, query=query)
    _checks.coords("query", query, ndim=3, finite=False)
    _checks.flag("exclude_self", exclude_self)
    _checks.same_dtype(points=points, query=query)
    if query.shape[0] != points.shape[0]:
        raise ValueError(f"query has batch size {query.shape[0]} but points has {points.shape[0]}")
    if query.shape[2] != points.shape[2]:
        raise ValueError(f"query has D = {query.shape[2]} but points has D = {points.shape[2]}")
    if exclude_self and query.shape[1] != points.shape[1]:
        raise ValueError("exclude_self=True needs query and points to be the same cloud, got "
                         f"{query.shape[1]} queries and {points.shape[1]} points per cloud")
    return None if query_lengths is None else _checks.lengths_tensor("query_lengths", query_lengths,
                                                                     query.shape[0], query.device)


def _read_values(clouds, distances=True) -> list[torch.Tensor]:
    """``clouds``: ``(name, x, lengths_name, lengths or None)`` whose shapes are checked. Checks
    that the coordinates are finite and (``distances``) within ``check_magnitude``'s range and the
    lengths within [0, N], reading all of these values in one transfer (each read waits for a CUDA
    device); returns the int64 lengths of each cloud, in order."""
    values, slots = [], {}
    for _, x, _, lens in clouds:
        if id(x) not in slots:
            slots[id(x)] = len(values)
            values.append(_checks.max_abs(x.detach()))
        if lens is not None and lens.numel():
            values.append(_checks.lengths_out_of_range(lens, x.shape[1]))
    read = iter(transfers.host_floats(torch.stack(values)))
    read_of = {}
    out = []
    for name, x, lengths_name, lens in clouds:
        if id(x) not in read_of:
            read_of[id(x)] = next(read)
        _checks.finite_coords(name, read_of[id(x)])
        if distances:
            check_magnitude(name, x, read_of[id(x)])
        B, N = x.shape[:2]
        if lens is None:
            out.append(torch.full((B,), N, dtype=torch.int64, device=x.device))
            continue
        if lens.numel() and next(read):
            _checks.raise_lengths_range(lengths_name, lens, N)
        out.append(lens.to(torch.int64))
    return out


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



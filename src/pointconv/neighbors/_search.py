"""One exact search engine behind knn, ball_query, their packed forms and NeighborIndex.

It validates nothing (the public functions do) and picks the implementation per call:
reference (dense), triton (CUDA float32, or forced under TRITON_INTERPRET=1), or torch
(cKDTree on CPU for D <= 8, chunked brute force otherwise).
"""
from __future__ import annotations

import torch

from .._backend import backend_for
from ._cpu import KDTREE_MAX_DIM, brute_force_search, build_tree, kdtree_search
from ._reference import search_reference


def _use_triton(backend: str, dtype: torch.dtype) -> bool:
    # The kernels pack float32 distance bits into int64 keys; float64 goes to the torch path.
    return backend == "triton" and dtype == torch.float32


def build_structures(points: torch.Tensor, lengths: torch.Tensor, k_hint: int = 16):
    """What a NeighborIndex keeps for the current backend: kd-trees, a Triton grid, or nothing."""
    backend = backend_for(points.device)
    D = points.shape[-1]
    if _use_triton(backend, points.dtype) and D == 3:
        from ..kernels.knn import Grid

        return ("grid", Grid(points.detach(), lengths, k_hint=k_hint))
    if backend == "torch" and points.device.type == "cpu" and D <= KDTREE_MAX_DIM:
        trees = [build_tree(points[b, : int(n)]) if int(n) else None for b, n in enumerate(lengths.tolist())]
        return ("trees", trees)
    return (None, None)


@torch.no_grad()
def search(query, points, k, *, radius2, query_lengths, points_lengths, exclude_self, structures=None):
    """Exact neighbors: squared distances ``(B, Q, k)`` ascending (ties by index) and int64 indices."""
    backend = backend_for(query.device)
    query, points = query.detach(), points.detach()
    if backend == "reference":
        return search_reference(query, points, k, radius2=radius2, query_lengths=query_lengths,
                                points_lengths=points_lengths, exclude_self=exclude_self)
    kind, data = structures if structures is not None else (None, None)
    if _use_triton(backend, query.dtype):
        from ..kernels import knn as kernels

        grid = data if kind == "grid" else None
        return kernels.search(query, points, k, radius2, query_lengths, points_lengths, exclude_self, grid)
    B, Q, D = query.shape
    dists = torch.full((B, Q, k), float("inf"), dtype=query.dtype, device=query.device)
    idx = torch.full((B, Q, k), -1, dtype=torch.int64, device=query.device)
    use_tree = query.device.type == "cpu" and D <= KDTREE_MAX_DIM
    for b, (nq, n) in enumerate(zip(query_lengths.tolist(), points_lengths.tolist())):
        if nq == 0 or n == 0:
            continue
        q, p = query[b, :nq], points[b, :n]
        if use_tree:
            tree = data[b] if kind == "trees" else build_tree(p)
            d, i = kdtree_search(q, p, tree, k, radius2, exclude_self)
        else:
            d, i = brute_force_search(q, p, k, radius2, exclude_self)
        dists[b, :nq], idx[b, :nq] = d, i
    return dists, idx

"""One exact search engine behind knn, ball_query, their packed forms and NeighborIndex.

It validates nothing (the public functions do) and picks the implementation per call:
reference (dense), triton (CUDA float32, or forced under TRITON_INTERPRET=1), or torch
(cKDTree on CPU for D <= 8, small clouds of a batch sharing one tree (``_trees``); the GEMM-ranked brute
force otherwise).
"""
from __future__ import annotations

import torch

from .. import _checks
from .._backend import TRITON_MAX_K, backend_for
from .._func_transforms import outside_func_transforms
from ._brute_force import brute_force_search
from ._cpu import KDTREE_MAX_DIM, kdtree_search
from ._trees import CloudTrees, extent_of
from ._reference import search_reference


def _use_triton(backend: str, dtype: torch.dtype, k: int = 1) -> bool:
    # The kernels pack float32 distance bits into int64 keys; float64 goes to the torch path, and
    # so does a k past the kernels' register top-k (TRITON_MAX_K).
    return backend == "triton" and dtype == torch.float32 and k <= TRITON_MAX_K


@outside_func_transforms  # (kd-trees and grids read values)
def build_structures(points: torch.Tensor, lengths: torch.Tensor, k_hint: int = 16):
    """What a NeighborIndex keeps for the current backend: kd-trees, a Triton grid, or nothing."""
    backend = backend_for(points.device)
    D = points.shape[-1]
    if _use_triton(backend, points.dtype) and D == 3 and points.shape[1]:  # (no grid of no points)
        from ..kernels.knn import Grid

        return ("grid", Grid(points.detach(), lengths, k_hint=k_hint))
    if backend == "torch" and points.device.type == "cpu" and D <= KDTREE_MAX_DIM:
        return ("trees", CloudTrees(points.detach(), lengths.tolist()))
    return (None, None)


@torch.no_grad()
@outside_func_transforms  # (a search reads values; the callers recompute the distances differentiably)
def search(query, points, k, *, radius2, query_lengths, points_lengths, exclude_self, structures=None):
    """Exact neighbors: squared distances ``(B, Q, k)`` ascending (ties by index) and int64 indices."""
    _checks.output_size("k", query.shape[0], query.shape[1], k)
    backend = backend_for(query.device)
    query, points = query.detach(), points.detach()
    if backend == "reference":
        return search_reference(query, points, k, radius2=radius2, query_lengths=query_lengths,
                                points_lengths=points_lengths, exclude_self=exclude_self)
    kind, data = structures if structures is not None else (None, None)
    if _use_triton(backend, query.dtype, k):
        from ..kernels import knn as kernels

        grid = data if kind == "grid" else None
        return kernels.search(query, points, k, radius2, query_lengths, points_lengths, exclude_self, grid)
    B, Q, D = query.shape
    dists = torch.full((B, Q, k), float("inf"), dtype=query.dtype, device=query.device)
    idx = torch.full((B, Q, k), -1, dtype=torch.int64, device=query.device)
    q_lengths, p_lengths = query_lengths.tolist(), points_lengths.tolist()
    clouds = [b for b in range(B) if q_lengths[b] and p_lengths[b]]
    if not (query.device.type == "cpu" and D <= KDTREE_MAX_DIM):
        for b in clouds:
            nq, n = q_lengths[b], p_lengths[b]
            dists[b, :nq], idx[b, :nq] = brute_force_search(query[b, :nq], points[b, :n], k, radius2, exclude_self)
        return dists, idx
    if kind == "trees":
        trees = data
    else:  # sized for these queries: the lifted tree answers them all
        trees = CloudTrees(points, p_lengths, extent=max(extent_of(points), extent_of(query)))
    shared = set(trees.lifted) if trees.covers(query) else set()
    lifted = [b for b in clouds if b in shared]
    for b in clouds:
        if b not in shared:
            nq, n = q_lengths[b], p_lengths[b]
            dists[b, :nq], idx[b, :nq] = kdtree_search(query[b, :nq], points[b, :n], trees.own_tree(b), k, radius2,
                                                       exclude_self)
    if lifted:
        _search_lifted(query, points, trees, lifted, q_lengths, k, radius2, exclude_self, dists, idx)
    return dists, idx


def _search_lifted(query, points, trees, clouds, q_lengths, k, radius2, exclude_self, dists, idx):
    """The queries of ``clouds`` against the lifted tree, written into ``dists`` / ``idx``."""
    position = {b: i for i, b in enumerate(trees.lifted)}
    sizes = torch.tensor([q_lengths[b] for b in clouds])
    cloud = torch.repeat_interleave(torch.tensor([position[b] for b in clouds]), sizes)
    local = torch.arange(int(sizes.sum())) - torch.repeat_interleave(torch.cumsum(sizes, 0) - sizes, sizes)
    first_point = trees.starts[cloud]
    same_cloud = (query.data_ptr() == points.data_ptr() and query.shape == points.shape
                  and query.stride() == points.stride() and clouds == trees.lifted
                  and all(q_lengths[b] == trees.lengths[b] for b in clouds))
    # a self-search passes the tree's own points (their leaf order is free, see kdtree_search)
    q = trees.cat if same_cloud else torch.cat([query[b, :q_lengths[b]] for b in clouds])
    d, i = kdtree_search(q, trees.cat, trees.tree, k, radius2, exclude_self, row_ids=first_point + local,
                         lift=trees.lifted_queries(cloud))
    i = torch.where(i >= 0, i - first_point[:, None], i)
    batch = torch.repeat_interleave(torch.tensor(clouds), sizes)
    dists[batch, local], idx[batch, local] = d, i

"""pointconv: point-cloud convolution for PyTorch, on CPU and GPU, with no compile step."""
from __future__ import annotations

__version__ = "0.1.0"

from . import nn
from ._backend import use_backend
from .conv import adjacency, aggregate, devoxelize, pointwise_conv, voxelize
from .gaussian import knn_aggregate_aniso, knn_aggregate_iso
from .neighbors import (
    KNN,
    NeighborIndex,
    ball_query,
    ball_query_packed,
    farthest_point_sample,
    gather,
    grid_subsample,
    knn,
    knn_packed,
)

__all__ = [
    "__version__",
    "use_backend",
    "KNN",
    "NeighborIndex",
    "ball_query",
    "ball_query_packed",
    "farthest_point_sample",
    "gather",
    "grid_subsample",
    "knn",
    "knn_packed",
    "knn_aggregate_aniso",
    "knn_aggregate_iso",
    "adjacency",
    "aggregate",
    "pointwise_conv",
    "voxelize",
    "devoxelize",
    "nn",
]

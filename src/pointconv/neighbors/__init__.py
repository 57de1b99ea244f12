"""Neighbor search on padded and packed clouds: kNN, ball query, a reusable index, sampling, gather."""
from ._common import KNN
from .ball_query import ball_query, ball_query_reference
from .gather import gather, gather_reference
from .index import NeighborIndex
from .knn import knn, knn_reference
from .packed import ball_query_packed, knn_packed, packed_to_padded
from .sampling import GridSubsample, farthest_point_sample, grid_subsample, grid_subsample_reference

__all__ = [
    "KNN", "NeighborIndex", "ball_query", "ball_query_packed", "ball_query_reference",
    "farthest_point_sample", "gather", "gather_reference", "grid_subsample",
    "grid_subsample_reference", "GridSubsample", "knn", "knn_packed", "knn_reference",
    "packed_to_padded",
]

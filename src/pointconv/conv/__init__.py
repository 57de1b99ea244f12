"""Point convolutions: neighbor aggregation, sparse adjacency, Pointwise convolution, point-voxel glue."""
from .adjacency import adjacency
from .aggregate import aggregate, aggregate_reference
from .pointwise import PointwiseNeighbors, pointwise_conv, pointwise_conv_reference, pointwise_neighbors
from .voxel import devoxelize, voxelize

__all__ = ["adjacency", "aggregate", "aggregate_reference", "PointwiseNeighbors", "pointwise_conv",
           "pointwise_conv_reference", "pointwise_neighbors", "voxelize", "devoxelize"]

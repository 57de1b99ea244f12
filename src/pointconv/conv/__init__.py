"""Point convolutions: neighbor aggregation, sparse adjacency, Pointwise convolution."""
from .adjacency import adjacency
from .aggregate import aggregate, aggregate_reference
from .pointwise import PointwiseNeighbors, pointwise_conv, pointwise_conv_reference, pointwise_neighbors

__all__ = ["adjacency", "aggregate", "aggregate_reference", "PointwiseNeighbors", "pointwise_conv",
           "pointwise_conv_reference", "pointwise_neighbors"]

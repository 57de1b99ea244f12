"""Point convolutions: neighbor aggregation, sparse adjacency (Pointwise convolution: next)."""
from .adjacency import adjacency
from .aggregate import aggregate, aggregate_reference

__all__ = ["adjacency", "aggregate", "aggregate_reference"]

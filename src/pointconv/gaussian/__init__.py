"""Anisotropic / isotropic Gaussian kNN aggregation, differentiable to any order."""
from ._reference import knn_aggregate_aniso_reference, knn_aggregate_iso_reference
from .aggregate import knn_aggregate_aniso, knn_aggregate_iso

__all__ = ["knn_aggregate_aniso", "knn_aggregate_iso", "knn_aggregate_aniso_reference",
           "knn_aggregate_iso_reference"]

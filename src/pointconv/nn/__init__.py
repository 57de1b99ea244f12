"""Point-convolution modules on padded clouds ``(B, N, 3)`` with optional ``lengths (B,)``."""
from .layers import EdgeConv, KNNConv, PointwiseConv3d, RadiusConv

__all__ = ["EdgeConv", "KNNConv", "PointwiseConv3d", "RadiusConv"]

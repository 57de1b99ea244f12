"""Point-convolution modules on padded clouds ``(B, N, 3)`` with optional ``lengths (B,)``."""
from .layers import EdgeConv, KNNConv, PointwiseConv3d, RadiusConv
from .models import PointwiseCNN

__all__ = ["EdgeConv", "KNNConv", "PointwiseCNN", "PointwiseConv3d", "RadiusConv"]

"""spconv's ``spconv.pytorch.identity`` path: ``Identity``, for ported code that imports it from there."""
from .modules import Identity

__all__ = ["Identity"]

"""Depth schemes; importing this package registers every variant."""
from rlformer.depth.base import Depth

__all__ = ["Depth"]

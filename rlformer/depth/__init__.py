"""Depth schemes; importing this package registers every variant."""
from rlformer.depth import early_exit, universal  # noqa: F401  (fixed is in base)
from rlformer.depth.base import Depth

__all__ = ["Depth"]

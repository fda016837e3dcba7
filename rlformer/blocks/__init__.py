"""Residual block types; importing this package registers every variant."""
from rlformer.blocks import gtrxl, residual, reversible  # noqa: F401
from rlformer.blocks.base import Block, FeedForward

__all__ = ["Block", "FeedForward"]

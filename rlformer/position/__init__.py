"""Positional encodings; importing this package registers every variant."""
from rlformer.position import absolute, bias, relative, rotary  # noqa: F401
from rlformer.position.base import Position

__all__ = ["Position"]

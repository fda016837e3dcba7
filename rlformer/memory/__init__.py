"""Memories across segments; importing this package registers every variant."""
from rlformer.memory import compressive, knn, xl  # noqa: F401
from rlformer.memory.base import Memory

__all__ = ["Memory"]

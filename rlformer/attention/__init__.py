"""Attention mechanisms; importing this package registers every variant."""
from rlformer.attention import adaptive_span  # noqa: F401
from rlformer.attention import full  # noqa: F401
from rlformer.attention import global_local, local, sparse  # noqa: F401
from rlformer.attention import linformer  # noqa: F401
from rlformer.attention import lsh  # noqa: F401
from rlformer.attention import random_features  # noqa: F401
from rlformer.attention import routing  # noqa: F401
from rlformer.attention.base import Attention

__all__ = ["Attention"]

"""Measurements of what a module costs, used by the tests and benchmarks."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn


def saved_activation_bytes(forward: Callable[[], Tensor], exclude: Optional[nn.Module] = None) -> int:
    """Bytes autograd saves for backward while ``forward()`` runs: a step's activation memory.

    Tensors sharing storage with ``exclude``'s parameters are not counted. Afterwards the output's
    sum is back-propagated, so the graph is consumed and gradients are there to inspect.
    """
    params = set() if exclude is None else {p.data_ptr() for p in exclude.parameters()}
    total = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal total
        if t.data_ptr() not in params:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    out.sum().backward()
    return total

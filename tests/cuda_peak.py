"""Peak CUDA memory of one step, for the tests that compare memory (CUDA only)."""
from __future__ import annotations

from collections.abc import Callable

import torch


def step_peak_bytes(step: Callable[[], None]) -> int:
    """Peak bytes allocated while ``step()`` runs, above what was allocated before it, after a first call (which
    compiles and warms the allocator)."""
    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base

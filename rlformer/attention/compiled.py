"""Fused (torch.compile / Inductor) versions of the tensor-only pieces of the fast paths, for CUDA tensors.

Some fast paths are long chains of small elementwise ops, casts and batched matmuls with no autograd inside
(the chunk form of random-feature attention and its hand-written backward, the tables of the bucket-sorted
order): eagerly every op is a kernel launch and a round trip through memory. ``fused(fn, x)`` returns ``fn``
compiled once with static shapes and the whole function as one graph (so Inductor fuses the elementwise chains
into few kernels and calls cuBLAS for the matmuls) when ``x`` is a CUDA tensor, and ``fn`` itself otherwise
(CPU: tests and CI run the very same Python function eagerly; the GPU tests compare both). Set the environment
variable ``RLFORMER_FUSED=0`` to run everything eagerly (debugging, or to measure what fusion buys).

The compiled functions must be pure tensor code whose non-tensor arguments are hashable constants (ints,
floats, dtypes, classes): Dynamo specializes on them, so each distinct constant set is one compile, shared by
every layer with the same shapes.
"""
from __future__ import annotations

import os
from typing import Callable

import torch
from torch import Tensor

from rlformer.attention.flex import raise_recompile_limit

_FUSED: dict = {}


def fusion_enabled() -> bool:
    """False when ``RLFORMER_FUSED=0`` is set (everything then runs eagerly)."""
    return os.environ.get("RLFORMER_FUSED", "1") != "0"


def fused(fn: Callable, x: Tensor) -> Callable:
    """``fn`` compiled (Inductor, ``dynamic=False``, ``fullgraph=True``) when ``x`` is on CUDA and fusion is
    enabled; ``fn`` otherwise, and inside an outer ``torch.compile`` (which traces ``fn`` itself)."""
    if not x.is_cuda or not fusion_enabled() or torch.compiler.is_compiling():
        return fn
    out = _FUSED.get(fn)
    if out is None:
        raise_recompile_limit()
        out = _FUSED[fn] = torch.compile(fn, dynamic=False, fullgraph=True)
    return out

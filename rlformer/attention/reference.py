"""Naive, obviously-correct attention that the fast paths are tested against.

Dense scores, explicit masks, float math in the input dtype, no fused kernels.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from rlformer.position.base import Position


def dense_attention(q: Tensor, k: Tensor, v: Tensor, allowed: Optional[Tensor], scale: float,
                    position: Optional[Position] = None, q_index: Optional[Tensor] = None,
                    k_index: Optional[Tensor] = None, dropout: float = 0.0,
                    training: bool = False) -> Tensor:
    """softmax(scale * q k^T [+ position hooks], masked) v  — q: (B, H, Tq, dh), k/v: (B, H, Tk, dh).

    ``allowed``: bool, broadcastable to (B, H, Tq, Tk); every row must allow at least one key.
    """
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
    if position is not None and position.hooks & {"score"}:
        scores = position.score(scores, q, k, q_index, k_index, scale)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1).to(q.dtype)
    if dropout > 0 and training:
        probs = torch.nn.functional.dropout(probs, dropout)
    out = probs @ v
    if position is not None and "value" in position.hooks:
        out = out + position.value(probs, q_index, k_index)
    return out


def causal_mask(tq: int, tk: int, device=None) -> Tensor:
    """(Tq, Tk) bool: query i (at key index tk - tq + i) sees keys up to itself."""
    qi = torch.arange(tq, device=device)[:, None] + (tk - tq)
    return torch.arange(tk, device=device)[None, :] <= qi

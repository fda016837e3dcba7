"""What a layer's attention may need besides q, k, v: masks, positions, its state, aux sinks."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor


@dataclass
class AuxCollector:
    """Collects a forward pass's extra training losses and diagnostics."""

    losses: list = field(default_factory=list)
    info: dict = field(default_factory=dict)

    def add(self, loss: Tensor) -> None:
        self.losses.append(loss)

    def total(self, like: Tensor) -> Tensor:
        if not self.losses:
            return torch.zeros((), dtype=torch.float32, device=like.device)
        return torch.stack([loss.float().reshape(()) for loss in self.losses]).sum()


@dataclass
class AttentionContext:
    """Per-layer call context.

    Keys are the concatenation [memory; current segment]; ``q_index`` / ``k_index`` give each
    query's / key's index in that sequence, so relative distances are ``q_index[i] - k_index[j]``
    and query i is at key index M + i when M memory slots precede it.
    """

    causal: bool
    q_index: Tensor
    """(Tq,) long: index of each query in the key sequence"""
    k_index: Tensor
    """(Tk,) long"""
    q_pos: Tensor
    """(B, Tq) long: absolute positions of the queries (tokens since the row's reset)"""
    key_valid: Optional[Tensor] = None
    """(B, Tk) bool: False for empty memory slots and padding; None = all valid"""
    state: dict = field(default_factory=dict)
    """this layer's attention state from the previous segment ({} when fresh)"""
    aux: AuxCollector = field(default_factory=AuxCollector)
    layer: int = 0
    training: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    """variant-specific inputs (e.g. a (H, W) grid for local2d)"""

    @property
    def n_mem(self) -> int:
        return self.k_index.shape[0] - self.q_index.shape[0]

    def allowed(self) -> Optional[Tensor]:
        """Dense (B|1, 1, Tq, Tk) bool mask of allowed (query, key) pairs, or None when all are.

        Causal: key index <= query index. Invalid keys are excluded, except that a query may
        always see its own key, so no row is ever empty (a padded query attends to itself).
        """
        mask = None
        if self.causal:
            mask = (self.k_index[None, :] <= self.q_index[:, None])[None, None]
        if self.key_valid is not None:
            kv = self.key_valid[:, None, None, :]
            mask = kv if mask is None else mask & kv
            own = (self.k_index[None, :] == self.q_index[:, None])[None, None]
            mask = mask | own
        return mask

    def is_plain_causal(self) -> bool:
        """True when the mask is exactly lower-triangular over a square score matrix."""
        return self.causal and self.key_valid is None and self.n_mem == 0

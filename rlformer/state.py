"""The state an encoder carries from one segment to the next.

``EncoderState`` holds, per batch row, how many tokens the row has seen since its last reset
(so absolute positions keep counting across segments) and one dict of tensors per state slot
(a layer, or a depth step for recurrent-depth variants). Every tensor in a slot has the batch
as its first dimension, and the fresh state of a row is all zeros / False: that single rule lets
``reset`` clear exactly the named rows for any memory or recurrent attention, and lets agents
index, stack and store states without knowing what is inside.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor


def map_tensors(fn: Callable[[Tensor], Tensor], obj: Any) -> Any:
    """Apply ``fn`` to every tensor in nested dicts / lists / tuples."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: map_tensors(fn, v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(fn, v) for v in obj)
    return obj


def zero_rows(t: Tensor, rows: Tensor) -> Tensor:
    """``t`` with the batch rows where ``rows`` is True set to zero (False for bool tensors)."""
    mask = rows.reshape(-1, *([1] * (t.dim() - 1)))
    return torch.where(mask, torch.zeros((), dtype=t.dtype, device=t.device), t)


@dataclass
class EncoderState:
    """Per-row position counter plus one dict of batch-first tensors per state slot."""

    offset: Tensor
    """(batch,) long: tokens seen since the row's last reset"""
    slots: list = field(default_factory=list)
    """one dict per state slot (layer or depth step); empty dict = nothing kept yet"""

    @classmethod
    def fresh(cls, batch: int, n_slots: int, device: torch.device | str) -> "EncoderState":
        return cls(torch.zeros(batch, dtype=torch.long, device=device), [{} for _ in range(n_slots)])

    @property
    def batch_size(self) -> int:
        return self.offset.shape[0]

    def reset(self, rows: Tensor) -> "EncoderState":
        """A new state where the rows marked True start from empty memory and position 0."""
        rows = rows.to(device=self.offset.device, dtype=torch.bool).reshape(-1)
        if rows.shape[0] != self.batch_size:
            raise ValueError(
                f"reset has {rows.shape[0]} rows but the state holds {self.batch_size}; pass one bool per batch row"
            )
        return EncoderState(zero_rows(self.offset, rows), map_tensors(lambda t: zero_rows(t, rows), self.slots))

    def detach(self) -> "EncoderState":
        return EncoderState(self.offset, map_tensors(lambda t: t.detach(), self.slots))

    def index(self, idx: Tensor | slice) -> "EncoderState":
        """The state of a subset of rows (e.g. a minibatch of environments)."""
        return EncoderState(self.offset[idx], map_tensors(lambda t: t[idx], self.slots))

    def to(self, device: torch.device | str) -> "EncoderState":
        return EncoderState(self.offset.to(device), map_tensors(lambda t: t.to(device), self.slots))

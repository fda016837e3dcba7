"""Rotary position embedding, RoPE (Su et al. 2021, eq. 34).

q_m and k_n are rotated by angles m*theta_i and n*theta_i, theta_i = base^(-2i/d), so
q_m . k_n depends only on m - n. We rotate by indices in the [memory; segment] key sequence,
which gives the same scores as absolute positions.
"""
from __future__ import annotations

import torch
from torch import Tensor

from rlformer.config import EncoderConfig
from rlformer.position.base import Position
from rlformer.registry import register


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


@register("position", "rope")
class RotaryPosition(Position):
    """RoPE (Su et al. 2021): rotate q and k pairwise by position-dependent angles."""

    hooks = frozenset({"rotary"})

    def __init__(self, cfg: EncoderConfig):
        super().__init__(cfg)
        inv_freq = cfg.rope_base ** (-torch.arange(0, self.d_head, 2, dtype=torch.float32) / self.d_head)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @classmethod
    def validate(cls, cfg: EncoderConfig) -> None:
        if cfg.d_head % 2:
            raise ValueError(f"position='rope' rotates pairs of features, so d_model / n_heads must be even; "
                             f"got d_head={cfg.d_head} (d_model={cfg.d_model}, n_heads={cfg.n_heads})")
        if not cfg.rope_base > 0:
            raise ValueError(f"position='rope' needs rope_base > 0 (theta_i = base^(-2i/d)); got {cfg.rope_base}. "
                             f"The usual value is 10000.")

    def _rot(self, x: Tensor, index: Tensor) -> Tensor:
        angles = index.to(torch.float32)[:, None] * self.inv_freq[None, :]
        angles = torch.cat([angles, angles], dim=-1)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        return x * cos + rotate_half(x) * sin

    def rotate(self, q, k, q_index, k_index):
        return self._rot(q, q_index), self._rot(k, k_index)

    def rotate_one(self, x, index):
        return self._rot(x, index)

"""Positional encodings act through hooks that attention calls.

hooks:
- ``"input"``: added to the token embeddings once, at absolute positions (``embed_input``)
- ``"rotary"``: rotates queries and keys (``rotate``)
- ``"score"``: changes the pre-softmax scores (``score``); ``additive=True`` when it is a pure
  bias (``bias``) that fused kernels can take as a float mask
- ``"value"``: adds a term to the attention output from the probabilities (``value``)

An attention variant declares the hooks it can honour; ``build_encoder`` refuses a position
whose hooks the attention cannot apply.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from rlformer.config import EncoderConfig
from rlformer.registry import register


class Position(nn.Module):
    hooks: frozenset = frozenset()
    additive: bool = False

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.d_head = cfg.d_head
        self.d_model = cfg.d_model

    @classmethod
    def validate(cls, cfg: EncoderConfig) -> None:
        """Raise ValueError for settings this encoding cannot use."""

    def embed_input(self, x: Tensor, pos: Tensor) -> Tensor:
        """x: (B, T, D); pos: (B, T) absolute positions."""
        return x

    def rotate(self, q: Tensor, k: Tensor, q_index: Tensor, k_index: Tensor) -> tuple[Tensor, Tensor]:
        """q: (B, H, Tq, dh), k: (B, H, Tk, dh)."""
        return q, k

    def rotate_one(self, x: Tensor, index: Tensor) -> Tensor:
        """x (B, H, T, dh) rotated as ``rotate`` rotates a query (or key) at ``index``: for shared-QK heads, whose
        keys are their queries, one rotation instead of two."""
        return self.rotate(x, x, index, index)[0]

    def score(self, scores: Tensor, q: Tensor, k: Tensor, q_index: Tensor, k_index: Tensor,
              scale: float) -> Tensor:
        """scores: (B, H, Tq, Tk) = scale * q k^T, before masking and softmax."""
        if self.additive:
            return scores + self.bias(q_index, k_index).to(scores.dtype)
        return scores

    def bias(self, q_index: Tensor, k_index: Tensor) -> Tensor:
        """(H, Tq, Tk) additive score bias (only for ``additive`` encodings)."""
        raise NotImplementedError

    def value(self, probs: Tensor, q_index: Tensor, k_index: Tensor) -> Optional[Tensor]:
        """(B, H, Tq, dh) term added to the attention output, or None."""
        return None


@register("position", "none")
class NoPosition(Position):
    """No positional information (order only through causality, or none at all)."""


def sinusoid(positions: Tensor, dim: int) -> Tensor:
    """Vaswani et al. 2017, eq. in sec. 3.5: PE(p, 2i) = sin(p / 10000^(2i/d)), PE(p, 2i+1) = cos(.)."""
    inv_freq = torch.exp(torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32)
                         * (-torch.log(torch.tensor(10_000.0)) / dim))
    angles = positions.to(torch.float32)[..., None] * inv_freq
    out = torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)
    return out[..., :dim]

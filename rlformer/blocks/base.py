"""Residual blocks: how attention and feed-forward are wrapped with norms and residuals.

``Block.forward(h, mem, ctx) -> (h, attn_state)``: ``h`` (B, T, D) is the layer input,
``mem`` (B, M, D) or None the memory prepended to the keys. ``attn_input`` is what the
attention reads from a hidden state (after the block's input norm, if any).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from rlformer.config import EncoderConfig


class FeedForward(nn.Module):
    """Position-wise FFN (Vaswani et al. 2017, eq. 2): W2 act(W1 x + b1) + b2.

    ``chunks`` > 1 processes the sequence in pieces (Reformer's chunked feed-forward, sec. 4),
    bounding the (T, d_ff) activation.
    """

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.d_model, cfg.ff_width)
        self.w2 = nn.Linear(cfg.ff_width, cfg.d_model)
        self.act = nn.ReLU() if cfg.activation == "relu" else nn.GELU()
        self.chunks = max(1, cfg.ff_chunks)

    def forward(self, x: Tensor) -> Tensor:
        if self.chunks == 1 or x.shape[1] < self.chunks:
            return self.w2(self.act(self.w1(x)))
        return torch.cat([self.w2(self.act(self.w1(c))) for c in x.chunk(self.chunks, dim=1)], dim=1)


def with_memory(mem: Optional[Tensor], h: Tensor) -> Tensor:
    return h if mem is None else torch.cat([mem, h], dim=1)


class Block(nn.Module):
    final_norm: bool = False
    """the encoder adds a final LayerNorm after the last block (pre-LN style)"""

    def __init__(self, cfg: EncoderConfig, attention: nn.Module):
        super().__init__()
        self.cfg = cfg
        self.attention = attention
        self.ff = FeedForward(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    @classmethod
    def validate(cls, cfg: EncoderConfig) -> None:
        """Raise ValueError for settings this block cannot use."""

    def attn_input(self, h: Tensor) -> Tensor:
        return h

    def prenorm_attention(self, norm: nn.Module, h: Tensor, mem: Optional[Tensor], ctx) -> tuple[Tensor, dict]:
        """Attention of norm(h) over norm([mem; h]): the self-attention sublayer of pre-norm blocks."""
        kv = norm(with_memory(mem, h))
        return self.attention(kv[:, kv.shape[1] - h.shape[1]:], kv, ctx)

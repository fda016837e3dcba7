"""Distance-based score modifiers: ALiBi and DA-Transformer."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from rlformer.config import EncoderConfig
from rlformer.position.base import Position
from rlformer.registry import register


def alibi_slopes(n_heads: int) -> Tensor:
    """m_h = 2^(-8h/n), h = 1..n (Press et al. 2022, sec. 3)."""
    return torch.tensor([2.0 ** (-8.0 * h / n_heads) for h in range(1, n_heads + 1)])


@register("position", "alibi")
class ALiBiPosition(Position):
    """Attention with Linear Biases (Press et al. 2022): score_ij += -m_h * |i - j|."""

    hooks = frozenset({"score"})
    additive = True

    def __init__(self, cfg: EncoderConfig):
        super().__init__(cfg)
        self.register_buffer("slopes", alibi_slopes(cfg.n_heads), persistent=False)

    def bias(self, q_index: Tensor, k_index: Tensor) -> Tensor:
        dist = (q_index[:, None] - k_index[None, :]).abs().to(self.slopes.dtype)
        return -self.slopes[:, None, None] * dist[None]


@register("position", "da")
class DAPosition(Position):
    """DA-Transformer (Wu et al. 2021, eqs. 5-8): learnable per-head distance reweighting.

    R^h = w_h |i - j|,  R^_h = (1 + exp(v_h)) / (1 + exp(v_h - R^h)),
    A = softmax(ReLU(Q K^T) * R^_h / sqrt(d)).
    """

    hooks = frozenset({"score"})

    def __init__(self, cfg: EncoderConfig):
        super().__init__(cfg)
        # Heads start with different reach: some favour near tokens (w < 0), some far (w > 0).
        self.w = nn.Parameter(torch.linspace(-0.5, 0.5, cfg.n_heads))
        self.v = nn.Parameter(torch.zeros(cfg.n_heads))

    def score(self, scores, q, k, q_index, k_index, scale):
        dist = (q_index[:, None] - k_index[None, :]).abs().to(scores.dtype)
        r = self.w[:, None, None].to(scores.dtype) * dist[None]
        v = self.v[:, None, None].to(scores.dtype)
        rhat = (1 + v.exp()) * torch.sigmoid(r - v)  # = (1 + e^v) / (1 + e^(v - r)), overflow-free
        return torch.relu(scores) * rhat[None]

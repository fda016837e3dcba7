"""Relative positional encodings that act on the attention scores."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from rlformer.config import EncoderConfig
from rlformer.position.base import Position, sinusoid
from rlformer.registry import register


@register("position", "shaw")
class ShawPosition(Position):
    """Clipped relative positions (Shaw et al. 2018, eqs. 3-5).

    e_ij = q_i (k_j + a^K_ij)^T / sqrt(d),  z_i = sum_j alpha_ij (v_j + a^V_ij),
    a_ij = w_clip(j - i, k), with learned w^K, w^V of 2k + 1 vectors shared across heads.
    """

    hooks = frozenset({"score", "value"})

    def __init__(self, cfg: EncoderConfig):
        super().__init__(cfg)
        self.clip = cfg.shaw_clip
        self.w_k = nn.Parameter(torch.randn(2 * self.clip + 1, self.d_head) * 0.02)
        self.w_v = nn.Parameter(torch.randn(2 * self.clip + 1, self.d_head) * 0.02)

    @classmethod
    def validate(cls, cfg: EncoderConfig) -> None:
        if cfg.shaw_clip < 1:
            raise ValueError(f"position='shaw' needs shaw_clip >= 1, got {cfg.shaw_clip}")

    def _rel(self, q_index: Tensor, k_index: Tensor) -> Tensor:
        return (k_index[None, :] - q_index[:, None]).clamp(-self.clip, self.clip) + self.clip

    def score(self, scores, q, k, q_index, k_index, scale):
        rel = self._rel(q_index, k_index)                                  # (Tq, Tk)
        qa = torch.einsum("bhqd,rd->bhqr", q, self.w_k.to(q.dtype))        # (B, H, Tq, 2k+1)
        idx = rel[None, None].expand(q.shape[0], q.shape[1], -1, -1)
        return scores + scale * torch.gather(qa, -1, idx)

    def value(self, probs, q_index, k_index):
        rel = self._rel(q_index, k_index)
        idx = rel[None, None].expand_as(probs)
        buckets = probs.new_zeros(*probs.shape[:-1], 2 * self.clip + 1).scatter_add_(-1, idx, probs)
        return buckets @ self.w_v.to(probs.dtype)


@register("position", "xl")
class XLPosition(Position):
    """Transformer-XL relative encoding (Dai et al. 2019, sec. 3.3):

    A_ij = q_i^T k_j + q_i^T W_kR R_{i-j} + u^T k_j + v^T W_kR R_{i-j},
    with sinusoids R, a position-key projection W_kR separate from the content keys, and
    learned global biases u, v per head.
    """

    hooks = frozenset({"score"})

    def __init__(self, cfg: EncoderConfig):
        super().__init__(cfg)
        self.w_kr = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.u = nn.Parameter(torch.zeros(self.n_heads, self.d_head))
        self.v = nn.Parameter(torch.zeros(self.n_heads, self.d_head))

    def score(self, scores, q, k, q_index, k_index, scale):
        dist = q_index[:, None] - k_index[None, :]                          # i - j, (Tq, Tk)
        lo, hi = int(dist.min()), int(dist.max())
        r = sinusoid(torch.arange(lo, hi + 1, device=q.device), self.d_model).to(q.dtype)
        rk = self.w_kr(r).view(-1, self.n_heads, self.d_head)               # (n, H, dh)
        bd = torch.einsum("bhqd,nhd->bhqn", q + self.v[None, :, None].to(q.dtype), rk)
        idx = (dist - lo)[None, None].expand(q.shape[0], q.shape[1], -1, -1)
        bd = torch.gather(bd, -1, idx)
        u_k = torch.einsum("hd,bhkd->bhk", self.u.to(k.dtype), k)[:, :, None, :]
        return scores + scale * (u_k + bd)

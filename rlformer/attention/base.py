"""The attention protocol every mechanism follows.

``Attention`` owns the projections and the position hooks; a mechanism implements
``attend(q, k, v, ctx) -> (out, new_state)`` on heads-split tensors (B, H, T, dh). Class
attributes declare what the mechanism supports, and ``build_encoder`` checks them, so an
impossible combination fails at build time with a message instead of deep inside forward.
"""
from __future__ import annotations

from torch import Tensor, nn

from rlformer.attention.projection import Projection, linear
from rlformer.config import EncoderConfig
from rlformer.context import AttentionContext
from rlformer.position.base import Position


def split_heads(x: Tensor, n_heads: int) -> Tensor:
    b, t, d = x.shape
    return x.view(b, t, n_heads, d // n_heads).transpose(1, 2)


def linear_rows(x: Tensor, layer: nn.Linear, a: int, e: int) -> Tensor:
    """x W[a:e]^T + b[a:e]: the output features a..e of ``layer`` alone (one product of those weight rows)."""
    return linear(x, layer.weight[a:e], None if layer.bias is None else layer.bias[a:e])


def merge_heads(x: Tensor) -> Tensor:
    b, h, t, dh = x.shape
    return x.transpose(1, 2).reshape(b, t, h * dh)


class Attention(nn.Module):
    supports_causal: bool = True
    supports_bidirectional: bool = True
    supports_memory: bool = True
    """can attend to a memory prefix (keys longer than queries)"""
    position_hooks: frozenset = frozenset({"input", "rotary", "score", "value"})
    """position hooks the mechanism applies (see rlformer.position.base)"""
    stateful: bool = False
    """carries its own recurrent state across segments (ctx.state -> new_state)"""

    def __init__(self, cfg: EncoderConfig, layer: int, position: Position | None):
        super().__init__()
        self.cfg = cfg
        self.layer = layer
        self.n_heads = cfg.n_heads
        self.d_head = cfg.d_head
        self.scale = cfg.d_head ** -0.5
        self.dropout = cfg.dropout
        self.position = position
        self.q_proj = Projection(cfg.d_model, cfg.d_model)        # see projection.py: the bias gradient's memory
        self.kv_proj = Projection(cfg.d_model, 2 * cfg.d_model)
        self.out_proj = Projection(cfg.d_model, cfg.d_model)

    @classmethod
    def validate(cls, cfg: EncoderConfig) -> None:
        """Raise ValueError for settings this mechanism cannot use."""

    def project(self, x: Tensor, kv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q = split_heads(self.q_proj(x), self.n_heads)
        k, v = self.project_kv(kv)
        return q, split_heads(k, self.n_heads), split_heads(v, self.n_heads)

    def project_kv(self, kv: Tensor) -> tuple[Tensor, Tensor]:
        """(k, v) = (kv W_k^T + b_k, kv W_v^T + b_v), (B, T, D) each, with W_k, W_v the halves of ``kv_proj``. Two
        products instead of one chunked (B, T, 2D) output: backward then needs no (B, T, 2D) concatenation of the
        two gradients (32 MiB at T = 16k, D = 512 in bf16, alive at the peak of a layer step)."""
        d = self.kv_proj.out_features // 2
        return linear_rows(kv, self.kv_proj, 0, d), linear_rows(kv, self.kv_proj, d, 2 * d)

    def forward(self, x: Tensor, kv: Tensor, ctx: AttentionContext) -> tuple[Tensor, dict]:
        """x: (B, Tq, D) query source; kv: (B, Tk, D) key/value source ([memory; x])."""
        q, k, v = self.project(x, kv)
        if self.position is not None and "rotary" in self.position.hooks:
            q, k = self.position.rotate(q, k, ctx.q_index, ctx.k_index)
        out, state = self.attend(q, k, v, ctx)
        return self.out_proj(merge_heads(out)), state

    def attend(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> tuple[Tensor, dict]:
        raise NotImplementedError

    @property
    def score_position(self) -> Position | None:
        """The position module when it needs the dense score path (score/value hooks)."""
        if self.position is not None and self.position.hooks & {"score", "value"}:
            return self.position
        return None

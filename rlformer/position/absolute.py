"""Absolute positional encodings, added to the input at the row's absolute position.

Positions keep counting across segments (``EncoderState.offset``), so a sequence run in
segments sees the same encodings as in one pass.
"""
from __future__ import annotations

from torch import Tensor, nn

from rlformer.config import EncoderConfig
from rlformer.position.base import Position, sinusoid
from rlformer.registry import register


@register("position", "sinusoidal")
class SinusoidalPosition(Position):
    """Fixed sinusoids (Vaswani et al. 2017, sec. 3.5)."""

    hooks = frozenset({"input"})

    def embed_input(self, x: Tensor, pos: Tensor) -> Tensor:
        return x + sinusoid(pos, self.d_model).to(x.dtype)


@register("position", "learned")
class LearnedPosition(Position):
    """A learned vector per absolute position (GPT / BERT). Positions >= max_len reuse the last one."""

    hooks = frozenset({"input"})

    def __init__(self, cfg: EncoderConfig):
        super().__init__(cfg)
        self.max_len = cfg.max_len
        self.table = nn.Embedding(cfg.max_len, cfg.d_model)
        nn.init.normal_(self.table.weight, std=0.02)

    @classmethod
    def validate(cls, cfg: EncoderConfig) -> None:
        if cfg.max_len < 1:
            raise ValueError(f"position='learned' needs max_len >= 1, got {cfg.max_len}")

    def embed_input(self, x: Tensor, pos: Tensor) -> Tensor:
        return x + self.table(pos.clamp(max=self.max_len - 1))

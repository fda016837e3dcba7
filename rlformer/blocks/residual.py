"""Post-LN (Vaswani et al. 2017) and pre-LN (Xiong et al. 2020; GPT-2) residual blocks."""
from __future__ import annotations

from torch import nn

from rlformer.blocks.base import Block, with_memory
from rlformer.registry import register


@register("block", "post_ln")
class PostLNBlock(Block):
    """x = LN(x + Attn(x)); x = LN(x + FFN(x))."""

    def __init__(self, cfg, attention):
        super().__init__(cfg, attention)
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.norm2 = nn.LayerNorm(cfg.d_model)

    def forward(self, h, mem, ctx):
        y, state = self.attention(h, with_memory(mem, h), ctx)
        h = self.norm1(h + self.drop(y))
        return self.norm2(h + self.drop(self.ff(h))), state


@register("block", "pre_ln")
class PreLNBlock(Block):
    """x = x + Attn(LN(x)); x = x + FFN(LN(x)); a final LN after the last block."""

    final_norm = True

    def __init__(self, cfg, attention):
        super().__init__(cfg, attention)
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.norm2 = nn.LayerNorm(cfg.d_model)

    def attn_input(self, h):
        return self.norm1(h)

    def forward(self, h, mem, ctx):
        y, state = self.prenorm_attention(self.norm1, h, mem, ctx)
        h = h + self.drop(y)
        return h + self.drop(self.ff(self.norm2(h))), state

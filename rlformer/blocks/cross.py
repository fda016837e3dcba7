"""Decoder blocks with cross-attention (Vaswani et al. 2017, sec. 3.1 and 3.2.3, Fig. 1).

A decoder layer has three sublayers: (masked) self-attention over [memory; target], multi-head
attention whose queries come from the decoder and whose keys and values are the encoder output
("encoder-decoder attention"), and the position-wise feed-forward. The self-attention is the
registered ``cfg.attention`` with its position hooks and memory, exactly as in the encoder;
the cross-attention is full softmax attention (eq. 1), non-causal, without positions (source
positions were already applied inside the encoder), with source padding hidden through
``key_valid``.

These blocks are not registered (``available()['block']`` lists stand-alone encoder blocks);
``rlformer.build_encoder_decoder`` picks one by ``cfg.block`` through ``cross_block_class``.
The source sequence reaches each layer as ``ctx.extra["cross"]`` (B, S, D) and
``ctx.extra["cross_valid"]`` (B, S) bool or None.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from rlformer.attention.full import FullAttention
from rlformer.blocks.base import Block, with_memory
from rlformer.config import EncoderConfig
from rlformer.context import AttentionContext


def cross_context(ctx: AttentionContext, src_len: int, src_valid: Optional[Tensor]) -> AttentionContext:
    """Context for attending from the ctx's queries to ``src_len`` source keys.

    Queries are indexed after all source keys (src_len + i), so no query coincides with a key
    and AttentionContext.allowed()'s "a query may see its own key" exception never lets a
    query see a padded source token.
    """
    t = ctx.q_pos.shape[1]
    device = ctx.q_pos.device
    return AttentionContext(causal=False, q_index=torch.arange(src_len, src_len + t, device=device),
                            k_index=torch.arange(src_len, device=device), q_pos=ctx.q_pos, key_valid=src_valid,
                            aux=ctx.aux, layer=ctx.layer, training=ctx.training)


class CrossBlock(Block):
    """Shared parts of the decoder blocks: the cross-attention and a third LayerNorm."""

    def __init__(self, cfg: EncoderConfig, attention: nn.Module):
        super().__init__(cfg, attention)
        self.cross = FullAttention(cfg, getattr(attention, "layer", 0), None)
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.norm3 = nn.LayerNorm(cfg.d_model)

    def attend_source(self, x: Tensor, ctx: AttentionContext) -> Tensor:
        """Cross-attention of x (B, T, D) to the source in ``ctx.extra``.

        A row whose source is all padding gets a zero cross-attention output (nothing to read).
        """
        if "cross" not in ctx.extra:
            raise ValueError("a decoder block needs the encoder output: call it through "
                             "rlformer.build_encoder_decoder(cfg)(src, tgt) or decoder(tgt, extra={'cross': src_out})")
        src, valid = ctx.extra["cross"], ctx.extra.get("cross_valid")
        if src.shape[0] != x.shape[0]:
            raise ValueError(f"the source has batch {src.shape[0]} but the target has {x.shape[0]}")
        if valid is None:
            return self.cross(x, src, cross_context(ctx, src.shape[1], None))[0]
        has_any = valid.any(dim=1)
        valid = valid | ~has_any[:, None]            # keep softmax finite for empty rows, then zero them
        y = self.cross(x, src, cross_context(ctx, src.shape[1], valid))[0]
        return y * has_any[:, None, None].to(y.dtype)


class CrossPostLNBlock(CrossBlock):
    """Vaswani et al. 2017 decoder layer (post-LN):
    x = LN(x + SelfAttn(x)); x = LN(x + CrossAttn(x, enc)); x = LN(x + FFN(x))."""

    def forward(self, h, mem, ctx):
        y, state = self.attention(h, with_memory(mem, h), ctx)
        h = self.norm1(h + self.drop(y))
        h = self.norm2(h + self.drop(self.attend_source(h, ctx)))
        return self.norm3(h + self.drop(self.ff(h))), state


class CrossPreLNBlock(CrossBlock):
    """Pre-LN decoder layer (Xiong et al. 2020): x = x + SelfAttn(LN(x)); x = x + CrossAttn(LN(x), enc);
    x = x + FFN(LN(x)); a final LN after the last block."""

    final_norm = True

    def attn_input(self, h):
        return self.norm1(h)

    def forward(self, h, mem, ctx):
        y, state = self.prenorm_attention(self.norm1, h, mem, ctx)
        h = h + self.drop(y)
        h = h + self.drop(self.attend_source(self.norm2(h), ctx))
        return h + self.drop(self.ff(self.norm3(h))), state


CROSS_BLOCKS = {"post_ln": CrossPostLNBlock, "pre_ln": CrossPreLNBlock}


def cross_block_class(cfg: EncoderConfig) -> type:
    """The decoder block for ``cfg.block``; ValueError for block types without a decoder version."""
    if cfg.block not in CROSS_BLOCKS:
        raise ValueError(f"the encoder-decoder has decoder blocks for block in {sorted(CROSS_BLOCKS)}, got "
                         f"block={cfg.block!r}; use block='pre_ln' (stable default) or block='post_ln' "
                         f"(Vaswani et al. 2017).")
    return CROSS_BLOCKS[cfg.block]

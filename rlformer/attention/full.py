"""Full softmax attention (Vaswani et al. 2017, eq. 1): softmax(Q K^T / sqrt(d_k)) V.

Fast path: ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient
kernels on GPU), with the causal flag, a boolean mask for memory and padding, or a float mask
carrying an additive position bias (ALiBi). Positions that rewrite scores in other ways
(Shaw, XL, DA) take the dense reference path.
"""
from __future__ import annotations

import torch.nn.functional as F

from rlformer.attention.base import Attention
from rlformer.attention.reference import dense_attention
from rlformer.registry import register


@register("attention", "full")
class FullAttention(Attention):
    """Full softmax attention over [memory; segment] (Vaswani et al. 2017, eq. 1)."""

    def attend(self, q, k, v, ctx):
        dropout = self.dropout if self.training else 0.0
        pos = self.score_position
        if pos is not None and not pos.additive:
            out = dense_attention(q, k, v, ctx.allowed(), self.scale, pos, ctx.q_index, ctx.k_index,
                                  dropout, self.training)
            return out, {}
        if pos is None and ctx.is_plain_causal():
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True), {}
        mask = ctx.allowed()
        if pos is not None:
            bias = pos.bias(ctx.q_index, ctx.k_index).to(q.dtype)[None]
            mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout), {}

"""Gated Transformer-XL block (Parisotto et al. 2019, sec. 3, eqs. 1-8 with the GRU gate).

Y = MHA(LN([SG(M); E])); E' = g(E, ReLU(Y)); Y' = FFN(LN(E')); E'' = g(E', ReLU(Y')),
g the GRU-type gate  r = s(W_r y + U_r x),  z = s(W_z y + U_z x - b_g),
h^ = tanh(W_g y + U_g (r * x)),  g(x, y) = (1 - z) * x + z * h^,  b_g = 2 at init so each
layer starts close to the identity map (the paper's key to stable RL training).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from rlformer.blocks.base import Block
from rlformer.registry import register


class GRUGate(nn.Module):
    def __init__(self, d: int, bias_init: float = 2.0):
        super().__init__()
        self.w = nn.Linear(d, 3 * d, bias=False)   # W_r, W_z, W_g applied to y
        self.u = nn.Linear(d, 2 * d, bias=False)   # U_r, U_z applied to x
        self.u_g = nn.Linear(d, d, bias=False)     # U_g applied to r * x
        self.b_g = nn.Parameter(torch.full((d,), bias_init))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        wr, wz, wg = self.w(y).chunk(3, dim=-1)
        ur, uz = self.u(x).chunk(2, dim=-1)
        r = torch.sigmoid(wr + ur)
        z = torch.sigmoid(wz + uz - self.b_g)
        h = torch.tanh(wg + self.u_g(r * x))
        return (1 - z) * x + z * h


@register("block", "gtrxl")
class GTrXLBlock(Block):
    """LN on the input stream only, ReLU on each submodule output, GRU gates for residuals (Parisotto 2019)."""

    def __init__(self, cfg, attention):
        super().__init__(cfg, attention)
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.gate1 = GRUGate(cfg.d_model)
        self.gate2 = GRUGate(cfg.d_model)

    def attn_input(self, h):
        return self.norm1(h)

    def forward(self, h, mem, ctx):
        y, state = self.prenorm_attention(self.norm1, h, mem, ctx)
        h = self.gate1(h, torch.relu(self.drop(y)))
        y = self.ff(self.norm2(h))
        return self.gate2(h, torch.relu(self.drop(y))), state

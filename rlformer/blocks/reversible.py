"""Reversible residual block (Reformer, Kitaev et al. 2020, sec. 3; RevNet, Gomez et al. 2017).

The hidden state is split into two streams (x1, x2), both initialised to the input:
    y1 = x1 + Attention(LN(x2)),      y2 = x2 + FeedForward(LN(y1))
and inverted in backward as
    x2 = y2 - FeedForward(LN(y1)),   x1 = y1 - Attention(LN(x2)),
so a stack keeps only its final output: activation memory does not grow with depth. The
output of the stack is the mean of the two streams. Dropout masks are replayed exactly in
backward (the RNG state of each sublayer call is recorded). ``ff_chunks`` > 1 also chunks the
feed-forward along time (Reformer sec. 4). Parameter gradients are accumulated by nested
backward calls, so use ``loss.backward()`` (``torch.autograd.grad`` w.r.t. parameters sees none).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from rlformer.blocks.base import Block
from rlformer.config import EncoderConfig
from rlformer.registry import register


class _RNGState:
    """CPU (+ CUDA) RNG state recorded before a sublayer call and replayed on recompute."""

    def __init__(self, device: torch.device):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.device = device

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


@register("block", "reversible")
class ReversibleBlock(Block):
    """Reversible coupling y1 = x1 + F(x2), y2 = x2 + G(y1) (Reformer sec. 3)."""

    final_norm = True
    reversible = True

    def __init__(self, cfg, attention):
        super().__init__(cfg, attention)
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self._rng: list = []

    @classmethod
    def validate(cls, cfg: EncoderConfig) -> None:
        if cfg.memory != "none":
            raise ValueError(f"block='reversible' recomputes each layer from the next one's output, so it keeps no "
                             f"per-layer inputs to cache: memory={cfg.memory!r} is not supported. Use memory='none' "
                             f"with it, or block='pre_ln'/'gtrxl' with checkpointing=True to save memory.")
        if cfg.depth != "fixed":
            raise ValueError(f"block='reversible' needs depth='fixed' (a plain stack to invert), got {cfg.depth!r}")

    def attn_input(self, h):
        return self.norm1(h)

    def f(self, x2: Tensor, ctx) -> Tensor:
        a = self.norm1(x2)
        return self.drop(self.attention(a, a, ctx)[0])

    def g(self, y1: Tensor) -> Tensor:
        return self.drop(self.ff(self.norm2(y1)))

    def forward(self, x: Tensor, mem, ctx, record: bool = False):
        """x: (B, T, 2D) = [x1, x2]; returns [y1, y2] and the (empty) attention state."""
        x1, x2 = x.chunk(2, dim=-1)
        if record:
            self._rng = [_RNGState(x.device)]
        y1 = x1 + self.f(x2, ctx)
        if record:
            self._rng.append(_RNGState(x.device))
        y2 = x2 + self.g(y1)
        return torch.cat([y1, y2], dim=-1), {}

    def backward_pass(self, y: Tensor, dy: Tensor, ctx) -> tuple[Tensor, Tensor]:
        """Reconstruct this block's input from its output and push ``dy`` through it."""
        y1, y2 = y.chunk(2, dim=-1)
        dy1, dy2 = dy.chunk(2, dim=-1)
        rng_f, rng_g = self._rng
        with torch.enable_grad():
            y1 = y1.detach().requires_grad_(True)
            with torch.random.fork_rng(devices=[y.device] if y.is_cuda else []):
                rng_g.restore()
                g = self.g(y1)
            torch.autograd.backward(g, dy2)
        with torch.no_grad():
            x2 = y2 - g
            dx1 = dy1 + y1.grad
        with torch.enable_grad():
            x2 = x2.detach().requires_grad_(True)
            with torch.random.fork_rng(devices=[y.device] if y.is_cuda else []):
                rng_f.restore()
                f = self.f(x2, ctx)
            torch.autograd.backward(f, dx1)
        with torch.no_grad():
            x1 = y1 - f
            dx2 = dy2 + x2.grad
        return torch.cat([x1, x2], dim=-1).detach(), torch.cat([dx1, dx2], dim=-1)


class _ReversibleStack(torch.autograd.Function):
    @staticmethod
    def forward(fctx, x, blocks, contexts, *params):
        with torch.no_grad():
            for block, c in zip(blocks, contexts):
                x, _ = block(x, None, c, record=True)
        fctx.blocks, fctx.contexts = blocks, contexts
        fctx.save_for_backward(x)
        return x

    @staticmethod
    def backward(fctx, dy):
        (y,) = fctx.saved_tensors
        for block, c in zip(reversed(fctx.blocks), reversed(fctx.contexts)):
            y, dy = block.backward_pass(y, dy, c)
        return (dy, None, None) + (None,) * sum(1 for b in fctx.blocks for _ in b.parameters())


def run_reversible(blocks, h: Tensor, contexts: list, recompute: bool = True) -> Tensor:
    """Run a reversible stack on h (B, T, D); ``recompute=False`` is the plain-autograd reference."""
    x = torch.cat([h, h], dim=-1)
    if recompute and torch.is_grad_enabled():
        params = [p for b in blocks for p in b.parameters()]
        x = _ReversibleStack.apply(x, list(blocks), contexts, *params)
    else:
        for block, c in zip(blocks, contexts):
            x, _ = block(x, None, c)
    y1, y2 = x.chunk(2, dim=-1)
    return (y1 + y2) / 2

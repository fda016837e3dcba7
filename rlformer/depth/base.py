"""Depth schemes: how blocks are stacked and iterated.

A depth module makes its blocks with ``make_block(i)`` and runs them through
``run(slot, block, h) -> h``, a callable from the encoder that handles memory, state and
checkpointing for state slot ``slot``. ``n_slots`` is how many state slots it uses.
"""
from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from rlformer.config import EncoderConfig
from rlformer.context import AuxCollector
from rlformer.registry import register

RunLayer = Callable[[int, nn.Module, Tensor], Tensor]


class Depth(nn.Module):
    def __init__(self, cfg: EncoderConfig, make_block: Callable[[int], nn.Module]):
        super().__init__()
        self.cfg = cfg

    @classmethod
    def validate(cls, cfg: EncoderConfig) -> None:
        """Raise ValueError for settings this depth scheme cannot use."""

    @property
    def n_slots(self) -> int:
        raise NotImplementedError

    def forward(self, h: Tensor, run: RunLayer, aux: AuxCollector) -> Tensor:
        raise NotImplementedError


@register("depth", "fixed")
class FixedDepth(Depth):
    """n_layers distinct blocks applied once each (the standard stack)."""

    def __init__(self, cfg, make_block):
        super().__init__(cfg, make_block)
        self.blocks = nn.ModuleList(make_block(i) for i in range(cfg.n_layers))

    @property
    def n_slots(self) -> int:
        return len(self.blocks)

    def forward(self, h, run, aux):
        if getattr(self.blocks[0], "reversible", False):
            from rlformer.blocks.reversible import run_reversible
            return run_reversible(self.blocks, h, [run.context(i) for i in range(len(self.blocks))])
        for i, block in enumerate(self.blocks):
            h = run(i, block, h)
        return h

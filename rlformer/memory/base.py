"""Memory across segments: what a layer's attention sees before the current segment.

A memory reads from and writes to its layer's state dict (batch-first tensors, zeros = empty,
see rlformer.state). ``read`` returns the hidden states prepended to the keys and their
validity; ``write`` receives the layer's input for the segment and returns the new dict.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from rlformer.config import EncoderConfig
from rlformer.context import AuxCollector
from rlformer.registry import register


class Memory(nn.Module):
    keeps_state: bool = True

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg

    @classmethod
    def validate(cls, cfg: EncoderConfig) -> None:
        """Raise ValueError for settings this memory cannot use."""

    def wrap_attention(self, layer: int, attention: nn.Module) -> nn.Module:
        """The attention module layer ``layer`` uses (memories that change attention wrap it)."""
        return attention

    def read(self, slot: dict) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """(mem (B, M, D), valid (B, M)) for the layer, or (None, None) when empty."""
        return None, None

    def write(self, slot: dict, h: Tensor, valid: Optional[Tensor], block: nn.Module,
              aux: AuxCollector) -> dict:
        """New slot dict after the layer saw ``h`` (B, T, D); ``valid`` (B, T) or None."""
        return {}


@register("memory", "none")
class NoMemory(Memory):
    """Each segment is processed on its own."""

    keeps_state = False

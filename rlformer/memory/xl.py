"""Transformer-XL segment-level recurrence (Dai et al. 2019, sec. 3.2).

h~^{n-1}_{tau+1} = [SG(m^{n-1}_tau) ; h^{n-1}_{tau+1}]: each layer's keys and values are computed
over the cached, gradient-stopped inputs of the previous segments (the last ``mem_len``) and
the current segment.
"""
from __future__ import annotations

import torch

from rlformer.config import EncoderConfig
from rlformer.memory.base import Memory
from rlformer.registry import register


def append_fifo(mem, mem_valid, h, valid, length: int):
    """[mem; h] keeping the newest ``length`` slots, with validity (no grad through memory)."""
    h = h.detach()
    if valid is None:
        valid = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
    if mem is not None:
        h = torch.cat([mem, h], dim=1)
        valid = torch.cat([mem_valid, valid], dim=1)
    return h[:, -length:], valid[:, -length:]


@register("memory", "xl")
class XLMemory(Memory):
    """Per-layer FIFO of the last mem_len layer inputs, gradient-stopped (Dai et al. 2019, sec. 3.2)."""

    @classmethod
    def validate(cls, cfg: EncoderConfig) -> None:
        if cfg.mem_len < 1:
            raise ValueError(f"memory='xl' needs mem_len >= 1 (tokens cached per layer), got {cfg.mem_len}")

    def read(self, slot):
        return slot.get("mem"), slot.get("mem_valid")

    def write(self, slot, h, valid, block, aux):
        mem, mem_valid = append_fifo(slot.get("mem"), slot.get("mem_valid"), h, valid, self.cfg.mem_len)
        return {"mem": mem, "mem_valid": mem_valid}

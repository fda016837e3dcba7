"""The encoder: input positions -> depth scheme over blocks -> output, threading the state."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from rlformer.build import validate
from rlformer.config import EncoderConfig
from rlformer.context import AttentionContext, AuxCollector
from rlformer.state import EncoderState


@dataclass
class EncoderOutput:
    output: Tensor
    """(batch, time, d_model)"""
    state: Optional[EncoderState]
    """pass back as ``state=`` for the next segment; None when nothing is kept"""
    aux_loss: Tensor
    """scalar: the variants' extra training losses (0 when none)"""
    info: dict = field(default_factory=dict)
    """diagnostics (halting steps, exit layers, spans, ...)"""


class Encoder(nn.Module):
    """``enc(x, state=None, reset=None, mask=None) -> EncoderOutput``.

    x: (B, T, d_model). state: from the previous segment. reset: (B,) bool, rows whose
    episode ended start from empty memory and position 0 *before* this segment. mask: (B, T)
    bool, False for padding tokens (they are never attended to by other tokens and are
    stored as invalid in memory). extra: inputs handed to every layer as ``ctx.extra`` (e.g. the
    source sequence a decoder block cross-attends to).

    ``block_cls`` replaces the registered ``cfg.block`` class, e.g. a decoder block with
    cross-attention (rlformer.blocks.cross); ``cfg.block`` is still validated.
    """

    def __init__(self, cfg: EncoderConfig, block_cls: Optional[type] = None):
        super().__init__()
        cls = validate(cfg)
        self.cfg = cfg
        block_cls = block_cls or cls["block"]
        pos_cls = cls["position"]
        self.input_position = pos_cls(cfg) if "input" in pos_cls.hooks else None
        layer_position = bool(set(pos_cls.hooks) - {"input"})
        self.memory = cls["memory"](cfg)

        def make_block(i: int) -> nn.Module:
            attention = cls["attention"](cfg, i, pos_cls(cfg) if layer_position else None)
            return block_cls(cfg, self.memory.wrap_attention(i, attention))

        self.depth = cls["depth"](cfg, make_block)
        self.drop = nn.Dropout(cfg.dropout)
        self.norm = nn.LayerNorm(cfg.d_model) if block_cls.final_norm else nn.Identity()
        self.stateful = (self.memory.keeps_state or cls["attention"].stateful
                         or self.input_position is not None)

    def initial_state(self, batch: int, device: torch.device | str) -> EncoderState:
        return EncoderState.fresh(batch, self.depth.n_slots, device)

    def forward(self, x: Tensor, state: Optional[EncoderState] = None, reset: Optional[Tensor] = None,
                mask: Optional[Tensor] = None, extra: Optional[dict] = None) -> EncoderOutput:
        if x.dim() != 3 or x.shape[-1] != self.cfg.d_model:
            raise ValueError(f"expected x of shape (batch, time, {self.cfg.d_model}), got {tuple(x.shape)}")
        b, t, _ = x.shape
        if state is None:
            state = self.initial_state(b, x.device)
        elif state.batch_size != b:
            raise ValueError(f"state holds {state.batch_size} rows but x has batch {b}")
        if reset is not None:
            state = state.reset(reset)
        valid = None if mask is None else mask.to(device=x.device, dtype=torch.bool)
        q_pos = state.offset[:, None] + torch.arange(t, device=x.device)
        h = x if self.input_position is None else self.input_position.embed_input(x, q_pos)
        h = self.drop(h)
        aux = AuxCollector()
        new_slots = list(state.slots)

        run = LayerRunner(self, state, new_slots, valid, q_pos, aux, extra)
        h = self.norm(self.depth(h, run, aux))
        new_state = EncoderState(state.offset + t, new_slots) if self.stateful else None
        return EncoderOutput(h, new_state, aux.total(h), aux.info)


class LayerRunner:
    """``run(slot, block, h) -> h``: one block over one segment, with its memory and state.

    Depth schemes call it once per block application; ``context(slot, n_mem, key_valid)`` builds
    the attention context for schemes that drive blocks themselves (reversible stacks).
    """

    def __init__(self, enc: Encoder, state: EncoderState, new_slots: list, valid: Optional[Tensor],
                 q_pos: Tensor, aux: AuxCollector, extra: Optional[dict] = None):
        self.enc, self.state, self.new_slots, self.valid, self.q_pos, self.aux = enc, state, new_slots, valid, q_pos, aux
        self.extra = extra if extra is not None else {}

    def context(self, slot: int, n_mem: int = 0, key_valid: Optional[Tensor] = None,
                aux: Optional[AuxCollector] = None) -> AttentionContext:
        t = self.q_pos.shape[1]
        index = torch.arange(n_mem + t, device=self.q_pos.device)
        return AttentionContext(causal=self.enc.cfg.causal, q_index=index[n_mem:], k_index=index, q_pos=self.q_pos,
                                key_valid=key_valid, state=self.state.slots[slot].get("attention", {}),
                                aux=aux if aux is not None else self.aux, layer=slot, training=self.enc.training,
                                extra=dict(self.extra))

    def key_valid(self, mem: Optional[Tensor], mem_valid: Optional[Tensor]) -> Optional[Tensor]:
        """(B, M + T) validity of [memory; segment] keys, or None when all are valid."""
        if mem_valid is None and self.valid is None:
            return None
        b, t = self.q_pos.shape
        ones = torch.ones(b, t, dtype=torch.bool, device=self.q_pos.device)
        return torch.cat([mem_valid if mem is not None else ones[:, :0],
                          self.valid if self.valid is not None else ones], dim=1)

    def __call__(self, slot: int, block: nn.Module, h: Tensor) -> Tensor:
        enc, old = self.enc, self.state.slots[slot]
        mem, mem_valid = enc.memory.read(old.get("memory", {}))
        n_mem = 0 if mem is None else mem.shape[1]
        key_valid = self.key_valid(mem, mem_valid)

        def call(h_in: Tensor, mem_in: Optional[Tensor]):
            local = AuxCollector(info=self.aux.info)
            out, attn_state = block(h_in, mem_in, self.context(slot, n_mem, key_valid, local))
            return out, attn_state, local.total(out)

        if enc.cfg.checkpointing and enc.training and torch.is_grad_enabled():
            out, attn_state, loss = torch.utils.checkpoint.checkpoint(call, h, mem, use_reentrant=False)
        else:
            out, attn_state, loss = call(h, mem)
        self.aux.add(loss)
        self.new_slots[slot] = {"memory": enc.memory.write(old.get("memory", {}), h, self.valid, block, self.aux),
                                "attention": attn_state}
        return out


def build_encoder(cfg: EncoderConfig) -> Encoder:
    """Validate ``cfg`` (ValueError naming the conflict and a fix) and build the encoder."""
    return Encoder(cfg)

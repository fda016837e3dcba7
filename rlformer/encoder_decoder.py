"""The encoder-decoder Transformer (Vaswani et al. 2017, sec. 3.1, Fig. 1) on the rlformer contract.

A conditioning sequence (goal, instruction, demonstration) is encoded bidirectionally; the
decoder runs causally over the target sequence and cross-attends to the encoded source in
every layer, so agents can condition on it.

    model = rlformer.build_encoder_decoder(cfg)
    out = model(src, tgt, src_mask=None, tgt_state=None, tgt_reset=None, tgt_mask=None)
    out.output    # (B, T, d_model): decoder outputs
    out.state     # the decoder's EncoderState (memory, positions); pass back as tgt_state=
    out.aux_loss  # encoder + decoder extra losses
    out.info      # decoder diagnostics, plus info["encoder"] with the encoder's

For step-by-step decoding, encode once (``model.encode``) and call ``model.decode`` per step.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch
from torch import Tensor, nn

from rlformer.blocks.cross import cross_block_class
from rlformer.build import _names
from rlformer.config import EncoderConfig
from rlformer.encoder import Encoder, EncoderOutput, build_encoder
from rlformer.registry import lookup


def encoder_config(cfg: EncoderConfig) -> EncoderConfig:
    """The source encoder's config: ``cfg``, bidirectional, without memory (the whole source is
    given on every call, so nothing is carried between calls)."""
    return replace(cfg, causal=False, memory="none")


def validate_encoder_decoder(cfg: EncoderConfig, enc_cfg: EncoderConfig) -> None:
    """ValueError for what the encoder-decoder cannot build (the rest is ``rlformer.validate``)."""
    cross_block_class(cfg)
    att = lookup("attention", enc_cfg.attention)
    if not att.supports_bidirectional:
        raise ValueError(f"the encoder attends bidirectionally over the source, and attention="
                         f"{enc_cfg.attention!r} only supports causal=True; pick an attention in "
                         f"{_names('attention', lambda c: c.supports_bidirectional)} for the encoder "
                         f"(pass encoder_cfg=... to use a different one than the decoder's).")
    if enc_cfg.causal:
        raise ValueError("encoder_cfg.causal must be False: the encoder reads the whole source bidirectionally")
    if enc_cfg.d_model != cfg.d_model:
        raise ValueError(f"encoder_cfg.d_model={enc_cfg.d_model} must equal the decoder's d_model={cfg.d_model} "
                         f"(the decoder cross-attends to the encoder output)")


class EncoderDecoder(nn.Module):
    """Vaswani et al. 2017 encoder-decoder: ``model(src, tgt, src_mask, tgt_state, tgt_reset, tgt_mask)``.

    src: (B, S, d_model) conditioning sequence; src_mask: (B, S) bool, False for padding (hidden
    from the encoder's tokens and from cross-attention; a row with no valid source token reads
    nothing: its cross-attention output is zero). tgt: (B, T, d_model); tgt_state / tgt_reset /
    tgt_mask: the decoder's ``state`` / ``reset`` / ``mask`` exactly as for ``Encoder``
    (memory, positions that keep counting, per-row reset, target padding).

    The encoder is ``build_encoder(encoder_config(cfg))`` (same attention/position/block/depth,
    causal=False, memory='none'). The decoder is the same layer loop with decoder blocks
    (rlformer.blocks.cross): self-attention with ``cfg.attention``, ``cfg.position``,
    ``cfg.memory`` and ``cfg.causal`` (True, the default, for autoregressive decoding), then
    full cross-attention to the encoder output, then the feed-forward; post-LN or pre-LN per
    ``cfg.block``.
    """

    def __init__(self, cfg: EncoderConfig, encoder_cfg: Optional[EncoderConfig] = None):
        super().__init__()
        enc_cfg = encoder_cfg if encoder_cfg is not None else encoder_config(cfg)
        validate_encoder_decoder(cfg, enc_cfg)
        self.cfg = cfg
        self.encoder = build_encoder(enc_cfg)
        self.decoder = Encoder(cfg, block_cls=cross_block_class(cfg))

    def encode(self, src: Tensor, src_mask: Optional[Tensor] = None) -> EncoderOutput:
        """Encode the source once (e.g. before step-by-step decoding)."""
        return self.encoder(src, mask=src_mask)

    def decode(self, tgt: Tensor, src_out: Tensor, src_mask: Optional[Tensor] = None,
               state=None, reset: Optional[Tensor] = None, mask: Optional[Tensor] = None) -> EncoderOutput:
        """Run the decoder on ``tgt`` attending to an encoded source ``src_out`` (B, S, d_model)."""
        if src_out.dim() != 3 or src_out.shape[0] != tgt.shape[0] or src_out.shape[-1] != self.cfg.d_model:
            raise ValueError(f"expected an encoded source of shape ({tgt.shape[0]}, S, {self.cfg.d_model}) "
                             f"matching tgt {tuple(tgt.shape)}, got {tuple(src_out.shape)}")
        if src_mask is not None and tuple(src_mask.shape) != tuple(src_out.shape[:2]):
            raise ValueError(f"src_mask must have shape {tuple(src_out.shape[:2])}, got {tuple(src_mask.shape)}")
        valid = None if src_mask is None else src_mask.to(device=src_out.device, dtype=torch.bool)
        return self.decoder(tgt, state=state, reset=reset, mask=mask,
                            extra={"cross": src_out, "cross_valid": valid})

    def forward(self, src: Tensor, tgt: Tensor, src_mask: Optional[Tensor] = None, tgt_state=None,
                tgt_reset: Optional[Tensor] = None, tgt_mask: Optional[Tensor] = None) -> EncoderOutput:
        enc = self.encode(src, src_mask)
        dec = self.decode(tgt, enc.output, src_mask, tgt_state, tgt_reset, tgt_mask)
        return EncoderOutput(dec.output, dec.state, dec.aux_loss + enc.aux_loss, {**dec.info, "encoder": enc.info})


def build_encoder_decoder(cfg: EncoderConfig, encoder_cfg: Optional[EncoderConfig] = None) -> EncoderDecoder:
    """Validate and build an encoder-decoder (ValueError naming the conflict and a fix).

    ``encoder_cfg`` (optional) configures the source encoder separately (it must be
    non-causal and share ``d_model``); by default it is ``cfg`` with causal=False, memory='none'.
    """
    return EncoderDecoder(cfg, encoder_cfg)

"""Linformer (Wang et al. 2020, "Linformer: Self-Attention with Linear Complexity")."""
from __future__ import annotations

import math
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rlformer.attention.base import Attention
from rlformer.config import EncoderConfig
from rlformer.registry import register

_LAYERWISE: dict[int, tuple[weakref.ref, weakref.ref]] = {}
"""id(cfg) -> (cfg, projection) for sharing='layerwise': the one E that every layer built from this
config object shares. Layer 0 always starts a new entry, so each build_encoder(cfg) call gets its
own projection; entries die with the config object or the projection."""


def _layerwise_projection(cfg: EncoderConfig, layer: int, make) -> nn.Parameter:
    entry = _LAYERWISE.get(id(cfg))
    if layer != 0 and entry is not None and entry[0]() is cfg and entry[1]() is not None:
        return entry[1]()
    param = make()
    key = id(cfg)
    _LAYERWISE[key] = (weakref.ref(cfg), weakref.ref(param))
    weakref.finalize(cfg, _LAYERWISE.pop, key, None)
    return param


def project_sequence(x: Tensor, proj: Tensor) -> Tensor:
    """x: (B, H, n, dh), proj: (k, n) or (H, k, n) -> (B, H, k, dh): E x along the sequence."""
    if proj.dim() == 2:
        return torch.einsum("kn,bhnd->bhkd", proj.to(x.dtype), x)
    return torch.einsum("hkn,bhnd->bhkd", proj.to(x.dtype), x)


@register("attention", "linformer")
class LinformerAttention(Attention):
    """Linformer (Wang et al. 2020): softmax(Q (E K)^T / sqrt(d)) (F V), eq. 7.

    E, F are learned (k x n) projections along the sequence (n = ``linformer.max_len``), so the
    score matrix is (n x k): O(n k) time and memory. A sequence of T < n tokens uses the first T
    columns of E and F. Sharing (sec. 4): "none" (E_i, F_i per head), "headwise" (one E, F for
    all heads), "kv" (one E = F for all heads), "layerwise" (one E for keys, values, heads and all
    layers of the encoder; the layers built from one config object share it).

    Padding (key_valid False) zeroes those keys and values before the projection. Positions:
    "input" and "rotary" (rotary is applied to q and k before E projects k). No memory prefix,
    bidirectional only.
    """

    supports_causal = False
    supports_memory = False
    position_hooks = frozenset({"input", "rotary"})
    causal_note = ("Its projections E and F mix the keys and values of all n positions into k rows, so every "
                   "output depends on every input, future ones included; there is no causal form.")

    def __init__(self, cfg: EncoderConfig, layer: int, position=None):
        super().__init__(cfg, layer, position)
        c = cfg.linformer
        bound = 1 / math.sqrt(c.k)

        def make(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape, c.k, c.max_len).uniform_(-bound, bound))

        self.F: Optional[nn.Parameter] = None
        if c.sharing == "none":
            self.E, self.F = make(cfg.n_heads), make(cfg.n_heads)
        elif c.sharing == "headwise":
            self.E, self.F = make(), make()
        elif c.sharing == "kv":
            self.E = make()
        else:
            self.E = _layerwise_projection(cfg, layer, make)

    @classmethod
    def validate(cls, cfg: EncoderConfig) -> None:
        c = cfg.linformer
        if c.sharing not in ("none", "headwise", "kv", "layerwise"):
            raise ValueError(f"linformer.sharing={c.sharing!r}; use 'none', 'headwise', 'kv' or 'layerwise'")
        if c.max_len < 1 or not 1 <= c.k:
            raise ValueError(f"linformer.k={c.k} and linformer.max_len={c.max_len} must be >= 1")

    def attend(self, q, k, v, ctx):
        t, n = k.shape[2], self.cfg.linformer.max_len
        if t > n:
            raise ValueError(f"linformer got a sequence of {t} tokens but its projections E, F are built for "
                             f"linformer.max_len={n}; raise max_len to at least {t} or feed shorter segments")
        if ctx.key_valid is not None:
            keep = ctx.key_valid[:, None, :, None].to(k.dtype)
            k, v = k * keep, v * keep
        e = self.E[..., :t]
        f = e if self.F is None else self.F[..., :t]
        kp, vp = project_sequence(k, e), project_sequence(v, f)
        dropout = self.dropout if self.training else 0.0
        return F.scaled_dot_product_attention(q, kp, vp, dropout_p=dropout), {}

"""Compressive Transformer memory (Rae et al. 2020, sec. 3).

Each layer keeps a FIFO memory m of ``mem_len`` past inputs and a compressed memory cm of
``cmem_len``. When a segment arrives, the oldest ns states leave m; they are compressed with
rate c by f_c (max/avg pool, 1D conv, dilated conv, most-used) into ns / c compressed memories
that enter the back of cm, whose oldest entries are dropped (Algorithm 1). Attention reads
[cm; m; h]. f_c is trained only by the attention-reconstruction loss (sec. 3.2, eq. 2), with
the network's states and attention weights gradient-stopped.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rlformer.config import EncoderConfig
from rlformer.context import AttentionContext
from rlformer.memory.base import Memory
from rlformer.memory.xl import append_fifo
from rlformer.registry import register

FUNCTIONS = ("max_pool", "avg_pool", "conv", "dilated_conv", "most_used")
LEARNED = ("conv", "dilated_conv")


# ---------------------------------------------------------------- per-row reordering helpers


def gather_rows(x: Tensor, idx: Tensor) -> Tensor:
    """x: (B, L, ...), idx: (B, L') -> (B, L', ...) with out[b, j] = x[b, idx[b, j]]."""
    shape = (*idx.shape, *x.shape[2:])
    return torch.gather(x, 1, idx.reshape(*idx.shape, *([1] * (x.dim() - 2))).expand(shape))


def compact(valid: Tensor, tensors: Sequence[Tensor], valid_first: bool) -> tuple[Tensor, list[Tensor]]:
    """Stable per-row reorder putting the valid entries first (or last), keeping their order."""
    key = (~valid if valid_first else valid).to(torch.uint8)
    order = torch.sort(key, dim=1, stable=True).indices
    return torch.gather(valid, 1, order), [gather_rows(t, order) for t in tensors]


# ---------------------------------------------------------------- compression functions f_c


class MaxPool(nn.Module):
    """f_c = max over each group of c memories (sec. 3.1, 'max pooling')."""

    def forward(self, groups: Tensor) -> Tensor:  # (B, G, c, D) -> (B, G, D)
        return groups.amax(dim=2)


class AvgPool(nn.Module):
    """f_c = mean over each group of c memories (sec. 3.1, 'mean pooling')."""

    def forward(self, groups: Tensor) -> Tensor:
        return groups.mean(dim=2)


class Conv(nn.Module):
    """1D convolution with kernel size = stride = c over time (sec. 3.1, '1D convolution')."""

    def __init__(self, d: int, c: int):
        super().__init__()
        self.conv = nn.Conv1d(d, d, kernel_size=c, stride=c)

    def forward(self, groups: Tensor) -> Tensor:
        b, g, c, d = groups.shape
        return self.conv(groups.reshape(b * g, c, d).transpose(1, 2)).reshape(b, g, d)


class DilatedConv(nn.Module):
    """Dilated convolutions (sec. 3.1): a WaveNet-style stack of causal kernel-2 convolutions with
    dilations 1, 2, 4, ... (ReLU between layers) whose receptive field covers the c memories of a
    group; the group's compressed memory is the output at its last position."""

    def __init__(self, d: int, c: int):
        super().__init__()
        n = max(1, math.ceil(math.log2(c)))
        self.convs = nn.ModuleList(nn.Conv1d(d, d, kernel_size=2, dilation=2 ** i) for i in range(n))

    def forward(self, groups: Tensor) -> Tensor:
        b, g, c, d = groups.shape
        y = groups.reshape(b * g, c, d).transpose(1, 2)
        for i, conv in enumerate(self.convs):
            y = conv(F.pad(y, (conv.dilation[0], 0)))
            if i < len(self.convs) - 1:
                y = torch.relu(y)
        return y[:, :, -1].reshape(b, g, d)


def make_compressor(fn: str, d: int, c: int) -> nn.Module:
    """f_c for fn in max_pool, avg_pool, conv, dilated_conv (most_used selects; see ``most_used``)."""
    return {"max_pool": MaxPool, "avg_pool": AvgPool, "conv": lambda: Conv(d, c),
            "dilated_conv": lambda: DilatedConv(d, c)}[fn]()


def most_used(x: Tensor, usage: Tensor, n_groups: Tensor, g: int) -> tuple[Tensor, Tensor]:
    """Keep the most-used evicted memories, one per group of c (sec. 3.1, 'most-used'), in time order.

    x: (B, L, D) evicted memories (valid ones first), usage: (B, L) average attention each
    received, n_groups: (B,) complete groups per row. Row b keeps its n_groups[b] entries with the
    highest usage among its first n_groups[b] * c; returns (B, g, D) and their validity (B, g).
    """
    b, length, _ = x.shape
    c = length // g
    pos = torch.arange(length, device=x.device)
    eligible = pos[None] < (n_groups * c)[:, None]
    score = usage.masked_fill(~eligible, float("-inf"))
    top = score.topk(g, dim=1).indices                                  # (B, g) by usage
    keep = torch.arange(g, device=x.device)[None] < n_groups[:, None]
    chosen = torch.zeros(b, length + 1, dtype=torch.bool, device=x.device)   # last column: discarded picks
    chosen = chosen.scatter(1, torch.where(keep, top, torch.full_like(top, length)), True)[:, :length]
    valid, (x,) = compact(chosen, [x], valid_first=True)
    return x[:, :g], valid[:, :g]


# ---------------------------------------------------------------- attention helpers


class _Frozen(nn.Module):
    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, method: str, *args):
        return getattr(self.module, method)(*args)


def call_frozen(module: nn.Module, method: str, *args):
    """``module.method(*args)`` with every parameter gradient-stopped (gradients reach only args)."""
    params = {f"module.{n}": p.detach() for n, p in module.named_parameters()}
    return torch.func.functional_call(_Frozen(module), params, (method, *args))


def masked_attention(q: Tensor, k: Tensor, v: Tensor, key_valid: Tensor, scale: float) -> Tensor:
    """Content attention softmax(scale q k^T) v over valid keys; q (B, H, T, dh), key_valid (B, N).

    A row without valid keys gets a finite (uniform) result; callers weight it out.
    """
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
    scores = scores.masked_fill(~key_valid[:, None, None, :], torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1) @ v


def reconstruction_loss(block: nn.Module, h: Tensor, h_valid: Tensor, old: Tensor, old_valid: Tensor,
                        comp: Tensor, comp_valid: Tensor) -> Tensor:
    """Attention-reconstruction loss (sec. 3.2, eq. 2): || attn(h, old) - attn(h, f_c(old)) ||^2.

    attn is the layer's own (content) attention read through ``block.attn_input`` and the
    attention's projections, all gradient-stopped, so only f_c (through ``comp``) learns. Mean
    squared error over the per-head outputs of the valid queries of rows that compressed something.
    """
    attention = block.attention
    with torch.no_grad():
        xq, xo = block.attn_input(h.detach()), block.attn_input(old.detach())
        q, k_old, v_old = attention.project(xq, xo)
        target = masked_attention(q, k_old, v_old, old_valid, attention.scale)
    xc = call_frozen(block, "attn_input", comp)
    _, k_c, v_c = call_frozen(attention, "project", xq, xc)
    pred = masked_attention(q, k_c, v_c, comp_valid, attention.scale)
    weight = (h_valid & comp_valid.any(dim=1, keepdim=True)).to(pred.dtype)      # (B, T)
    err = (pred - target).square().mean(dim=(1, 3))                             # (B, T)
    return (err * weight).sum() / weight.sum().clamp_min(1.0)


def received_attention(block: nn.Module, keys: Tensor, key_valid: Tensor, n_q: int,
                       causal: bool) -> tuple[Tensor, Tensor]:
    """((B, N) attention each of the N keys received from the last ``n_q`` valid positions, (B, N)
    how many of those queries could see it).

    The layer's dense softmax attention (its projections and position hooks, head-averaged), i.e.
    exactly what attention='full' computed; for other mechanisms it is the dense attention their
    projections define (an approximation of their sparse pattern).
    """
    attention = block.attention
    kv = block.attn_input(keys)
    q, k, _ = attention.project(kv[:, kv.shape[1] - n_q:], kv)
    index = torch.arange(kv.shape[1], device=kv.device)
    ctx = AttentionContext(causal=causal, q_index=index[-n_q:], k_index=index, q_pos=index[None, -n_q:],
                           key_valid=key_valid)
    pos = attention.position
    if pos is not None and "rotary" in pos.hooks:
        q, k = pos.rotate(q, k, ctx.q_index, ctx.k_index)
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * attention.scale
    if pos is not None and "score" in pos.hooks:
        scores = pos.score(scores, q, k, ctx.q_index, ctx.k_index, attention.scale)
    allowed = ctx.allowed()
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).mean(dim=1)                   # (B, Tq, N)
    q_valid = key_valid[:, -n_q:, None]
    seen = (allowed[:, 0] & q_valid).sum(dim=1)
    return (probs * q_valid).sum(dim=1).to(keys.dtype), seen.to(keys.dtype)


# ---------------------------------------------------------------- the memory


@register("memory", "compressive")
class CompressiveMemory(Memory):
    """Compressive Transformer memory (Rae et al. 2020, sec. 3, Algorithm 1, eq. 2).

    Per layer: FIFO memory m (mem_len) and compressed memory cm (cmem_len); attention reads
    [cm; m; h]. States evicted from m are compressed with rate c, f_c: R^{ns x d} -> R^{ns/c x d},
    one of max_pool, avg_pool, conv (kernel = stride = c), dilated_conv (kernel-2 dilated stack
    over each group) or most_used (keeps the evicted memories with the highest average attention
    received while they were in m, in time order). Evicted states compress only once c valid ones
    have gathered (a pending buffer of c - 1 per row), so groups are always c consecutive valid
    states of the row and a reset row compresses exactly as a fresh one. When f_c has parameters
    (and gradients are enabled), recon_weight * L^attn (eq. 2: ||attn(h, old_mem) - attn(h, f_c(old_mem))||^2, stop-gradients
    on everything but f_c) is added to aux_loss; the stored memories are gradient-stopped.

    Slot tensors (batch-first, zeros = empty): mem (B, M, D), mem_valid, cmem (B, Nc, D),
    cmem_valid (right-aligned: valid entries last, oldest first), pending (B, c-1, D),
    pending_valid; for most_used also usage sums/counts of m and the pending states.
    """

    def __init__(self, cfg: EncoderConfig):
        super().__init__(cfg)
        self.compressors = nn.ModuleDict()
        """one learned f_c per layer (conv, dilated_conv), made as the layers are built"""

    @classmethod
    def validate(cls, cfg: EncoderConfig) -> None:
        cc = cfg.compressive
        if cfg.mem_len < 1:
            raise ValueError(f"memory='compressive' needs mem_len >= 1 (the FIFO memory whose evicted states are "
                             f"compressed), got {cfg.mem_len}")
        if cc.cmem_len < 1:
            raise ValueError(f"memory='compressive' needs compressive.cmem_len >= 1, got {cc.cmem_len}; "
                             f"use memory='xl' for a memory without compression")
        if cc.rate < 1:
            raise ValueError(f"compressive.rate (c old memories -> 1) must be >= 1, got {cc.rate}")
        if cc.fn not in FUNCTIONS:
            raise ValueError(f"compressive.fn={cc.fn!r} is not a compression function; choose one of {FUNCTIONS}")
        if cc.recon_weight < 0:
            raise ValueError(f"compressive.recon_weight must be >= 0, got {cc.recon_weight}")

    def wrap_attention(self, layer, attention):
        cc = self.cfg.compressive
        if cc.fn in LEARNED:
            self.compressors[str(layer)] = make_compressor(cc.fn, self.cfg.d_model, cc.rate)
        return attention

    def compressor(self, block: nn.Module) -> nn.Module:
        """The layer's f_c (found through its attention's layer index)."""
        fn = self.cfg.compressive.fn
        if fn in LEARNED:
            return self.compressors[str(block.attention.layer)]
        return make_compressor(fn, self.cfg.d_model, self.cfg.compressive.rate)

    def read(self, slot):
        mem, mem_valid = slot.get("mem"), slot.get("mem_valid")
        if slot.get("cmem") is None:
            return mem, mem_valid
        return torch.cat([slot["cmem"], mem], dim=1), torch.cat([slot["cmem_valid"], mem_valid], dim=1)

    def write(self, slot, h, valid, block, aux):
        cfg, cc = self.cfg, self.cfg.compressive
        c, fn = cc.rate, cc.fn
        b, t, d = h.shape
        h = h.detach()
        valid = torch.ones(b, t, dtype=torch.bool, device=h.device) if valid is None else valid
        mem, mem_valid = slot.get("mem"), slot.get("mem_valid")
        n_old = 0 if mem is None else mem.shape[1]
        new = dict(slot)
        new["mem"], new["mem_valid"] = append_fifo(mem, mem_valid, h, valid, cfg.mem_len)
        full = h if mem is None else torch.cat([mem, h], dim=1)
        full_valid = valid if mem is None else torch.cat([mem_valid, valid], dim=1)
        extras = []                                                             # tensors that travel with states
        if fn == "most_used":
            with torch.no_grad():
                mem_in, mem_in_valid = self.read(slot)
                keys = h if mem_in is None else torch.cat([mem_in, h], dim=1)
                key_valid = valid if mem_in is None else torch.cat([mem_in_valid, valid], dim=1)
                got, seen = received_attention(block, keys, key_valid, t, cfg.causal)
                got, seen = got[:, keys.shape[1] - n_old - t:], seen[:, keys.shape[1] - n_old - t:]
                if mem is not None:
                    got = got + torch.cat([slot["use_sum"], torch.zeros_like(got[:, n_old:])], dim=1)
                    seen = seen + torch.cat([slot["use_n"], torch.zeros_like(seen[:, n_old:])], dim=1)
            new["use_sum"], new["use_n"] = got[:, -cfg.mem_len:], seen[:, -cfg.mem_len:]
            extras = [got, seen]
        n_evict = full.shape[1] - cfg.mem_len
        if n_evict <= 0:
            return new
        stream = [full[:, :n_evict]] + [e[:, :n_evict] for e in extras]
        stream_valid = full_valid[:, :n_evict]
        if slot.get("pending") is not None:
            pend = [slot["pending"]] + ([slot["pend_sum"], slot["pend_n"]] if extras else [])
            stream = [torch.cat([p, s], dim=1) for p, s in zip(pend, stream)]
            stream_valid = torch.cat([slot["pending_valid"], stream_valid], dim=1)
        stream_valid, stream = compact(stream_valid, stream, valid_first=True)
        n = stream_valid.sum(dim=1)                                             # valid states per row
        n_groups, length = n // c, stream_valid.shape[1]
        if c > 1:                                                               # leftover -> pending, right-aligned
            src = (n - (c - 1))[:, None] + torch.arange(c - 1, device=h.device)[None]
            keep = src >= (n_groups * c)[:, None]
            src = src.clamp(0, length - 1)
            pend = [torch.where(keep.reshape(*keep.shape, *([1] * (s.dim() - 2))), gather_rows(s, src),
                                torch.zeros((), dtype=s.dtype, device=s.device)) for s in stream]
            new["pending"], new["pending_valid"] = pend[0], keep
            if extras:
                new["pend_sum"], new["pend_n"] = pend[1], pend[2]
        g = length // c
        if g == 0:
            return new
        group_valid = torch.arange(g, device=h.device)[None] < n_groups[:, None]
        old, old_valid = stream[0][:, :g * c], stream_valid[:, :g * c] & (
            torch.arange(g * c, device=h.device)[None] < (n_groups * c)[:, None])
        if fn == "most_used":
            comp, group_valid = most_used(old, stream[1][:, :g * c] / stream[2][:, :g * c].clamp_min(1), n_groups, g)
        else:
            comp = self.compressor(block)(old.reshape(b, g, c, d))
            if fn in LEARNED and cc.recon_weight > 0 and torch.is_grad_enabled():
                aux.add(cc.recon_weight * reconstruction_loss(block, h, valid, old, old_valid, comp, group_valid))
        comp = torch.where(group_valid[..., None], comp.detach(), torch.zeros((), dtype=comp.dtype, device=h.device))
        cmem, cmem_valid = comp, group_valid
        if slot.get("cmem") is not None:
            cmem, cmem_valid = torch.cat([slot["cmem"], cmem], dim=1), torch.cat([slot["cmem_valid"], cmem_valid], 1)
        cmem_valid, (cmem,) = compact(cmem_valid, [cmem], valid_first=False)
        new["cmem"], new["cmem_valid"] = cmem[:, -cc.cmem_len:], cmem_valid[:, -cc.cmem_len:]
        return new

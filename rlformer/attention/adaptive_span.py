"""Adaptive attention span (Sukhbaatar et al. 2019, "Adaptive Attention Span in Transformers").

Every head h learns a span z_h in [0, S] (S = ``max_span``). Attention weights to a key at
distance x = i - j from the query are multiplied by the soft mask (sec. 2.2, eq. 3)

    m_z(x) = min(max((R + z - x) / R, 0), 1),     R = ``ramp``

and renormalized, a_ij = m_z(i - j) exp(s_ij) / sum_k m_z(i - k) exp(s_ik) (the paper's code:
softmax, multiply by the mask, divide by the sum). The loss gets the L1 penalty
``penalty * mean_h z_h`` per layer (the paper's ``loss_coeff * max_span * mean(current_val)``).
Dynamic span (sec. 2.3): z_t = S * sigmoid(v^T x_t + b) per head, from the query token x_t.

Fast path: only keys with m_z(x) > 0 can receive weight, i.e. distances x < W =
min(S, ceil(R + max z)). Queries are cut into chunks of C and each chunk attends to its own
band of C + W - 1 keys (a block-banded computation), so keys beyond the current largest span
are never read or scored, and shrinking spans shrink the work: O(T (C + W)) instead of
O(T (M + T)) with M memory slots. With XL memory only the last W - 1 memory slots are touched.
``adaptive_span_reference`` is the dense, literal version it is tested against.
On CUDA (no dropout in training, at least ``FLEX_MIN_LEN`` queries) the layer runs
``flex_span.flex_adaptive_span`` instead: one compiled FlexAttention call with a banded BlockMask and
the score_mod s + log m_z, the span gradient from one more banded pass over the ramp.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rlformer.attention.base import Attention, merge_heads
from rlformer.attention.chunked_softmax import SpanBias, chunked_softmax, span_layout
from rlformer.attention.flex import capturing, flex_eligible
from rlformer.attention.flex_span import flex_adaptive_span
from rlformer.config import EncoderConfig
from rlformer.context import AttentionContext
from rlformer.registry import register

MIN_CHUNK = 32
"""smallest query chunk of the banded path (fewer, larger batched matmuls for short spans)"""
FLEX_MIN_LEN = 128
"""fewest queries for which CUDA tensors take the FlexAttention path"""


class _ProjectedClamp(torch.autograd.Function):
    """clamp(p, 0, 1) whose gradient only moves an out-of-range p back towards [0, 1].

    The paper clamps the span parameter into [0, 1] after every optimizer step; this does the
    same without a hook: outside [0, 1] a gradient that would push p further out is dropped, so
    p cannot drift away, and one pushing it back passes (a plain clamp would freeze it there).
    """

    @staticmethod
    def forward(ctx, p: Tensor) -> Tensor:
        ctx.save_for_backward(p)
        return p.clamp(0.0, 1.0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (p,) = ctx.saved_tensors
        keep = ((p >= 0) & (p <= 1)) | ((p < 0) & (grad < 0)) | ((p > 1) & (grad > 0))
        return grad * keep


def span_mask(dist: Tensor, z: Tensor, ramp: int) -> Tensor:
    """m_z(x) = clamp((R + z - x) / R, 0, 1) for distances ``dist`` and spans ``z`` (broadcast)."""
    return ((ramp + z - dist) / ramp).clamp(0.0, 1.0)


def softmax32(scores: Tensor) -> Tensor:
    """Softmax in at least float32 (half inputs are upcast, float64 stays float64)."""
    return torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1).to(scores.dtype)


def span_window(z: Tensor, ramp: int, max_span: int) -> int:
    """W = min(S, ceil(R + max z)): keys at distance >= W have m_z = 0 for every span in ``z``.

    While a CUDA graph is captured, max z cannot be read on the host: W = S, the widest band (same result,
    more work; the graph then stays valid however the spans move)."""
    if capturing(z):
        return max(1, max_span)
    z_max = float(z.detach().max()) if z.numel() else 0.0
    return max(1, min(max_span, math.ceil(ramp + z_max)))


def adaptive_span_reference(q: Tensor, k: Tensor, v: Tensor, allowed: Optional[Tensor], scale: float, z: Tensor,
                            ramp: int, max_span: int, q_index: Tensor, k_index: Tensor, eps: float = 0.0,
                            dropout: float = 0.0, training: bool = False) -> Tensor:
    """Dense, literal adaptive-span attention: softmax, times m_z(i - j), renormalize.

    q: (B, H, Tq, dh); k, v: (B, H, Tk, dh); ``allowed`` broadcastable to (B, H, Tq, Tk);
    z: (H,) static spans or (B, H, Tq) per-query spans. Keys at distance >= S get weight 0
    (the paper's mask template has S entries). ``eps``: the paper's code divides by
    ``sum + 1e-8``; the fast path computes the exact ratio, which the own key (distance 0,
    m = 1) always keeps well defined, so tests compare with eps = 0.
    """
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = softmax32(scores)
    dist = (q_index[:, None] - k_index[None, :]).to(q.dtype)                 # (Tq, Tk)
    zz = z[None, :, None, None] if z.dim() == 1 else z[..., None]
    mask = span_mask(dist, zz.to(q.dtype), ramp) * (dist < max_span).to(q.dtype)
    probs = probs * mask
    probs = probs / (probs.sum(-1, keepdim=True) + eps)
    if dropout > 0 and training:
        probs = F.dropout(probs, dropout)
    return probs @ v


def banded_adaptive_span(q: Tensor, k: Tensor, v: Tensor, key_valid: Optional[Tensor], scale: float, z: Tensor,
                         ramp: int, max_span: int, dropout: float = 0.0, training: bool = False,
                         max_chunk: int = 128, max_scores: int = 1 << 24, kernel: Optional[str] = None) -> Tensor:
    """Causal adaptive-span attention that only scores keys at distance < W = min(S, ceil(R + max z)).

    Queries are the last Tq of the Tk keys (query i at key index Tk - Tq + i, as in the
    [memory; segment] layout). ``key_valid``: (B, Tk) bool or None; a query always sees its
    own key. Same result as ``adaptive_span_reference`` with the causal mask and eps = 0.
    Queries go in chunks of C <= clamp(W, MIN_CHUNK, max_chunk) (a multiple of 8, as small as
    possible for the same number of key chunks); each chunk scores the ceil((W - 1) / C) chunks of
    keys before it and itself, with the bias log m_z (masked beyond
    W), through ``chunked_softmax`` (fused kernels per group of at most ``max_scores`` scores,
    probabilities recomputed in backward, the span gradient from the bias gradient). Keys older
    than W - 1 before the first query are never read. With dropout in training: the
    materializing ``banded_probs_adaptive_span``.
    """
    if dropout > 0 and training:
        return banded_probs_adaptive_span(q, k, v, key_valid, scale, z, ramp, max_span, dropout, training,
                                          max_chunk)
    b, h, t, _ = q.shape
    tk = k.shape[2]
    w = span_window(z, ramp, max_span)
    c = max(MIN_CHUNK, min(w, max_chunk))
    before = -(-(w - 1) // c)
    if before:          # the smallest chunk (a multiple of 8) with as few chunks of keys: window close to C + W - 1
        c = max(MIN_CHUNK, (-(-(w - 1) // before) + 7) // 8 * 8)
    layout = span_layout(b, h, t, tk, w, c, q.device)
    valid = None if key_valid is None else F.pad(key_valid.to(torch.bool), (0, 1), value=False)
    return chunked_softmax(layout, SpanBias(valid, ramp=ramp, window=w), scale, q, k, v, z,
                           max_scores=max_scores, kernel=kernel)


def banded_probs_adaptive_span(q: Tensor, k: Tensor, v: Tensor, key_valid: Optional[Tensor], scale: float,
                               z: Tensor, ramp: int, max_span: int, dropout: float = 0.0, training: bool = False,
                               max_chunk: int = 128) -> Tensor:
    """``banded_adaptive_span`` with the per-chunk probabilities materialized (and kept for
    backward): the path that applies dropout to them. Queries go in chunks of
    C = clamp(W, MIN_CHUNK, max_chunk) (one chunk when W >= Tq), each scoring C + W - 1 keys.
    """
    b, h, t, dh = q.shape
    tk = k.shape[2]
    n_mem = tk - t
    w = span_window(z, ramp, max_span)                                      # distances 0 .. w-1
    c = t if w >= t else max(MIN_CHUNK, min(w, max_chunk))
    n_chunks = -(-t // c)
    tp = n_chunks * c
    lo = n_mem - (w - 1)                                                    # key index of the oldest key needed
    start = max(0, lo)
    # Several chunks: every chunk's band starts W - 1 keys before it (left-padded with invalid
    # keys). One chunk (W >= T): just the keys from ``start``, no padding.
    pad_left = max(0, -lo) if n_chunks > 1 else 0
    off = n_mem - (start - pad_left)                                        # W - 1, or <= W - 1 for one chunk
    width = c + off                                                         # keys per chunk
    pad_right = tp - t

    def band(x: Tensor) -> Tensor:                                          # (B, H, Tk, dh) -> (B, H, nC, dh, width)
        x = F.pad(x[:, :, start:], (0, 0, pad_left, pad_right))
        return x.unfold(2, width, c)

    kc, vc = band(k), band(v)
    qc = F.pad(q, (0, 0, 0, pad_right)).view(b, h, n_chunks, c, dh)
    # Key validity along the padded band: padding is invalid, then the caller's mask.
    valid = torch.ones(1 if key_valid is None else b, tk - start, dtype=torch.bool, device=q.device)
    if key_valid is not None:
        valid = key_valid[:, start:]
    valid = F.pad(valid, (pad_left, pad_right), value=False).unfold(1, width, c)     # (B|1, nC, width)
    # Within a chunk, query a and band key j are at distance x = off + a - j, the same in every chunk.
    a_idx = torch.arange(c, device=q.device)[:, None]
    j_idx = torch.arange(width, device=q.device)[None, :]
    dist = off + a_idx - j_idx                                              # (C, width)
    in_band = (dist >= 0) & (dist < w)
    allowed = in_band & (valid[:, None, :, None, :] | (dist == 0))          # (B|1, 1, nC, C, width)
    if z.dim() == 1:
        zz = z.to(q.dtype)[None, :, None, None, None]
    else:                                                                   # (B, H, Tq) -> (B, H, nC, C, 1)
        zz = F.pad(z.to(q.dtype), (0, pad_right)).view(b, h, n_chunks, c, 1)
    mask = span_mask(dist.to(q.dtype), zz, ramp)
    keep = allowed & (mask > 0)
    log_mask = torch.where(keep, torch.log(torch.where(keep, mask, torch.ones_like(mask))),
                           torch.full_like(mask, float("-inf")))
    scores = torch.einsum("bhncd,bhnds->bhncs", qc, kc) * scale + log_mask
    probs = softmax32(scores)
    if dropout > 0 and training:
        probs = F.dropout(probs, dropout)
    out = torch.einsum("bhncs,bhnds->bhncd", probs, vc)
    return out.reshape(b, h, tp, dh)[:, :, :t]


def use_flex_span(q: Tensor, dropout: float, training: bool) -> bool:
    """The FlexAttention path (``flex_span.flex_adaptive_span``) runs for CUDA tensors when flex_attention is
    available, without dropout in training, for head sizes it compiles (16..256, a power of two) and at least
    ``FLEX_MIN_LEN`` queries (shorter segments stay on the banded path, cheap there and no compile)."""
    return q.shape[2] >= FLEX_MIN_LEN and flex_eligible(q, dropout, training)


@register("attention", "adaptive_span")
class AdaptiveSpanAttention(Attention):
    """Adaptive attention span (Sukhbaatar et al. 2019, eq. 3 soft mask, sec. 2.3 dynamic span).

    a_ij = m_z(i - j) exp(s_ij) / sum_k m_z(i - k) exp(s_ik),  m_z(x) = clamp((R + z - x) / R, 0, 1);
    per-head learned z_h = S * p_h (p_h in [0, 1]) or z_t = S * sigmoid(v_h^T x_t + b_h);
    aux loss: penalty * mean(z). Only keys at distance < min(S, ceil(R + max z)) are computed.
    info["span"][layer]: (H,) span per head (mean over tokens when dynamic);
    info["span_window"][layer]: keys per query actually computed.
    """

    supports_bidirectional = False
    flex_z_grad = "analytic"
    """span gradient of the CUDA FlexAttention path: "analytic" (ramp pass) or "captured" (flex's own)"""
    causal_note = "The span is a distance into the past."
    position_hooks = frozenset({"input", "rotary"})

    def __init__(self, cfg: EncoderConfig, layer: int, position):
        super().__init__(cfg, layer, position)
        acfg = cfg.adaptive_span
        self.max_span, self.ramp, self.penalty, self.dynamic = acfg.max_span, acfg.ramp, acfg.penalty, acfg.dynamic
        if self.dynamic:
            self.span_proj = nn.Linear(cfg.d_model, cfg.n_heads)
            nn.init.zeros_(self.span_proj.weight)
            nn.init.constant_(self.span_proj.bias, math.log(acfg.init / (1 - acfg.init)))
        else:
            self.span_frac = nn.Parameter(torch.full((cfg.n_heads,), float(acfg.init)))

    @classmethod
    def validate(cls, cfg: EncoderConfig) -> None:
        a = cfg.adaptive_span
        if a.max_span < 1:
            raise ValueError(f"adaptive_span.max_span must be >= 1 (largest attention distance S), got {a.max_span}")
        if a.ramp < 1:
            raise ValueError(f"adaptive_span.ramp must be >= 1 (length R of the soft mask's ramp), got {a.ramp}")
        lo = 0.0 if not a.dynamic else 1e-6
        if not lo <= a.init <= 1.0 or (a.dynamic and a.init >= 1.0):
            raise ValueError(f"adaptive_span.init is the initial span as a fraction of max_span and must be in "
                             f"{'(0, 1)' if a.dynamic else '[0, 1]'}; got {a.init}")
        if a.penalty < 0:
            raise ValueError(f"adaptive_span.penalty (L1 weight on spans) must be >= 0, got {a.penalty}")

    def spans(self, x: Optional[Tensor]) -> Tensor:
        """(H,) static spans, or (B, H, T) dynamic spans from the query source x (B, T, D)."""
        if self.dynamic:
            return self.max_span * torch.sigmoid(self.span_proj(x)).transpose(1, 2)
        return self.max_span * _ProjectedClamp.apply(self.span_frac)

    def qkv(self, x: Tensor, kv: Tensor, ctx: AttentionContext) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = self.project(x, kv)
        if self.position is not None and "rotary" in self.position.hooks:
            q, k = self.position.rotate(q, k, ctx.q_index, ctx.k_index)
        return q, k, v

    def forward(self, x: Tensor, kv: Tensor, ctx: AttentionContext) -> tuple[Tensor, dict]:
        q, k, v = self.qkv(x, kv, ctx)
        out, state = self.attend_with_spans(q, k, v, ctx, self.spans(x))
        return self.out_proj(merge_heads(out)), state

    def attend(self, q, k, v, ctx):
        if self.dynamic:
            raise ValueError("adaptive_span with dynamic=True computes spans from the query tokens; call the "
                             "module (forward(x, kv, ctx)), not attend(q, k, v, ctx)")
        return self.attend_with_spans(q, k, v, ctx, self.spans(None))

    def attend_with_spans(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext, z: Tensor):
        if use_flex_span(q, self.dropout, self.training):
            out = flex_adaptive_span(q, k, v, ctx.key_valid, self.scale, z, self.ramp, self.max_span,
                                     z_grad=self.flex_z_grad)
        else:
            out = banded_adaptive_span(q, k, v, ctx.key_valid, self.scale, z, self.ramp, self.max_span,
                                       self.dropout, self.training, max_scores=self.cfg.adaptive_span.max_scores)
        ctx.aux.add(self.penalty * z.float().mean())
        info, zd = ctx.aux.info, z.detach()
        info.setdefault("span", {})[ctx.layer] = zd if zd.dim() == 1 else zd.mean(dim=(0, 2))
        if zd.dim() > 1:
            info.setdefault("span_per_token", {})[ctx.layer] = zd
        info.setdefault("span_window", {})[ctx.layer] = span_window(zd, self.ramp, self.max_span)
        return out, {}

    def reference(self, x: Tensor, kv: Tensor, ctx: AttentionContext, eps: float = 0.0) -> Tensor:
        """The same layer through ``adaptive_span_reference`` (dense scores, explicit masks)."""
        q, k, v = self.qkv(x, kv, ctx)
        out = adaptive_span_reference(q, k, v, ctx.allowed(), self.scale, self.spans(x), self.ramp, self.max_span,
                                      ctx.q_index, ctx.k_index, eps, self.dropout, self.training)
        return self.out_proj(merge_heads(out))

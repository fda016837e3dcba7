"""FlexAttention fast path of adaptive attention span (Sukhbaatar et al. 2019), CUDA.

The soft mask m_z(x) = clamp((R + z - x) / R, 0, 1) multiplies exp(s) before renormalizing, which is
the same as adding log m_z(i - j) to the score (eq. 3 and the paper's code):

    a_ij = m_z(x) exp(s_ij) / sum_k m_z(x_k) exp(s_ik) = softmax_j(s_ij + log m_z(x_ij)),   x = i - j.

``flex_adaptive_span`` is one compiled ``flex_attention`` call: a banded BlockMask (key blocks holding
distances 0 <= x < W, W = min(S, ceil(R + max z)) rounded up to the block size, built from band
``kv_num_blocks`` / ``kv_indices`` without any (Tq, Tk) evaluation and cached per shape / W / device; while a
CUDA graph is captured, W is computed from z on the device and the band rebuilt there on every replay),
a mask_mod that keeps exactly the pairs of the dense reference (causal, x < S, m > 0, valid keys or the
own key), and a score_mod that adds log(clamp(u, 1e-30, 1)), u = (R + z - x) / R (finite: the pairs
with u <= 0 are removed by the mask_mod, never by the score); for static spans it reads that term from an
(H, S) table made once per call (``span_log_table``) instead of computing a log per score. z is read from a
captured float32 tensor: (H,) static spans, or (B, H, Tq) per-query dynamic spans (sec. 2.3).

Span gradient (``z_grad``):
- ``"analytic"`` (default): flex gets z detached; the gradient comes from one more banded flex
  forward over the ramp. With P_ij = exp(s_ij + log m_ij - lse_i) and D_i = dO_i . O_i the bias gradient
  is P_ij (dO_i . v_j - D_i), and d log m / dz = 1 / (R u) on the ramp 0 < u <= 1, so
  P_ij / (R u_ij) = exp(s_ij - lse_i) / R there: the span gradient needs only plain attention over
  the ramp keys,

      dL/dz_i = exp(lse2_i - lse_i) / R * (dO_i . O2_i - D_i),

  (O2_i, lse2_i) = flex attention of the plain scores over the keys with 0 <= u <= 1. That is
  exact, deterministic, O(T (R + block)) work, and at u = 0 (integer R + z) it is the one-sided
  derivative the dense reference's autograd gives (clamp passes its gradient at the bounds), which a
  masked key cannot give.
- ``"captured"``: z is captured with its autograd history and FlexAttention's own backward returns
  its gradient (captured buffers that require grad, "learnable biases", pytorch PR #137452, are in
  torch 2.11 and 2.13: the compiled backward scatters d score_mod / d buffer times the score gradient
  into them with tl.atomic_add, non-deterministic, and for (H,) spans every score of a head adds into
  one address; at u = 0 a masked key gives 0, not the one-sided derivative). Kept to compare speed.

``band_block_mask`` and ``flex_adaptive_span`` take ``flex``/``block`` arguments so the CPU tests run
the eager ``flex_attention`` forward at small block sizes; FlexAttention has no backward on CPU.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from rlformer.attention.compiled import fused, fusion_enabled
from rlformer.attention.flex import BLOCK, _cached, _flex, capturing, flex_with_lse, with_mask_mod
LOG_FLOOR = 1e-30
"""m is clamped at this floor before the log (only reached where u > 0 is rounding-small)"""


def band_blocks(tq: int, tk: int, n_mem: int, lo: int | Tensor, hi: int | Tensor, block: int,
                device: Optional[torch.device] = None) -> tuple[Tensor, Tensor]:
    """Key blocks of a banded causal mask: (kv_num_blocks (1, 1, nQ), kv_indices (1, 1, nQ, nK)) int32.

    Query i sits at key index n_mem + i; the row of query block b lists the key blocks holding some key
    at distance lo <= x < hi (x = n_mem + i - j >= 0) from some query of the block, in ascending order.
    Computed from block boundaries only (O(nQ nK) integers, no (Tq, Tk) tensor), on ``device`` (no
    host-to-device copy, so a band first needed inside a CUDA graph capture can still be built). ``lo`` /
    ``hi`` may be 0-dim integer tensors on ``device`` (bounds computed from the spans on the device).
    """
    nq, nk = -(-tq // block), -(-tk // block)
    qb = torch.arange(nq, device=device)
    lo0 = lo.clamp(min=0) if isinstance(lo, Tensor) else max(lo, 0)
    q_first = n_mem + qb * block                                   # key index of the block's first query
    q_last = n_mem + torch.clamp((qb + 1) * block, max=tq) - 1
    k_lo = torch.clamp(q_first - (hi - 1), min=0)                  # oldest key with x <= hi - 1
    k_hi = torch.clamp(q_last - lo0, max=tk - 1)                   # newest key with x >= lo
    empty = (k_hi < k_lo) | (hi <= lo0)
    b_lo, b_hi = k_lo // block, k_hi // block
    num = torch.where(empty, 0, b_hi - b_lo + 1)
    idx = torch.clamp(b_lo[:, None] + torch.arange(nk, device=device)[None, :], max=nk - 1)
    return num.to(torch.int32)[None, None], idx.to(torch.int32)[None, None]


def band_block_mask(tq: int, tk: int, n_mem: int, lo: int | Tensor, hi: int | Tensor, device: torch.device,
                    block: int = BLOCK):
    """BlockMask (no mask_mod) of ``band_blocks``; attach the exact mask with ``with_mask_mod``. Integer bounds:
    cached, ``lo``/``hi`` rounded outwards to the block size so spans that move a little reuse it. Tensor
    bounds (``span_bounds`` while a CUDA graph is captured): built on the device on every call, so a replayed
    graph follows the spans' current values."""
    from torch.nn.attention.flex_attention import BlockMask

    def build(lo=lo, hi=hi):
        num, idx = band_blocks(tq, tk, n_mem, lo, hi, block, device)
        return BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=block, seq_lengths=(tq, tk))

    if isinstance(lo, Tensor) or isinstance(hi, Tensor):
        return build()
    lo = max(0, lo) // block * block
    hi = -(-hi // block) * block
    return _cached(("span_band", tq, tk, n_mem, lo, hi, block, str(device)), lambda: build(lo, hi))


def _z32(z: Tensor) -> Tensor:
    """Spans in at least float32 (bf16 spans would move the ramp; float64 stays float64)."""
    return z.to(torch.promote_types(z.dtype, torch.float32))


def _span_of(z: Tensor) -> Callable:
    """(b, h, q_idx) -> span: z[h] for (H,) spans, z[b, h, q_idx] for (B, H, Tq) ones."""
    if z.dim() == 1:
        return lambda b, h, q_idx: z[h]
    return lambda b, h, q_idx: z[b, h, q_idx]


def span_mask_mod(z: Tensor, key_valid: Optional[Tensor], n_mem: int, ramp: int, max_span: int,
                  ramp_only: bool = False) -> Callable:
    """Pairs of the dense reference with m_z(x) > 0: 0 <= x < S, R + z - x > 0, and a valid key or the own
    key. ``ramp_only``: the span-gradient pass, 0 <= R + z - x <= R (0 <= u <= 1, clamp's gradient support)."""
    span = _span_of(z)

    def mask_mod(b, h, q_idx, kv_idx):
        x = q_idx + n_mem - kv_idx
        d = (span(b, h, q_idx) + ramp) - x                         # R u, float32
        ok = (x >= 0) & (x < max_span)
        ok = ok & (d >= 0) & (d <= ramp) if ramp_only else ok & (d > 0)
        if key_valid is not None:
            ok = ok & (key_valid[b, kv_idx] | (x == 0))
        return ok

    return mask_mod


def span_score_mod(z: Tensor, n_mem: int, ramp: int) -> Callable:
    """score + log m_z(x), m clamped to [LOG_FLOOR, 1] (finite; the mask_mod removes m = 0)."""
    span = _span_of(z)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + _log_m(span(b, h, q_idx), q_idx + n_mem - kv_idx, ramp)

    return score_mod


def _log_m(z, x, ramp: int):
    """log m_z(x) = log clamp((R + z - x) / R, LOG_FLOOR, 1): the score term of the soft mask."""
    return torch.log(torch.clamp(((z + ramp) - x) / ramp, LOG_FLOOR, 1.0))


def span_log_table(z: Tensor, ramp: int, max_span: int) -> Tensor:
    """(H, S) table of log m_z(x) = log clamp((R + z_h - x) / R, LOG_FLOOR, 1), x = 0 .. S - 1, for static (H,)
    spans: the same float math as ``span_score_mod``, done once per call instead of once per score."""
    x = torch.arange(max(1, max_span), device=z.device, dtype=z.dtype)
    return _log_m(z[:, None], x[None, :], ramp)


def span_table_score_mod(table: Tensor, n_mem: int) -> Callable:
    """score + table[h, x] (``span_log_table``; x clamped into the table, the mask_mod removes x outside [0, S)).
    Inside the kernel a table read replaces span_score_mod's divide, clamp and log: the log (libdevice, not a
    hardware approximation) made the band's forward ~4.5x slower (``scripts/bench_flex_span.py``)."""
    last = table.shape[1] - 1

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + table[h, torch.clamp(q_idx + n_mem - kv_idx, 0, last)]

    return score_mod


TABLE_KERNEL_OPTIONS = {"BLOCK_M": 64, "BLOCK_N": 64}
"""FlexAttention forward tiles of the table score_mod's call on CUDA: with the default tiles its kernel needed 245760 B
of shared memory (H100 limit 232448: "No valid triton configs"); 64 x 64 compiles and gave the fastest
forward+backward of four configs at 16k (``scripts/bench_flex_span.py --table-options``: 1.48-1.64 ms vs 1.99-2.03
with the per-score log)."""


def span_bounds(z: Tensor, ramp: int, max_span: int) -> tuple[int | Tensor, int | Tensor]:
    """(lowest distance on any ramp, W): the ramp is floor(min z) <= x <= R + max z; W = min(S, ceil(R + max z)).

    Python ints read from z (a host sync); while a CUDA graph is captured (no host reads), 0-dim long tensors
    computed on the device instead, so the captured band follows the spans at every replay (not the widest
    band S: the work of a replay stays proportional to the learned spans, as the paper intends)."""
    zd = z.detach()
    if capturing(zd) and zd.numel():
        lo = zd.min().floor().clamp(min=0).long()
        return lo, (zd.max() + ramp).ceil().clamp(1, max(1, max_span)).long()
    z_min, z_max = (float(zd.min()), float(zd.max())) if zd.numel() else (0.0, 0.0)
    return max(0, math.floor(z_min)), max(1, min(max_span, math.ceil(ramp + z_max)))


def _dot_difference(g: Tensor, a: Tensor, b: Tensor, acc: torch.dtype, rows: int = 1 << 16) -> Tensor:
    """g . a - g . b over the last dim in ``acc`` precision, ``rows`` rows at a time (bounded temporaries)."""
    shape = g.shape[:-1]
    g, a, b = (x.reshape(-1, x.shape[-1]) for x in (g, a, b))
    out = torch.empty(g.shape[0], dtype=acc, device=g.device)
    for i in range(0, g.shape[0], rows):
        gi = g[i:i + rows].to(acc)
        out[i:i + rows] = (gi * a[i:i + rows].to(acc)).sum(-1) - (gi * b[i:i + rows].to(acc)).sum(-1)
    return out.view(shape)


def span_z_grad(q: Tensor, k: Tensor, v: Tensor, key_valid: Optional[Tensor], scale: float, z: Tensor, ramp: int,
                max_span: int, out: Tensor, lse: Tensor, grad_out: Tensor, flex=None, block: int = BLOCK) -> Tensor:
    """dL/dz of the adaptive-span attention (shape of z) from its output, lse and the output gradient.

    dL/dz_i = exp(lse2_i - lse_i) / R * (dO_i . O2_i - dO_i . O_i), with (O2, lse2) the plain attention over the
    ramp keys 0 <= u <= 1 (module docstring). Static spans sum this over batch and queries.
    """
    flex = flex or _flex()[0]
    tq, tk = q.shape[2], k.shape[2]
    n_mem = tk - tq
    zf = _z32(z.detach())
    lo, w = span_bounds(zf, ramp, max_span)
    hi = (w + 1).clamp(max=max_span) if isinstance(w, Tensor) else min(max_span, w + 1)
    bm = band_block_mask(tq, tk, n_mem, lo, hi, q.device, block)
    bm = with_mask_mod(bm, span_mask_mod(zf, key_valid, n_mem, ramp, max_span, ramp_only=True))
    with torch.no_grad():
        out2, lse2 = flex_with_lse(flex, q.detach(), k.detach(), v.detach(), block_mask=bm, scale=scale)
        acc = torch.promote_types(out.dtype, torch.float32)
        if grad_out.is_cuda and fusion_enabled():     # one fused reduction kernel, no float32 copies
            dz = fused(_span_grad_rows, grad_out)(grad_out, out2, out, lse2, lse, ramp, acc)
        else:
            dz = _span_grad_rows(grad_out, out2, out, lse2, lse, ramp, acc, _dot_difference(grad_out, out2, out, acc))
    return (dz.sum((0, 2)) if z.dim() == 1 else dz).to(z.dtype)


def _span_grad_rows(grad_out: Tensor, out2: Tensor, out: Tensor, lse2: Tensor, lse: Tensor, ramp: int,
                    acc: torch.dtype, diff: Optional[Tensor] = None) -> Tensor:
    """dL/dz_i = exp(lse2_i - lse_i) / R * (dO_i . O2_i - dO_i . O_i) in ``acc`` precision (0 where no ramp key);
    ``diff`` = the two dots when already computed (the CPU path does it in bounded row chunks)."""
    if diff is None:
        g = grad_out.to(acc)
        diff = (g * out2.to(acc)).sum(-1) - (g * out.to(acc)).sum(-1)
    return torch.where(torch.isfinite(lse2), torch.exp(lse2.to(acc) - lse.to(acc)) * diff / ramp, 0.0)


class _SpanGrad(torch.autograd.Function):
    """Identity on the flex output that adds the span gradient (``span_z_grad``) in backward."""

    @staticmethod
    def forward(ctx, out, z, lse, q, k, v, key_valid, scale, ramp, max_span, flex, block):
        ctx.save_for_backward(out, lse, q, k, v, z.detach(), *(() if key_valid is None else (key_valid,)))
        ctx.args = (scale, ramp, max_span, flex, block)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        out, lse, q, k, v, z, *valid = ctx.saved_tensors
        scale, ramp, max_span, flex, block = ctx.args
        dz = None
        if ctx.needs_input_grad[1]:
            dz = span_z_grad(q, k, v, valid[0] if valid else None, scale, z, ramp, max_span, out, lse, grad_out,
                             flex, block)
        return (grad_out, dz) + (None,) * 10


def flex_adaptive_span(q: Tensor, k: Tensor, v: Tensor, key_valid: Optional[Tensor], scale: float, z: Tensor,
                       ramp: int, max_span: int, z_grad: str = "analytic", flex=None, block: int = BLOCK) -> Tensor:
    """Causal adaptive-span attention with one FlexAttention call; same result as ``adaptive_span_reference``
    with the causal mask and eps = 0 (see the module docstring).

    q: (B, H, Tq, dh); k, v: (B, H, Tk, dh) with the queries the last Tq keys (XL memory first);
    ``key_valid``: (B, Tk) bool or None (a query always sees its own key); z: (H,) or (B, H, Tq) spans.
    ``flex``: the flex_attention to call (default: the compiled one of ``rlformer.attention.flex``).
    """
    if z_grad not in ("analytic", "captured"):
        raise ValueError(f"z_grad must be 'analytic' or 'captured', got {z_grad!r}")
    flex = flex or _flex()[0]
    tq, tk = q.shape[2], k.shape[2]
    n_mem = tk - tq
    valid = None if key_valid is None else key_valid.to(device=q.device, dtype=torch.bool)
    z_det = _z32(z.detach())
    _, w = span_bounds(z_det, ramp, max_span)
    bm = with_mask_mod(band_block_mask(tq, tk, n_mem, 0, w, q.device, block),
                       span_mask_mod(z_det, valid, n_mem, ramp, max_span))
    analytic = z_grad == "analytic" or not (torch.is_grad_enabled() and z.requires_grad)
    table = analytic and z.dim() == 1        # static spans, no gradient through the score_mod: a table of log m
    if table:
        score_mod = span_table_score_mod(span_log_table(z_det, ramp, max_span), n_mem)
    else:
        score_mod = span_score_mod(z_det if analytic else _z32(z), n_mem, ramp)
    needs_z = analytic and torch.is_grad_enabled() and z.requires_grad
    extra = {"kernel_options": TABLE_KERNEL_OPTIONS} if table and q.is_cuda else {}
    if not needs_z:
        return flex(q, k, v, score_mod=score_mod, block_mask=bm, scale=scale, **extra)
    out, lse = flex_with_lse(flex, q, k, v, score_mod=score_mod, block_mask=bm, scale=scale, **extra)
    return _SpanGrad.apply(out, z, lse.detach(), q.detach(), k.detach(), v.detach(), valid, scale, ramp, max_span,
                           flex, block)

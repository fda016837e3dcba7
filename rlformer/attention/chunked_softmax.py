"""Memory-lean chunked softmax attention: the fast path of lsh, routing and adaptive_span.

Queries sit in "slots" of rows (one row per (round, batch, head)); a row is cut into chunks of C
slots, and chunk c attends to the slots of chunks c - before .. c + after of its row (a window of
W = (before + 1 + after) * C keys) with an additive bias b_ij that masks, penalizes or re-weights
(Kitaev et al. 2020 sec. 2 for the sorted-bucket layout; Sukhbaatar et al. 2019 eq. 3 for a
soft span mask, log m_z). Rounds are combined as in Reformer,
o_i = sum_r exp(lse_i^r - lse_i) o_i^r, lse_i = log sum_r exp(lse_i^r).

``ChunkedSoftmax`` is a torch.autograd.Function that keeps no score or probability tensor for
backward: forward runs groups of chunks one after another (at most ``max_scores`` scores at a
time) and saves only q, k, v, the combined output and its log-normalizer lse (plus integer
layout tables); backward recomputes each group's probabilities from lse. Because the combined
probability of key j for query i is exp(s_ij + b_ij - lse_i) in whichever round it appears,
every group's backward is a plain attention backward with the combined output and lse:
ds_ij = p_ij (g_i . v_j - g_i . o_i), which is what the fused kernels compute when given the
combined output and lse. Per group, on (G, 1, C, dh) queries and (G, 1, W, dh) keys / values:

- CUDA (float32, bfloat16): ``aten._scaled_dot_product_efficient_attention`` (forward with the
  log-sum-exp) and its backward (which also returns the bias gradient, for learned spans);
- CPU (float32, float64, bfloat16): ``aten._scaled_dot_product_flash_attention_for_cpu`` and its
  backward (no bias gradient: learned biases use the math kernel on CPU);
- otherwise (float16, CUDA float64, missing ops): ``"math"``, the same formulas in plain torch
  with float32 (or float64) scores.

Masked entries get a finite bias ``MASKED`` (-1e30), never -inf, and every query row keeps at
least one unmasked key (its own slot), so no kernel sees an empty row. Empty query slots
(padding of a row) are computed but never written: their output goes to a dummy row and their
gradient is zero.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

MASKED = -1e30
"""bias of a masked (query, key) pair: finite, so that a row of masked keys stays well defined"""

KERNELS = ("efficient", "flash_cpu", "math")


def pick_kernel(x: Tensor, bias_grad: bool = False) -> str:
    """The fused kernel for ``x``'s device and dtype (see the module docstring), else ``"math"``."""
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float64):
        return "math"          # float16: the -1e30 mask and the 1e5 self penalty overflow its bias
    ops = torch.ops.aten
    if x.device.type == "cuda":
        ok = x.dtype != torch.float64 and x.shape[-1] % 8 == 0
        return "efficient" if ok and hasattr(ops, "_scaled_dot_product_efficient_attention_backward") else "math"
    if x.device.type == "cpu" and not bias_grad and hasattr(ops, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        return "flash_cpu"
    return "math"


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def bias_dtype(kernel: str, dtype: torch.dtype) -> torch.dtype:
    """The fused kernels take the bias in the inputs' dtype; the math kernel adds it in float32/64."""
    return dtype if kernel != "math" else _acc(dtype)


def kernel_forward(kernel: str, q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scale: float):
    """q (G, 1, C, dh), k / v (G, 1, W, dh), bias (G, 1, C, W) -> out (G, 1, C, dh), lse (G, 1, C), extra."""
    c = q.shape[2]
    if kernel == "efficient":
        out, lse, seed, offset = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, _aligned(bias), True, 0.0, False, scale=scale)
        return out, lse[..., :c], (seed, offset)
    if kernel == "flash_cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=bias,
                                                                              scale=scale)
        return out, lse, None
    acc = _acc(q.dtype)
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale + bias
    lse = torch.logsumexp(s, dim=-1)
    out = torch.matmul(torch.exp(s - lse[..., None]).to(v.dtype), v)
    return out, lse, None


def kernel_backward(kernel: str, g: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Tensor, out: Tensor,
                    lse: Tensor, scale: float, extra=None, bias_grad: bool = False):
    """Gradients of attention with the given ``out`` and ``lse`` (which need not be this call's own:
    see the module docstring). Returns dq, dk, dv, d bias (None unless ``bias_grad``)."""
    c = q.shape[2]
    if kernel == "efficient":
        seed, offset = extra
        lse = F.pad(lse, (0, -c % 32)).contiguous()
        dq, dk, dv, db = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            g, q, k, v, _aligned(bias), out, lse, seed, offset, 0.0, [True, True, True, bias_grad], False,
            scale=scale)
        return dq, dk, dv, (db[..., :bias.shape[-1]] if bias_grad else None)
    if kernel == "flash_cpu":
        if bias_grad:
            raise ValueError("the CPU flash kernel returns no bias gradient; use kernel='math'")
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            g, q, k, v, out, lse.to(out.dtype) if out.dtype == torch.float64 else lse, 0.0, False, attn_mask=bias,
            scale=scale)
        return dq, dk, dv, None
    acc = _acc(q.dtype)
    qa, ka, va, ga = q.to(acc), k.to(acc), v.to(acc), g.to(acc)
    p = torch.exp(torch.matmul(qa, ka.transpose(-1, -2)) * scale + bias - lse[..., None])
    dv = torch.matmul(p.transpose(-1, -2), ga)
    ds = p * (torch.matmul(ga, va.transpose(-1, -2)) - (ga * out.to(acc)).sum(-1, keepdim=True))
    dq = torch.matmul(ds, ka) * scale
    dk = torch.matmul(ds.transpose(-1, -2), qa) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), (ds if bias_grad else None)


def _aligned(bias: Tensor) -> Tensor:
    """The memory-efficient CUDA kernel reads bias rows with 16-element aligned strides."""
    w = bias.shape[-1]
    return bias if w % 16 == 0 else F.pad(bias, (0, -w % 16))[..., :w]


# ------------------------------------------------------------------------------ layout


class RowIndex:
    """Row numbers of (b, h, t) in a (B, H, T, dh) tensor viewed as (rows, dh) without copying it.

    Works for any strides with a contiguous last dim and the other strides multiples of dh
    (e.g. the (B, T, H, dh) storage that ``split_heads`` makes); anything else is copied once.
    """

    def __init__(self, x: Tensor):
        d = x.shape[-1]
        if x.stride(-1) != 1 or any(s % d for s in x.stride()[:3]):
            x = x.contiguous()
        self.strides = [s // d for s in x.stride()[:3]]
        rows = sum((n - 1) * s for n, s in zip(x.shape[:3], self.strides)) + 1
        self.flat = x.as_strided((rows, d), (d, 1))

    def rows(self, b: Tensor, h: Tensor, t: Tensor) -> Tensor:
        sb, sh, st = self.strides
        return b * sb + h * sh + t * st

    def take(self, rows: Tensor) -> Tensor:
        """(..., dh) copy of the rows ``rows`` (any shape)."""
        return self.flat.index_select(0, rows.reshape(-1))


class ChunkLayout:
    """Rows of slots cut into chunks; each chunk attends to its window of neighbouring chunks.

    ``src``: (P, L) long, the key index (0..T-1) each slot of each row holds, T for an empty slot;
    rows are ordered (round, batch, head), P = R * B * H, L a multiple of ``chunk``. Queries are
    the keys from ``q_offset`` on (query i = key q_offset + i, the [memory; segment] layout);
    a slot holding an earlier key, or none, is no query. Chunks whose first slot is no query are
    skipped, so a run of queries must start on a chunk boundary.
    """

    def __init__(self, src: Tensor, batch: int, heads: int, length: int, chunk: int, before: int, after: int,
                 q_offset: int = 0):
        self.src, self.b, self.h, self.t, self.q_offset = src, batch, heads, length, q_offset
        self.c, self.before, self.after = chunk, before, after
        self.n = src.shape[1] // chunk
        self.w = (before + 1 + after) * chunk
        self.rounds = src.shape[0] // (batch * heads)

    def windows(self, x: Tensor, fill) -> Tensor:
        """(P, L) per-slot values -> (P, n, W) view: chunk c's window (chunks c - before .. c + after)."""
        c = self.c
        return F.pad(x, (self.before * c, self.after * c), value=fill).unfold(1, self.w, c)

    def used_chunks(self) -> list[Tensor]:
        """Per round, the flat ids (row * n + chunk) of the chunks that hold queries."""
        first = self.src.view(-1, self.n, self.c)[:, :, 0]                         # (P, n)
        per_round = ((first != self.t) & (first >= self.q_offset)).view(self.rounds, -1)
        span = per_round.shape[1]
        return [per_round[r].nonzero()[:, 0] + r * span for r in range(self.rounds)]


class Group:
    """One batch of chunks: ids (G,), their row / batch / head (G, 1), the key index of each query
    slot (G, C) and key slot (G, W) (T = empty), and the rows to read and write."""

    def __init__(self, layout: ChunkLayout, ids: Tensor, kwin: Tensor, round_: int):
        t, off, heads = layout.t, layout.q_offset, layout.h
        tq = t - off
        self.ids, self.round = ids, round_
        self.row, self.chunk = ids // layout.n, ids % layout.n
        bh = (self.row % (layout.b * heads))[:, None]
        self.bi, self.hi = bh // heads, bh % heads
        self.qpos = layout.src.view(-1, layout.c)[ids]                              # (G, C)
        self.kpos = kwin[self.row, self.chunk]                                      # (G, W)
        self.qempty = (self.qpos == t) | (self.qpos < off)
        self.qidx = (self.qpos - off).clamp(0, tq - 1)                               # query index to read
        self.kidx = self.kpos.clamp(max=t - 1)
        # rows in (B, T, H) order, where outputs and gradients are written; empty slots -> a dummy row
        self.dest = torch.where(self.qempty, layout.b * tq * heads, (self.bi * tq + self.qidx) * heads + self.hi)
        self.kdest = torch.where(self.kpos == t, layout.b * t * heads, (self.bi * t + self.kidx) * heads + self.hi)


def _split(ids: Tensor, size: int) -> Sequence[Tensor]:
    return ids.split(size) if ids.numel() else []


class ChunkedSoftmax(torch.autograd.Function):
    """out = sum over rounds of chunk-window softmax attention, recomputed per group in backward.

    ``layout``: ChunkLayout; ``bias``: an object with ``tensors`` (a list, saved for backward),
    ``prepare(layout)`` / ``release()`` (derive and drop per-pass tables), ``__call__(group, dtype,
    *params) -> (G, 1, C, W)`` and, when ``params`` need gradients, ``backward(group, grad_bias,
    *params) -> grads of params``. q: (B, H, Tq, dh), k, v: (B, H, T, dh), Tq = T - q_offset.
    Returns (B, H, Tq, dh) in the (B, Tq, H, dh) storage that merge_heads reshapes for free.
    Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, layout, bias, scale, max_scores, kernel, q, k, v, *params):
        bsz, heads, tq, dh = q.shape
        rows_q, rows_k, rows_v = RowIndex(q), RowIndex(k), RowIndex(v)
        n_out = bsz * tq * heads
        multi = layout.rounds > 1
        acc = _acc(q.dtype)
        out = q.new_zeros(n_out + 1, dh, dtype=acc if multi else q.dtype)        # + a dummy row for empty slots
        lse = q.new_full((n_out + 1,), float("-inf"), dtype=acc)
        kwin = layout.windows(layout.src, layout.t)
        used = layout.used_chunks()
        bias.prepare(layout)
        size = max(1, min(max_scores // (layout.c * layout.w), 32768))
        extra = None
        for r, ids in enumerate(used):
            for part in _split(ids, size):
                grp = Group(layout, part, kwin, r)
                qc, kw, vw = _gather(grp, layout, rows_q, rows_k, rows_v)
                o, s, extra = kernel_forward(kernel, qc, kw, vw, bias(grp, bias_dtype(kernel, q.dtype), *params),
                                             scale)
                dest = grp.dest.view(-1)
                o, s = o.reshape(-1, dh), s.reshape(-1).to(acc)
                if multi:                                                           # online logsumexp over rounds
                    old = lse.index_select(0, dest)
                    top = torch.maximum(old, s)
                    w_old, w_new = torch.exp(old - top), torch.exp(s - top)
                    total = w_old + w_new
                    o = (out.index_select(0, dest) * w_old[:, None] + o.to(acc) * w_new[:, None]) / total[:, None]
                    s = top + torch.log(total)
                out.index_copy_(0, dest, o.to(out.dtype))
                lse.index_copy_(0, dest, s)
        bias.release()
        out = out[:n_out].to(q.dtype)
        ctx.layout, ctx.bias, ctx.scale, ctx.max_scores, ctx.kernel, ctx.extra = \
            layout, bias, scale, max_scores, kernel, extra
        ctx.save_for_backward(q, k, v, out, lse, layout.src, *used, *bias.tensors, *params)
        ctx.n_used, ctx.n_bias = len(used), len(bias.tensors)
        layout.src, bias.tensors = None, None                       # held by the saved tensors only
        return out.view(bsz, tq, heads, dh).transpose(1, 2)

    @staticmethod
    def backward(ctx, g):
        q, k, v, out, lse, src, *rest = ctx.saved_tensors
        used, rest = rest[:ctx.n_used], rest[ctx.n_used:]
        bias_tensors, params = rest[:ctx.n_bias], rest[ctx.n_bias:]
        layout, bias, kernel, scale = ctx.layout, ctx.bias, ctx.kernel, ctx.scale
        layout.src, bias.tensors = src, list(bias_tensors)
        bsz, heads, tq, dh = q.shape
        t = layout.t
        rows_q, rows_k, rows_v, rows_g = RowIndex(q), RowIndex(k), RowIndex(v), RowIndex(g)
        n_out, n_key = bsz * tq * heads, bsz * t * heads
        grads = [torch.zeros(n + 1, dh, dtype=x.dtype, device=x.device) for n, x in ((n_out, q), (n_key, k),
                                                                                      (n_key, v))]
        param_grads = [torch.zeros_like(p) if p.requires_grad else None for p in params]
        want_bias = any(p is not None for p in param_grads)
        out_rows = torch.cat([out.view(n_out, dh), out.new_zeros(1, dh)])
        lse_rows = lse.clone()
        lse_rows[n_out] = -MASKED                                   # empty slots: p = exp(s - 1e30) = 0
        kwin = layout.windows(src, t)
        bias.prepare(layout)
        size = max(1, min(ctx.max_scores // (layout.c * layout.w), 32768))
        for r, ids in enumerate(used):
            for part in _split(ids, size):
                grp = Group(layout, part, kwin, r)
                qc, kw, vw = _gather(grp, layout, rows_q, rows_k, rows_v)
                b = bias(grp, bias_dtype(kernel, q.dtype), *params)
                dest = grp.dest.view(-1)
                gc = rows_g.take(rows_g.rows(grp.bi, grp.hi, grp.qidx))
                gc = gc.masked_fill(grp.qempty.view(-1, 1), 0).view(qc.shape)
                oc = out_rows.index_select(0, dest).view(qc.shape)
                sc = lse_rows.index_select(0, dest).view(qc.shape[:-1])
                dq, dk, dv, db = kernel_backward(kernel, gc, qc, kw, vw, b, oc, sc, scale, ctx.extra, want_bias)
                kdest = grp.kdest.view(-1)
                grads[0].index_add_(0, dest, dq.reshape(-1, dh).to(q.dtype))
                grads[1].index_add_(0, kdest, dk.reshape(-1, dh).to(k.dtype))
                grads[2].index_add_(0, kdest, dv.reshape(-1, dh).to(v.dtype))
                if want_bias:
                    for acc_g, pg in zip(param_grads, bias.backward(grp, db, *params)):
                        if acc_g is not None and pg is not None:
                            acc_g += pg
        bias.release()
        layout.src, bias.tensors = None, None
        dq = grads[0][:n_out].view(bsz, tq, heads, dh).transpose(1, 2)
        dk, dv = (x[:n_key].view(bsz, t, heads, dh).transpose(1, 2) for x in grads[1:])
        return (None, None, None, None, None, dq, dk, dv, *param_grads)


def _gather(grp: Group, layout: ChunkLayout, rows_q: RowIndex, rows_k: RowIndex,
            rows_v: RowIndex) -> tuple[Tensor, Tensor, Tensor]:
    """The group's queries (G, 1, C, dh) and window keys / values (G, 1, W, dh)."""
    g, dh = grp.ids.shape[0], rows_q.flat.shape[1]
    qc = rows_q.take(rows_q.rows(grp.bi, grp.hi, grp.qidx)).view(g, 1, layout.c, dh)
    krows = rows_k.rows(grp.bi, grp.hi, grp.kidx)
    kw = rows_k.take(krows).view(g, 1, layout.w, dh)
    vw = rows_v.take(krows if rows_v.strides == rows_k.strides else rows_v.rows(grp.bi, grp.hi, grp.kidx))
    return qc, kw, vw.view(g, 1, layout.w, dh)


def chunked_softmax(layout: ChunkLayout, bias, scale: float, q: Tensor, k: Tensor, v: Tensor,
                    *params: Tensor, max_scores: int = 1 << 24, kernel: Optional[str] = None) -> Tensor:
    """Apply ``ChunkedSoftmax`` (see there); ``kernel`` None picks one with ``pick_kernel``."""
    bias_grad = any(p.requires_grad for p in params) and torch.is_grad_enabled()
    kernel = kernel or pick_kernel(q, bias_grad)
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r}; use one of {KERNELS}")
    return ChunkedSoftmax.apply(layout, bias, scale, max_scores, kernel, q, k, v, *params)


# ------------------------------------------------------------------ sort-and-chunk (lsh, routing)


class BucketBias:
    """The allowed sets of ``rlformer.attention.chunked`` as a bias over chunk windows.

    Key j is allowed for query i when it is in the query's bucket (chunks are cut per bucket, so
    a window chunk either is in the bucket or not), valid (``key_valid``), not later when causal
    (slot order = position order inside a bucket), within ``window`` when set; the own key always.
    Bias: -SELF_PENALTY on the own key (``self_penalty``), -log N_ij with N_ij the rounds in which
    i and j share a bucket (``rounds``: (B, H, T, R) buckets of all rounds), MASKED elsewhere.
    """

    def __init__(self, slot_bucket: Tensor, key_valid: Optional[Tensor], rounds: Optional[Tensor], *,
                 causal: bool, window: Optional[int], self_penalty: bool):
        self.tensors = [slot_bucket] + [x for x in (key_valid, rounds) if x is not None]
        self.has_valid, self.has_rounds = key_valid is not None, rounds is not None
        self.causal, self.window, self.self_penalty = causal, window, self_penalty
        self.kb = None

    def prepare(self, layout: ChunkLayout) -> None:
        self.layout = layout
        self.kb = layout.windows(self.tensors[0], -1)                               # (P, n, W) view

    def release(self) -> None:
        self.kb = self.layout = None

    def __call__(self, grp: Group, dtype: torch.dtype) -> Tensor:
        from rlformer.attention.chunked import SELF_PENALTY
        lay = self.layout
        c, w = lay.c, lay.w
        rest = iter(self.tensors[1:])
        valid = next(rest) if self.has_valid else None
        rounds = next(rest) if self.has_rounds else None
        kb = self.kb[grp.row, grp.chunk]                                            # (G, W); -1 = empty
        ok = kb == self.tensors[0].view(-1, c)[grp.ids, :1]                         # the query chunk's bucket
        if valid is not None:
            ok &= valid[grp.bi, grp.kpos]
        j = torch.arange(w, device=kb.device) - lay.before * c                     # key slot - chunk start
        a = torch.arange(c, device=kb.device)[:, None]
        own = j == a                                                                # (C, W)
        allowed = ok[:, None, :]
        if self.causal:
            allowed = allowed & (j <= a)
        if self.window is not None:
            dist = grp.qpos[:, :, None] - grp.kpos[:, None, :]
            allowed = allowed & ((dist < self.window) if self.causal else (dist.abs() < self.window))
        allowed = allowed | own
        base = torch.zeros(c, w, dtype=dtype, device=kb.device)
        if self.self_penalty:
            base = base.masked_fill(own, -SELF_PENALTY)
        if rounds is not None:      # N_ij = 1 (this round, on allowed pairs) + other rounds sharing a bucket
            t = rounds.shape[2]
            qa = rounds[grp.bi, grp.hi, grp.qpos.clamp(max=t - 1)]                  # (G, C, R)
            ka = rounds[grp.bi, grp.hi, grp.kpos.clamp(max=t - 1)]                  # (G, W, R)
            others = [rr for rr in range(rounds.shape[3]) if rr != grp.round]
            shared = (qa[:, :, None, others[0]] == ka[:, None, :, others[0]]).to(torch.uint8)
            for rr in others[1:]:
                shared += qa[:, :, None, rr] == ka[:, None, :, rr]
            log_n = shared.to(dtype) * math.log(2) if len(others) == 1 else torch.log1p(shared.to(dtype))
            base = base - log_n
        return torch.where(allowed, base, torch.tensor(MASKED, dtype=dtype, device=kb.device))[:, None]


def bucket_softmax_attention(q: Tensor, k: Tensor, v: Tensor, buckets: Tensor, n_buckets: int, chunk_size: int,
                             scale: float, *, causal: bool, before: int = 1, after: int = 0,
                             self_penalty: bool = False, key_valid: Optional[Tensor] = None,
                             window: Optional[int] = None, dedup: bool = False, max_scores: int = 1 << 24,
                             kernel: Optional[str] = None) -> Tensor:
    """``chunked.bucket_attention`` followed by ``chunked.combine_rounds``, memory-lean.

    Same arguments and allowed sets (``dedup``: the log N_ij multi-round correction, what
    ``round_buckets=buckets`` does there). q, k, v: (B, H, T, dh); buckets (B, H, R, T).
    Returns the rounds' combination (B, H, T, dh); nothing of size (chunks x window) is kept for
    backward (see ``ChunkedSoftmax``).
    """
    from rlformer.attention.chunked import bucket_layout
    b, h, t, _ = q.shape
    r = buckets.shape[2]
    with torch.no_grad():
        src, _, length = bucket_layout(buckets, n_buckets, chunk_size)             # (B, H, R, L)
        slot_bucket = torch.take_along_dim(F.pad(buckets, (0, 1), value=-1), src, dim=3)
        src, slot_bucket = (x.permute(2, 0, 1, 3).reshape(r * b * h, length) for x in (src, slot_bucket))
        valid = None if key_valid is None else F.pad(key_valid.to(torch.bool), (0, 1), value=False)
        rounds = buckets.permute(0, 1, 3, 2).contiguous() if dedup and r > 1 else None
    layout = ChunkLayout(src, b, h, t, chunk_size, before, after)
    bias = BucketBias(slot_bucket, valid, rounds, causal=causal, window=window, self_penalty=self_penalty)
    return chunked_softmax(layout, bias, scale, q, k, v, max_scores=max_scores, kernel=kernel)


# ------------------------------------------------------------------------- adaptive span


class SpanBias:
    """log m_z(x) of adaptive span (Sukhbaatar et al. 2019, eq. 3) over chunk windows of the
    [memory; segment] keys: m_z(x) = clamp((R + z - x) / R, 0, 1) at distance x = i - j, so that
    softmax(s + log m) = m exp(s) / sum m exp(s). Keys at x >= ``window``, later keys, invalid
    keys (``key_valid``: (B, T + 1), False at T) and m = 0 are MASKED; the own key (x = 0, m = 1)
    always counts. ``z``: (H,) spans, or (B, H, Tq) per query; its gradient comes from the bias
    gradient: d log m / dz = 1 / (R m) where 0 < m, (R + z - x) / R <= 1.
    Slots of a row hold consecutive key indices, so x = before * C + a - j for query slot a and
    window slot j.
    """

    def __init__(self, key_valid: Optional[Tensor], *, ramp: int, window: int):
        self.tensors = [] if key_valid is None else [key_valid]
        self.ramp, self.window = ramp, window
        self.layout = None

    def prepare(self, layout: ChunkLayout) -> None:
        self.layout = layout

    def release(self) -> None:
        self.layout = None

    def _ramp(self, grp: Group, z: Tensor) -> tuple[Tensor, Tensor]:
        """u = (R + z - x) / R (float32/64) and the entries with weight, both (G, C, W)."""
        lay = self.layout
        c, w = lay.c, lay.w
        dev = grp.kpos.device
        dist = lay.before * c + torch.arange(c, device=dev)[:, None] - torch.arange(w, device=dev)   # (C, W)
        ok = grp.kpos != lay.t                                                      # (G, W)
        if self.tensors:
            ok = ok & self.tensors[0][grp.bi, grp.kpos]
        allowed = (ok[:, None, :] & (dist >= 0) & (dist < self.window)) | (dist == 0)
        zz = (z[grp.hi] if z.dim() == 1 else z[grp.bi, grp.hi, grp.qidx])[..., None]  # (G, 1, 1) | (G, C, 1)
        u = (self.ramp + zz.to(_acc(z.dtype)) - dist) / self.ramp
        return u, allowed & (u > 0)

    def __call__(self, grp: Group, dtype: torch.dtype, z: Tensor) -> Tensor:
        u, keep = self._ramp(grp, z.detach())
        log_m = torch.log(u.clamp(1e-30, 1.0)).to(dtype)
        return torch.where(keep, log_m, torch.tensor(MASKED, dtype=dtype, device=u.device))[:, None]

    def backward(self, grp: Group, grad_bias: Tensor, z: Tensor) -> list[Tensor]:
        u, keep = self._ramp(grp, z.detach())
        d = torch.where(keep & (u <= 1), grad_bias[:, 0].to(u.dtype) / (self.ramp * u), 0.0)
        if z.dim() == 1:
            return [torch.zeros_like(z).index_add_(0, grp.hi[:, 0], d.sum((1, 2)).to(z.dtype))]
        b, h, tq = z.shape
        rows = torch.where(grp.qempty, b * h * tq, (grp.bi * h + grp.hi) * tq + grp.qidx)
        dz = z.new_zeros(b * h * tq + 1).index_add_(0, rows.view(-1), d.sum(-1).view(-1).to(z.dtype))
        return [dz[:-1].view_as(z)]


def span_layout(batch: int, heads: int, n_queries: int, n_keys: int, window: int, chunk: int,
                device) -> ChunkLayout:
    """Layout of causal banded attention: queries are the last ``n_queries`` of ``n_keys`` keys,
    in chunks of ``chunk`` starting at the first query; each chunk's window reaches ``window`` - 1
    keys back. Keys older than the oldest query's window are no slot at all (never read)."""
    n_mem = n_keys - n_queries
    before = -(-(window - 1) // chunk)
    length = (before + -(-n_queries // chunk)) * chunk
    pos = torch.arange(length, device=device) + n_mem - before * chunk
    pos = torch.where((pos >= max(0, n_mem - (window - 1))) & (pos < n_keys), pos, n_keys)
    src = pos.expand(batch * heads, length).contiguous()
    return ChunkLayout(src, batch, heads, n_keys, chunk, before, 0, q_offset=n_mem)

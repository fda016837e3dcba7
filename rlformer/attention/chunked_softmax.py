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
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from rlformer.attention.chunked import SELF_PENALTY, bucket_layout

MASKED = -1e30
"""bias of a masked (query, key) pair: finite, so that a row of masked keys stays well defined"""

KERNELS = ("efficient", "flash_cpu", "math")


def pick_kernel(x: Tensor, bias_grad: bool = False) -> str:
    """The fused kernel for ``x``'s device and dtype (see the module docstring), else ``"math"``."""
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float64):
        return "math"          # float16: the -1e30 mask overflows its bias
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
    """Chunks attended together: ids (G,), their row / batch / head (G, 1), the key index of each
    query slot (G, C) and key slot (G, W) (T = empty), the rows to read (q, k, v) and to write
    (outputs and gradients, in (B, T, H) order; empty slots -> a dummy row). Built once per pass for
    all used chunks of a round; ``parts(size)`` slices it (views) into groups of ``size`` chunks."""

    def __init__(self, round_: int, **fields: Tensor):
        self.round = round_
        self.__dict__.update(fields)

    @classmethod
    def build(cls, layout: ChunkLayout, ids: Tensor, kwin: Tensor, round_: int, rows: Sequence[RowIndex]):
        t, off, heads = layout.t, layout.q_offset, layout.h
        tq = t - off
        row, chunk = ids // layout.n, ids % layout.n
        bh = (row % (layout.b * heads))[:, None]
        bi, hi = bh // heads, bh % heads
        qpos = layout.src.view(-1, layout.c)[ids]                                   # (G, C)
        kpos = kwin[row, chunk]                                                     # (G, W)
        qempty = (qpos == t) | (qpos < off)
        qidx = (qpos - off).clamp(0, tq - 1)                                        # query index to read
        kidx = kpos.clamp(max=t - 1)
        dest = torch.where(qempty, layout.b * tq * heads, (bi * tq + qidx) * heads + hi)
        kdest = torch.where(kpos == t, layout.b * t * heads, (bi * t + kidx) * heads + hi)
        rq, rk, rv = rows
        krows = rk.rows(bi, hi, kidx)
        vrows = krows if rv.strides == rk.strides else rv.rows(bi, hi, kidx)
        return cls(round_, ids=ids, bi=bi, hi=hi, qpos=qpos, kpos=kpos, qempty=qempty, qidx=qidx, kidx=kidx,
                   dest=dest, kdest=kdest, qrows=rq.rows(bi, hi, qidx), krows=krows, vrows=vrows)

    def parts(self, size: int) -> list["Group"]:
        """Views of every per-chunk field (those added by a bias's ``annotate`` too)."""
        fields = {f: x for f, x in self.__dict__.items() if isinstance(x, Tensor)}
        return [Group(self.round, **{f: x[a:a + size] for f, x in fields.items()})
                for a in range(0, self.ids.shape[0], size)]


def _groups(layout: ChunkLayout, used: Sequence[Tensor], rows: Sequence[RowIndex], max_scores: int,
            bias) -> list[Group]:
    kwin = layout.windows(layout.src, layout.t)
    size = max(1, min(max_scores // (layout.c * layout.w), 32768))   # 32768: CUDA grid limit on the batch
    out = []
    for r, ids in enumerate(used):
        if ids.numel():
            grp = Group.build(layout, ids, kwin, r, rows)
            bias.annotate(grp)
            out += grp.parts(size)
    return out


class ChunkedSoftmax(torch.autograd.Function):
    """out = sum over rounds of chunk-window softmax attention, recomputed per group in backward.

    ``layout``: ChunkLayout; ``bias``: an object with ``tensors`` (a list, saved for backward),
    ``prepare(layout, dtype, *params)`` / ``release()`` (derive and drop per-pass tables),
    ``annotate(group)`` (add per-chunk fields to a round's chunks before they are split),
    ``__call__(group, dtype, *params) -> (G, 1, C, W)`` and, when ``params`` need gradients,
    ``backward(group, grad_bias, *params) -> grads of params``. q: (B, H, Tq, dh), k, v:
    (B, H, T, dh), Tq = T - q_offset. Returns (B, H, Tq, dh) in the (B, Tq, H, dh) storage that
    merge_heads reshapes for free. Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, layout, bias, scale, max_scores, kernels, q, k, v, *params):
        kernel = kernels[0]
        bsz, heads, tq, dh = q.shape
        rows = RowIndex(q), RowIndex(k), RowIndex(v)
        n_out = bsz * tq * heads
        acc = _acc(q.dtype)
        out = q.new_zeros(layout.rounds, n_out + 1, dh)                 # per round; + a dummy row for empty slots
        lse = q.new_full((layout.rounds, n_out + 1), float("-inf"), dtype=acc)
        used = layout.used_chunks()
        bdtype = bias_dtype(kernel, q.dtype)
        bias.prepare(layout, bdtype, *params)
        groups = _groups(layout, used, rows, max_scores, bias)
        extra = None
        for grp in groups:
            qc, kw, vw = _gather(grp, layout, rows)
            o, s, extra = kernel_forward(kernel, qc, kw, vw, bias(grp, bdtype, *params), scale)
            dest = grp.dest.view(-1)
            out[grp.round].index_copy_(0, dest, o.reshape(-1, dh))
            lse[grp.round].index_copy_(0, dest, s.reshape(-1).to(acc))
        bias.release()
        del groups
        if layout.rounds > 1:       # Reformer: o = sum_r exp(lse_r - lse) o_r, lse = logsumexp_r lse_r
            weights = torch.softmax(lse[:, :n_out], dim=0)[..., None]
            combined = torch.zeros(n_out, dh, dtype=acc, device=q.device)
            for r in range(layout.rounds):
                combined.addcmul_(out[r, :n_out], weights[r])
            out = combined.to(q.dtype)
            lse = torch.cat([torch.logsumexp(lse[:, :n_out], dim=0), lse.new_full((1,), -MASKED)])
        else:
            out, lse = out[0, :n_out], lse[0]
            lse[n_out] = -MASKED                                    # empty slots: p = exp(s - 1e30) = 0
        ctx.layout, ctx.bias, ctx.scale, ctx.max_scores, ctx.kernel, ctx.extra = \
            layout, bias, scale, max_scores, kernels[1], extra
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
        rows = RowIndex(q), RowIndex(k), RowIndex(v)
        rows_g = RowIndex(g)
        n_out, n_key = bsz * tq * heads, bsz * t * heads
        grads = [torch.zeros(n + 1, dh, dtype=x.dtype, device=x.device) for n, x in ((n_out, q), (n_key, k),
                                                                                      (n_key, v))]
        param_grads = [torch.zeros_like(p) if p.requires_grad else None for p in params]
        want_bias = any(p is not None for p in param_grads)
        out_rows = torch.cat([out.view(n_out, dh), out.new_zeros(1, dh)])
        g_rows = torch.cat([rows_g.flat, g.new_zeros(1, dh)])      # empty query slots read a zero gradient
        bdtype = bias_dtype(kernel, q.dtype)
        bias.prepare(layout, bdtype, *params)
        groups = _groups(layout, used, rows, ctx.max_scores, bias)
        for grp in groups:
            qc, kw, vw = _gather(grp, layout, rows)
            b = bias(grp, bdtype, *params)
            dest = grp.dest.view(-1)
            gc = g_rows.index_select(0, torch.where(grp.qempty, rows_g.flat.shape[0],
                                                    rows_g.rows(grp.bi, grp.hi, grp.qidx)).view(-1))
            oc = out_rows.index_select(0, dest).view(qc.shape)
            sc = lse.index_select(0, dest).view(qc.shape[:-1])
            dq, dk, dv, db = kernel_backward(kernel, gc.view(qc.shape), qc, kw, vw, b, oc, sc, scale, ctx.extra,
                                             want_bias)
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


def _gather(grp: Group, layout: ChunkLayout, rows: Sequence[RowIndex]) -> tuple[Tensor, Tensor, Tensor]:
    """The group's queries (G, 1, C, dh) and window keys / values (G, 1, W, dh)."""
    g, dh = grp.ids.shape[0], rows[0].flat.shape[1]
    rq, rk, rv = rows
    return (rq.take(grp.qrows).view(g, 1, layout.c, dh), rk.take(grp.krows).view(g, 1, layout.w, dh),
            rv.take(grp.vrows).view(g, 1, layout.w, dh))


def chunked_softmax(layout: ChunkLayout, bias, scale: float, q: Tensor, k: Tensor, v: Tensor,
                    *params: Tensor, max_scores: int = 1 << 24, kernel: Optional[str] = None) -> Tensor:
    """Apply ``ChunkedSoftmax`` (see there); ``kernel`` None picks one with ``pick_kernel``."""
    bias_grad = any(p.requires_grad for p in params) and torch.is_grad_enabled()
    if kernel is not None and kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r}; use one of {KERNELS}")
    backward = kernel or pick_kernel(q, bias_grad)
    # the forward needs no bias gradient: a fused kernel with the same bias dtype may run it
    forward = kernel or pick_kernel(q)
    if bias_dtype(forward, q.dtype) != bias_dtype(backward, q.dtype):
        forward = backward
    return ChunkedSoftmax.apply(layout, bias, scale, max_scores, (forward, backward), q, k, v, *params)


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
        self.layout = None

    def prepare(self, layout: ChunkLayout, dtype: torch.dtype) -> None:
        self.layout = layout
        c, w = layout.c, layout.w
        dev = layout.src.device
        j = torch.arange(w, device=dev) - layout.before * c                         # key slot - chunk start
        a = torch.arange(c, device=dev)[:, None]
        self.own = j == a                                                           # (C, W)
        self.order = (j <= a) if self.causal else None
        base = torch.zeros(c, w, dtype=dtype, device=dev)
        self.base = base.masked_fill(self.own, -SELF_PENALTY) if self.self_penalty else base
        self.masked = torch.tensor(MASKED, dtype=dtype, device=dev)

    def annotate(self, grp: Group) -> None:
        """grp.key_ok (G, W): window key in the query chunk's bucket, present and valid."""
        lay = self.layout
        kb = lay.windows(self.tensors[0], -1)[grp.ids // lay.n, grp.ids % lay.n]    # (G, W); -1 = empty
        grp.key_ok = kb == self.tensors[0].view(-1, lay.c)[grp.ids, :1]
        if self.has_valid:
            grp.key_ok &= self.tensors[1][grp.bi, grp.kpos]

    def release(self) -> None:
        self.layout = self.own = self.order = self.base = self.masked = None

    def __call__(self, grp: Group, dtype: torch.dtype) -> Tensor:
        allowed = grp.key_ok[:, None, :]
        if self.order is not None:
            allowed = allowed & self.order
        if self.window is not None:
            dist = grp.qpos[:, :, None] - grp.kpos[:, None, :]
            allowed = allowed & ((dist < self.window) if self.causal else (dist.abs() < self.window))
        allowed = allowed | self.own
        base = self.base
        if self.has_rounds:         # N_ij = 1 (this round, on allowed pairs) + other rounds sharing a bucket
            rounds = self.tensors[-1]
            qa = rounds[grp.bi, grp.hi, grp.qidx]                                   # (G, C, R)
            ka = rounds[grp.bi, grp.hi, grp.kidx]                                   # (G, W, R)
            others = [rr for rr in range(rounds.shape[3]) if rr != grp.round]
            if len(others) == 1:
                shared = qa[:, :, None, others[0]] == ka[:, None, :, others[0]]
                base = torch.where(shared, base - math.log(2), base)
            else:
                shared = torch.zeros(allowed.shape, dtype=torch.uint8, device=base.device)
                for rr in others:
                    shared += qa[:, :, None, rr] == ka[:, None, :, rr]
                base = base - torch.log1p(shared.to(dtype))
        return torch.where(allowed, base, self.masked)[:, None]


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

    def prepare(self, layout: ChunkLayout, dtype: torch.dtype, z: Tensor) -> None:
        """Distances (C, W), and for static spans the per-head bias and d bias / dz tables (H, C, W)."""
        self.layout = layout
        c, w = layout.c, layout.w
        dev = layout.src.device
        self.dist = layout.before * c + torch.arange(c, device=dev)[:, None] - torch.arange(w, device=dev)
        self.in_band = (self.dist >= 0) & (self.dist < self.window)
        self.own = self.dist == 0
        self.masked = torch.tensor(MASKED, dtype=dtype, device=dev)
        if z.dim() == 1:
            self.table, self.dtable = self._tables(z.detach()[:, None, None], dtype)

    def _tables(self, z: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """log m (MASKED where m = 0 or out of the band) and d log m / dz = 1 / (R u) where 0 < u <= 1."""
        u = (self.ramp + z.to(_acc(z.dtype)) - self.dist) / self.ramp
        keep = (self.in_band | self.own) & (u > 0)
        log_m = torch.where(keep, torch.log(u.clamp(1e-30, 1.0)).to(dtype), self.masked)
        return log_m, torch.where(keep & (u <= 1), 1.0 / (self.ramp * u), 0.0)

    def annotate(self, grp: Group) -> None:
        """grp.key_ok (G, W): window key present and valid."""
        grp.key_ok = grp.kpos != self.layout.t
        if self.tensors:
            grp.key_ok &= self.tensors[0][grp.bi, grp.kpos]

    def release(self) -> None:
        self.layout = self.dist = self.in_band = self.own = self.masked = self.table = self.dtable = None

    def _per_group(self, grp: Group, dtype: torch.dtype, z: Tensor) -> tuple[Tensor, Tensor]:
        if z.dim() == 1:
            return self.table[grp.hi[:, 0]], self.dtable[grp.hi[:, 0]]                # (G, C, W)
        return self._tables(z.detach()[grp.bi, grp.hi, grp.qidx][..., None], dtype)  # per query span

    def __call__(self, grp: Group, dtype: torch.dtype, z: Tensor) -> Tensor:
        log_m, _ = self._per_group(grp, dtype, z)
        return torch.where(grp.key_ok[:, None, :] | self.own, log_m, self.masked)[:, None]

    def backward(self, grp: Group, grad_bias: Tensor, z: Tensor) -> list[Tensor]:
        """Masked entries have zero probability, hence zero bias gradient: no mask needed here."""
        _, dlog = self._per_group(grp, grad_bias.dtype, z)
        d = grad_bias[:, 0].to(dlog.dtype) * dlog
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

"""Fused shared-QK bucket attention (lsh's CUDA path): Triton kernels that read q and v where they lie.

Same meaning as ``flex_bucket.flex_bucket_attention(q, None, v, ...)`` (Reformer, Kitaev et al. 2020, sec. 2:
shared-QK keys k = q / |q|, each round's bucket-sorted order cut into chunks, a query attending to keys of its
bucket ``before`` .. ``after`` chunks away, j <= i when causal, its own key always allowed and lowered by
SELF_PENALTY, the score of (i, j) lowered by log N_ij with ``dedup``, rounds combined by their log-normalizers,
o_i = sum_r softmax_r(lse_i^r) o_i^r), and the same int32 slot tables (``flex_bucket.bucket_slots``). What
differs is where the rows live. The FlexAttention path gathers q and v into the sorted order of every round
(R copies of each), gathers the output gradient the same way in backward, and gets the kernel's dq, dk, dv in
sorted order: at its backward's peak two rounds' sorted q, v, dO, dq, dk, dv are alive together (six blocks of
R x (B, T, D); 192 of lsh's 200 MiB at T = 16k, 8 heads x 64). Here the kernels compute each slot's position from
``rows`` and load q and v rows straight from the projections' output; nothing sorted is kept but the per-slot
log-normalizers:

- ``_forward_kernel`` (all rounds in one launch): FlashAttention's online softmax (Dao et al. 2022, alg. 1) over
  the key slots of a query block's band (the slots a query may use lie within (before + 1) C - 1 behind and
  (after + 1) C - 1 ahead of its own, see ``flex_bucket``), writing each round's output and lse in slot order;
  ``row_gather.combine_rounds`` then forms o and the round weights w.
- Backward needs no round output: with dO_r = w_r dO and dlse_r = w_r (<dO, o_r> - <dO, o>) (the combination's
  backward), the softmax backward's row term <dO_r, o_r> - dlse_r is w_r <dO, o>, so one float32 number per
  position (``_delta_kernel``) replaces the sorted outputs: dS_ij = w_r P_ij (<dO_i, v_j> - <dO_i, o_i>), with
  dO as given in the products and w_r applied in float32 (rounding w_r dO to 16 bits first left noise of 2^-9
  |dO| |v| in rows whose keys nearly all carry one value, where the true dS is ~0: bf16 dq 4.6e-2 off the
  float64 reference instead of FlexAttention's 5.7e-3). ``_backward_kernel`` (one launch per round): a program
  takes a block of slots as keys (dk, dv over the queries of their band, FlashAttention-2's loop, Dao 2023) and the
  same slots as queries (dq over their keys), adds the key gradient through k = x / |x| (dx = (g - k <k, g>) /
  |x|) to the query gradient of the same token, and adds both into the position-order dq, dv: within one round
  the slots are a permutation of the positions, so a launch writes each row once, no atomics; rounds add in turn.

Peak memory of backward: q, v, o, dO and the two gradients in position order (six (B, T, D) blocks) plus int32
tables, for any number of rounds (lsh at T = 16k, 8 heads x 64 on an H100: 1.42 ms / 101 MiB per layer step vs the
FlexAttention path's 1.67 ms / 200 MiB). Opt-in (``lsh.fused=True``): in session 16 the same bf16 inputs gave dq
errors against float64 of 4.3e-2 and 4.3e-3 in two runs (BENCHMARKS.md), unexplained so far;
``tests/test_bucket_fused.py::test_cuda_fused_backward_is_deterministic`` checks it. Needs CUDA, Triton, a
power-of-two head size 16..128 and fusion on (``RLFORMER_FUSED=0`` turns it off); on CPU the kernels run in Triton's
interpreter for the tests.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from rlformer.attention import row_gather
from rlformer.attention.chunked import SELF_PENALTY
from rlformer.attention.compiled import fusion_enabled
from rlformer.attention.flex_bucket import bucket_slots

try:
    import triton
    import triton.language as tl
except ImportError:          # CPU-only installs: lsh takes its other paths
    triton = None

__all__ = ["available", "shared_qk_bucket_attention"]

BLOCK = 64
"""Slots per program and per inner step (query and key blocks); divides the tables' length (a multiple of 128)"""
WARPS = 4
LOG2E = 1.4426950408889634


def available(q: Tensor, v: Tensor) -> bool:
    """Whether the fused kernels run: CUDA (or Triton's interpreter on CPU), Triton importable, fusion on, q and v
    of one floating dtype (float32 / bfloat16 / float16) and shape, and a power-of-two head size 16..128."""
    d = q.shape[-1]
    on_device = q.is_cuda or (q.device.type == "cpu" and _interpreting())
    return (triton is not None and on_device and fusion_enabled() and q.dtype == v.dtype and q.shape == v.shape
            and q.dtype in (torch.float32, torch.bfloat16, torch.float16) and 16 <= d <= 128 and d & (d - 1) == 0)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


if triton is not None:
    @triton.jit
    def _rows_of(ptr, b, h, t, sb, sh, st, D: tl.constexpr, ok):
        """x[b, h, t] for a block of positions t (rows of D contiguous elements; zero where not ok)."""
        d = tl.arange(0, D)
        return tl.load(ptr + b * sb + h * sh + t[:, None] * st + d[None, :], mask=ok[:, None], other=0.0)

    @triton.jit
    def _inv_norm(x):
        """1 / max(|x|, eps) per row, float32 (eps 1e-12: F.normalize's, ``flex_bucket.NORM_EPS``)."""
        xf = x.to(tl.float32)
        return 1.0 / tl.maximum(tl.sqrt(tl.sum(xf * xf, axis=1)), 1e-12)

    @triton.jit
    def _scores(qx, sq, sk, gq, gk, oth_ptr, oth_stride, base, kinv, scale_log2,
                N_OTHERS: tl.constexpr, BEFORE: tl.constexpr, AFTER: tl.constexpr, CAUSAL: tl.constexpr,
                PENALTY: tl.constexpr):
        """Scores in log2 units (q . x / |x| * scale * log2 e) of query slots sq and key slots sk, -inf where not
        allowed: same bucket and chunk distance in [-AFTER, BEFORE] (group numbers, ``bucket_slots``), sk <= sq
        when causal, the own slot always; the own key lowered by PENALTY, shared buckets in other rounds by
        log2(1 + count) (N_ij = 1 + count)."""
        s = qx * (kinv[None, :] * scale_log2)
        dc = gq[:, None] - gk[None, :]
        own = sq[:, None] == sk[None, :]
        ok = (dc <= BEFORE) & (dc >= -AFTER)
        if CAUSAL:
            ok = ok & (sk[None, :] <= sq[:, None])
        ok = ok | own
        if PENALTY > 0:
            s = tl.where(own, s - PENALTY, s)
        if N_OTHERS > 0:
            shared = tl.zeros(s.shape, dtype=tl.float32)
            for i in tl.static_range(N_OTHERS):
                oq = tl.load(oth_ptr + i * oth_stride + base + sq)
                ok_ = tl.load(oth_ptr + i * oth_stride + base + sk)
                shared += (oq[:, None] == ok_[None, :]).to(tl.float32)
            s = s - tl.log2(1.0 + shared)
        return tl.where(ok, s, float("-inf"))

    @triton.jit
    def _key_range(s0, L, C, BEFORE: tl.constexpr, AFTER: tl.constexpr, CAUSAL: tl.constexpr,
                   BLOCK: tl.constexpr):
        """[lo, hi): the key blocks of the band of query slots s0 .. s0 + BLOCK - 1 (lo a multiple of BLOCK)."""
        lo = tl.maximum(s0 - (BEFORE + 1) * C + 1, 0) // BLOCK * BLOCK
        if CAUSAL:
            hi = s0 + BLOCK
        else:
            hi = tl.minimum(s0 + BLOCK + (AFTER + 1) * C - 1, L)
        return lo, hi

    @triton.jit
    def _query_range(s0, L, C, BEFORE: tl.constexpr, AFTER: tl.constexpr, CAUSAL: tl.constexpr,
                     BLOCK: tl.constexpr):
        """[lo, hi): the query blocks whose band holds key slots s0 .. s0 + BLOCK - 1."""
        if CAUSAL:
            lo = s0
        else:
            lo = tl.maximum(s0 - (AFTER + 1) * C + 1, 0) // BLOCK * BLOCK
        hi = tl.minimum(s0 + BLOCK + (BEFORE + 1) * C - 1, L)
        return lo, hi

    @triton.jit
    def _key_block(q, sq, gq, k0, q_ptr, v_ptr, rows_ptr, kgroup_ptr, oth_ptr, oth_stride, base, b, h,
                   sqb, sqh, sqt, svb, svh, svt, scale_log2, N_OTHERS: tl.constexpr, BEFORE: tl.constexpr,
                   AFTER: tl.constexpr, CAUSAL: tl.constexpr, PENALTY: tl.constexpr, IEEE: tl.constexpr,
                   BLOCK: tl.constexpr, D: tl.constexpr):
        """Key slots k0 .. k0 + BLOCK - 1 for the query rows q (slots sq, groups gq): the keys' rows x (their
        tokens' q), their v rows, 1 / |x| and the scores (``_scores``)."""
        sk = k0 + tl.arange(0, BLOCK)
        tk = tl.load(rows_ptr + base + sk).to(tl.int64)
        every = sk >= 0
        x = _rows_of(q_ptr, b, h, tk, sqb, sqh, sqt, D, every)
        vv = _rows_of(v_ptr, b, h, tk, svb, svh, svt, D, every)
        kinv = _inv_norm(x)
        qx = tl.dot(q, tl.trans(x), input_precision="ieee" if IEEE else "tf32")
        s = _scores(qx, sq, sk, gq, tl.load(kgroup_ptr + base + sk), oth_ptr, oth_stride, base, kinv, scale_log2,
                    N_OTHERS, BEFORE, AFTER, CAUSAL, PENALTY)
        return x, vv, kinv, s

    @triton.jit
    def _forward_kernel(q_ptr, v_ptr, rows_ptr, group_ptr, kgroup_ptr, oth_ptr, out_ptr, lse_ptr,
                        L, H, C, sqb, sqh, sqt, svb, svh, svt, oth_stride, scale_log2,
                        R: tl.constexpr, N_OTHERS: tl.constexpr, BEFORE: tl.constexpr, AFTER: tl.constexpr,
                        CAUSAL: tl.constexpr, PENALTY: tl.constexpr, IEEE: tl.constexpr,
                        BLOCK: tl.constexpr, D: tl.constexpr):
        s0 = tl.program_id(0) * BLOCK
        bhr = tl.program_id(1).to(tl.int64)          # (b, h, r) folded as in the tables (B, H * R, L)
        b = bhr // (H * R)
        h = (bhr // R) % H
        base = bhr * L
        sq = s0 + tl.arange(0, BLOCK)
        every = sq >= 0
        tq = tl.load(rows_ptr + base + sq).to(tl.int64)
        q = _rows_of(q_ptr, b, h, tq, sqb, sqh, sqt, D, every)
        gq = tl.load(group_ptr + base + sq)
        m = tl.full((BLOCK,), -1e30, tl.float32)
        den = tl.zeros((BLOCK,), tl.float32)
        acc = tl.zeros((BLOCK, D), tl.float32)
        lo, hi = _key_range(s0, L, C, BEFORE, AFTER, CAUSAL, BLOCK)
        for k0 in range(lo, hi, BLOCK):
            _, vv, _, s = _key_block(q, sq, gq, k0, q_ptr, v_ptr, rows_ptr, kgroup_ptr, oth_ptr, oth_stride, base,
                                     b, h, sqb, sqh, sqt, svb, svh, svt, scale_log2, N_OTHERS, BEFORE, AFTER,
                                     CAUSAL, PENALTY, IEEE, BLOCK, D)
            m_new = tl.maximum(m, tl.max(s, axis=1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m - m_new)
            den = den * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv, input_precision="ieee" if IEEE else "tf32")
            m = m_new
        d = tl.arange(0, D)
        out = acc / den[:, None]
        tl.store(out_ptr + (base + sq)[:, None] * D + d[None, :], out.to(out_ptr.dtype.element_ty))
        tl.store(lse_ptr + base + sq, m + tl.log2(den))      # log2 units: backward re-forms p = 2^(s - lse)

    @triton.jit
    def _delta_kernel(do_ptr, o_ptr, delta_ptr, T, H, sdb, sdh, sdt, sob, soh, sot,
                      BLOCK: tl.constexpr, D: tl.constexpr):
        """delta[b, h, t] = <dO, o> in float32."""
        bh = tl.program_id(1).to(tl.int64)
        b, h = bh // H, bh % H
        t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = t < T
        t = t.to(tl.int64)
        g = _rows_of(do_ptr, b, h, t, sdb, sdh, sdt, D, ok).to(tl.float32)
        o = _rows_of(o_ptr, b, h, t, sob, soh, sot, D, ok).to(tl.float32)
        tl.store(delta_ptr + bh * T + t, tl.sum(g * o, axis=1), mask=ok)

    @triton.jit
    def _query_side(rows_ptr, do_ptr, w_ptr, delta_ptr, lse_ptr, base, wbase, bh, b, h, sq, T,
                    sdb, sdh, sdt, HAS_W: tl.constexpr, D: tl.constexpr):
        """For query slots sq: their positions, dO (as given, zero at padding slots), the round weight w_r (zero
        at padding slots), <dO, o> and the lse (log2 units, as the forward stored it)."""
        ok = sq < T
        tq = tl.load(rows_ptr + base + sq).to(tl.int64)
        g = _rows_of(do_ptr, b, h, tq, sdb, sdh, sdt, D, ok)
        delta = tl.load(delta_ptr + bh * T + tq, mask=ok, other=0.0)
        if HAS_W:
            w = tl.load(w_ptr + wbase + tq, mask=ok, other=0.0)
        else:
            w = ok.to(tl.float32)
        lse2 = tl.load(lse_ptr + base + sq)
        return tq, g, w, delta, lse2

    @triton.jit
    def _backward_kernel(q_ptr, v_ptr, do_ptr, rows_ptr, group_ptr, kgroup_ptr, oth_ptr, lse_ptr, w_ptr,
                         delta_ptr, dq_ptr, dv_ptr, r, T, L, H, C,
                         sqb, sqh, sqt, svb, svh, svt, sdb, sdh, sdt, sgb, sgh, sgt, swb, swh, swt,
                         oth_stride, scale, scale_log2,
                         R: tl.constexpr, N_OTHERS: tl.constexpr, BEFORE: tl.constexpr, AFTER: tl.constexpr,
                         CAUSAL: tl.constexpr, PENALTY: tl.constexpr, HAS_W: tl.constexpr, ACCUM: tl.constexpr,
                         IEEE: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr):
        s0 = tl.program_id(0) * BLOCK
        bh = tl.program_id(1).to(tl.int64)
        b, h = bh // H, bh % H
        base = (bh * R + r) * L
        wbase = (bh * R + r) * T
        sk = s0 + tl.arange(0, BLOCK)
        every = sk >= 0
        mine = sk < T                                   # real slots (the padding ones are at the end)
        tk = tl.load(rows_ptr + base + sk).to(tl.int64)
        x = _rows_of(q_ptr, b, h, tk, sqb, sqh, sqt, D, every)
        vv = _rows_of(v_ptr, b, h, tk, svb, svh, svt, D, every)
        kinv = _inv_norm(x)
        gk = tl.load(kgroup_ptr + base + sk)
        # these slots as keys: dV = sum_i P_ij dO_r,i and G = sum_i dS_ij q_i over the queries of their band
        dv = tl.zeros((BLOCK, D), tl.float32)
        gsum = tl.zeros((BLOCK, D), tl.float32)
        lo, hi = _query_range(s0, L, C, BEFORE, AFTER, CAUSAL, BLOCK)
        for q0 in range(lo, hi, BLOCK):
            sq = q0 + tl.arange(0, BLOCK)
            tq, g, w, delta, lse2 = _query_side(rows_ptr, do_ptr, w_ptr, delta_ptr, lse_ptr, base, wbase, bh, b,
                                                h, sq, T, sdb, sdh, sdt, HAS_W, D)
            q = _rows_of(q_ptr, b, h, tq, sqb, sqh, sqt, D, every)
            gq = tl.load(group_ptr + base + sq)
            qx = tl.dot(q, tl.trans(x), input_precision="ieee" if IEEE else "tf32")
            s = _scores(qx, sq, sk, gq, gk, oth_ptr, oth_stride, base, kinv, scale_log2,
                        N_OTHERS, BEFORE, AFTER, CAUSAL, PENALTY)
            pw = tl.exp2(s - lse2[:, None]) * w[:, None]
            dv += tl.dot(tl.trans(pw.to(g.dtype)), g, input_precision="ieee" if IEEE else "tf32")
            dp = tl.dot(g, tl.trans(vv), input_precision="ieee" if IEEE else "tf32")
            ds = pw * (dp - delta[:, None])
            gsum += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision="ieee" if IEEE else "tf32")
        # the same slots as queries: dQ = sum_j dS_ij k_j over the keys of their band (k_j = x_j / |x_j|)
        tq, g, w, delta, lse2 = _query_side(rows_ptr, do_ptr, w_ptr, delta_ptr, lse_ptr, base, wbase, bh, b, h,
                                            sk, T, sdb, sdh, sdt, HAS_W, D)
        gq = tl.load(group_ptr + base + sk)
        dq = tl.zeros((BLOCK, D), tl.float32)
        lo, hi = _key_range(s0, L, C, BEFORE, AFTER, CAUSAL, BLOCK)
        for k0 in range(lo, hi, BLOCK):
            xj, vj, kinv_j, s = _key_block(x, sk, gq, k0, q_ptr, v_ptr, rows_ptr, kgroup_ptr, oth_ptr, oth_stride,
                                           base, b, h, sqb, sqh, sqt, svb, svh, svt, scale_log2, N_OTHERS, BEFORE,
                                           AFTER, CAUSAL, PENALTY, IEEE, BLOCK, D)
            pw = tl.exp2(s - lse2[:, None]) * w[:, None]
            dp = tl.dot(g, tl.trans(vj), input_precision="ieee" if IEEE else "tf32")
            ds = pw * (dp - delta[:, None]) * kinv_j[None, :]
            dq += tl.dot(ds.to(xj.dtype), xj, input_precision="ieee" if IEEE else "tf32")
        # key gradient through k = x / |x|: (G - k <k, G>) / |x|; plus the query gradient of the same token
        xf = x.to(tl.float32)
        radial = tl.sum(xf * gsum, axis=1) * kinv * kinv
        dx = scale * (dq + (gsum - xf * radial[:, None]) * kinv[:, None])
        d = tl.arange(0, D)
        dq_dst = dq_ptr + b * sgb + h * sgh + tk[:, None] * sgt + d[None, :]
        dv_dst = dv_ptr + b * swb + h * swh + tk[:, None] * swt + d[None, :]
        if ACCUM:                                       # an earlier round wrote these rows
            dx += tl.load(dq_dst, mask=mine[:, None], other=0.0).to(tl.float32)
            dv += tl.load(dv_dst, mask=mine[:, None], other=0.0).to(tl.float32)
        tl.store(dq_dst, dx.to(dq_ptr.dtype.element_ty), mask=mine[:, None])
        tl.store(dv_dst, dv.to(dv_ptr.dtype.element_ty), mask=mine[:, None])


def _unit_last(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


class _SharedQKBuckets(torch.autograd.Function):
    """Forward and backward of ``shared_qk_bucket_attention`` (the kernels above); saves q, v, the output o,
    the per-slot lse (float32, log2 units, B x H R x L), the round weights and the int32 tables."""

    @staticmethod
    def forward(ctx, q: Tensor, v: Tensor, tables: dict, settings: dict):
        q, v = _unit_last(q), _unit_last(v)
        b, h, _, dh = q.shape
        rows, slot, length = tables["rows"].contiguous(), tables["slot"].contiguous(), tables["length"]
        group, kgroup = tables["group"].contiguous(), tables["kgroup"].contiguous()
        r = rows.shape[2]
        others = tables["others"]
        oth = torch.stack(others) if others else group
        out = torch.empty(b, h * r, length, dh, dtype=q.dtype, device=q.device)
        lse = torch.empty(b, h * r, length, dtype=torch.float32, device=q.device)
        s = settings
        _forward_kernel[(length // BLOCK, b * h * r)](
            q, v, rows, group, kgroup, oth, out, lse, length, h, s["chunk"],
            *q.stride()[:3], *v.stride()[:3], oth.stride(0) if others else 0, s["scale"] * LOG2E,
            R=r, N_OTHERS=len(others), BEFORE=s["before"], AFTER=s["after"], CAUSAL=s["causal"],
            PENALTY=s["penalty"] * LOG2E, IEEE=q.dtype == torch.float32, BLOCK=BLOCK, D=dh, num_warps=WARPS)
        # (natural-log lse for the round weights; the log2 one is kept: a token whose only key is its own, lowered by
        # SELF_PENALTY, has s ~ -1443 in log2 units, where a round trip through ln would move p = 1 by ~1e-4)
        o, w = row_gather.combine_rounds(out, lse * (1 / LOG2E) if r > 1 else None, slot)
        del out
        ctx.settings, ctx.length, ctx.n_others = s, length, len(others)
        ctx.save_for_backward(q, v, o, lse, w, rows, group, kgroup, oth)
        return o

    @staticmethod
    def backward(ctx, grad: Tensor):
        q, v, o, lse, w, rows, group, kgroup, oth = ctx.saved_tensors
        s, length = ctx.settings, ctx.length
        b, h, t, dh = q.shape
        r = rows.shape[2]
        grad = _unit_last(grad)
        delta = torch.empty(b, h, t, dtype=torch.float32, device=q.device)
        _delta_kernel[(triton.cdiv(t, BLOCK), b * h)](grad, o, delta, t, h, *grad.stride()[:3], *o.stride()[:3],
                                                       BLOCK=BLOCK, D=dh, num_warps=WARPS)
        dq, dv = torch.empty_like(q), torch.empty_like(v)
        for rr in range(r):
            _backward_kernel[(length // BLOCK, b * h)](
                q, v, grad, rows, group, kgroup, oth, lse, delta if w is None else w, delta, dq, dv, rr, t, length,
                h, s["chunk"], *q.stride()[:3], *v.stride()[:3], *grad.stride()[:3], *dq.stride()[:3],
                *dv.stride()[:3], oth.stride(0) if ctx.n_others else 0, s["scale"], s["scale"] * LOG2E,
                R=r, N_OTHERS=ctx.n_others, BEFORE=s["before"], AFTER=s["after"], CAUSAL=s["causal"],
                PENALTY=s["penalty"] * LOG2E, HAS_W=w is not None, ACCUM=rr > 0, IEEE=q.dtype == torch.float32,
                BLOCK=BLOCK, D=dh, num_warps=WARPS)
        return dq, dv, None, None


def shared_qk_bucket_attention(q: Tensor, v: Tensor, buckets: Tensor, chunk_size: int, scale: float, *,
                               causal: bool, before: int = 1, after: int = 0, self_penalty: bool = True,
                               key_valid: Optional[Tensor] = None, dedup: bool = True) -> Tensor:
    """``flex_bucket.flex_bucket_attention(q, None, v, ...)`` with the fused kernels (see the module docstring).

    q, v: (B, H, T, dh) with a unit last stride (any other strides; split_heads' views as they are); the keys
    are k = q / |q|. buckets (B, H, R, T) in [0, n_buckets). Returns (B, H, T, dh) in (B, T, H, dh) storage,
    rounds combined."""
    if not available(q, v):
        raise ValueError(f"shared_qk_bucket_attention needs CUDA (or TRITON_INTERPRET=1), Triton, fusion on, q and v "
                         f"of one float dtype and shape and a power-of-two head size 16..128; got q {tuple(q.shape)} "
                         f"{q.dtype} on {q.device}, v {tuple(v.shape)} {v.dtype}: use flex_bucket_attention instead")
    if before < 0 or after < 0 or chunk_size < 1:
        raise ValueError(f"before={before}, after={after}, chunk_size={chunk_size}: need before, after >= 0 and a "
                         f"positive chunk size")
    tables = bucket_slots(buckets, chunk_size, key_valid, dedup, reach=max(before, after))
    settings = {"chunk": chunk_size, "scale": float(scale), "before": before, "after": after, "causal": bool(causal),
                "penalty": float(SELF_PENALTY) if self_penalty else 0.0}
    return _SharedQKBuckets.apply(q, v, tables, settings)


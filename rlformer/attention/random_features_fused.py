"""Fused Triton kernels for causal random-feature attention (Performer FAVOR+ and ungated RFA) on CUDA.

The chunk form of ``random_features`` writes the feature maps phi(Q), phi(K) ((T, M) per head, M = 256 is 4x the
width of a head) and the per-chunk tensors to memory, a few fused kernels per recompute group. Here the features
never leave the chip: every program owns one stretch ("segment") of one head and walks its chunks of ``CHUNK``
tokens in order, computing each chunk's features from q, k (d_head wide) and the feature directions W block by
block of ``BLOCK_M`` features, in registers:

    forward, chunk c with S_c = [sum_{s < c} phi(k_s) v_s^T, sum_{s < c} phi(k_s)] (the carried sums):
        y_t = phi(q_t)^T S_c + sum_{s in c, s <= t} (phi(q_t) . phi(k_s)) [v_s, 1],   out_t = y_t[:dh] / y_t[dh],
        S_{c+1} = S_c + sum_{s in c} phi(k_s) [v_s, 1]^T,

the same equations as ``_chunk_pass`` (Katharopoulos et al. 2020, eq. 8-10; chunked as in GLA / fla's chunk
kernels). The carried sums at the start of each segment come from one parallel pass of segment sums (a program per
segment, head and feature block) and a cumsum over segments (``_segment_starts``), so all segments of all heads run
at once. Backward recomputes the features from q, k, v, the output and the normalizer: one forward walk for dq from
the segments' starting sums S (which the forward's cumsum also wrote to a kept copy, ``KEEP_STARTS``), and a reverse
walk for dk, dv from the reverse sums R_c = sum_{t after c} phi(q_t) dy_t^T (a reverse pass of segment sums first).
Kept for backward: q, k, v, the output (stored in (B, T, H, dh) order, so it is the same storage as the output
projection's input), per token the normalizer and (Performer) the query shift, and the segments' starting sums
(bf16 for 16-bit inputs); transient: the (segments x heads, M, dh + 1) fp32 carried sums. Never O(T * M), never
O(T^2). When the caller donates k and v (``donate_kv``), the dk, dv walk writes each chunk's dk, dv over its k, v
rows after reading them (no other program reads those rows).

Features, as in ``PerformerAttention`` / ``RFAAttention`` (exponents in fp32 from a TF32 product with 16-bit
inputs, features rounded to the 16-bit dtype for the tensor-core products, sums in fp32):
- Performer (``FEAT_EXP``): phi(q) = exp(w . q + bq - max_r(w . q + bq)), phi(k) = exp(w . k + kcoef |k|^2 + bk).
- RFA (``FEAT_TRIG``): x^ = x / |x|, phi(x) = [sin(s w . x^), cos(s w . x^)] / sqrt(m) (M = 2m) with the per-head
  scale s = sqrt(tau), whose gradient is returned (tau is learned).
Gated RFA, a carried state that needs gradients, non-power-of-two head sizes and CPU tensors use the chunk form of
``random_features`` (the reference these kernels are tested against, outputs and gradients).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from rlformer.attention.compiled import fusion_enabled

try:
    import triton
    import triton.language as tl
except ImportError:          # CPU-only installs: the chunk form runs
    triton = None

FEAT_EXP, FEAT_TRIG = 0, 1
CHUNK = 64
"""tokens per chunk inside a program (the intra-chunk products are CHUNK x CHUNK)"""
BLOCK_M = {FEAT_EXP: 64, FEAT_TRIG: 32}
"""features computed at once per kind (Performer, RFA): a multiple of 16 dividing m (smaller when m needs it)"""
NUM_WARPS = 4
"""warps per program"""
NUM_STAGES = 1
"""software pipelining stages of the walks' loops"""
SUMS_STAGES = 1
"""software pipelining stages of the segment-sums kernel's loop over chunks (1, 2, 3 measured alike at 16k, session
14 call 5)"""
SUMS_CHUNK: Optional[dict] = {FEAT_EXP: 32, FEAT_TRIG: 64}
"""tokens per step of the segment-sums kernel per kind (None: ``CHUNK``); it only sums, so it may step by less than
the walks. With 64 features per program (``SUMS_BLOCK_M``): Performer 32 tokens (no register spills; its segment
sums at 16k 0.268 -> 0.257 ms), RFA 64 (0.286 ms at 16k, 1.017 at 64k, vs 0.316 / 1.129 by 32 tokens and 0.418 at 16k
before, 64 x 32); H100, session 15 calls 1-5; 16 tokens or 8 warps were slower"""
SUMS_WARPS: Optional[int] = None
"""warps per program of the segment-sums kernel (None: ``NUM_WARPS``)"""
SUMS_BLOCK_M: Optional[dict] = {FEAT_EXP: 64, FEAT_TRIG: 64}
"""features per program of the segment-sums kernel per kind (None: ``BLOCK_M``)"""
KEEP_STARTS = True
"""forward keeps each segment's starting carried sums for backward (bfloat16 for 16-bit inputs, float32 for float32:
(segments x heads, M, dh) values, 16.5 MiB at T = 16k with 8 heads and M = 512), so backward's dq walk needs no
second pass of segment sums; False: backward recomputes them"""
PROGRAMS = 256
"""about how many (segment, head) programs run at once: two waves of an H100's 132 SMs; more segments cost more
carried-sum memory (one (M, dh + 1) fp32 block each)"""


def block_m(m: int, feat: int = 0, table: Optional[dict] = None) -> Optional[int]:
    """Feature block size for m random features of kind ``feat`` (preferred: ``table`` (default ``BLOCK_M``)[feat]),
    or None when the kernels cannot take m."""
    for bm in ((table or BLOCK_M)[feat], 32, 16):
        if m % bm == 0:
            return bm
    return None


def available(q: Tensor, n_features: int) -> bool:
    """Whether the fused kernels run for q (B, H, T, dh): CUDA, Triton importable, fusion on (``RLFORMER_FUSED``),
    dh a power of two in [16, 128] and m a multiple of 16."""
    d = q.shape[-1]
    return (triton is not None and q.is_cuda and fusion_enabled() and 16 <= d <= 128 and d & (d - 1) == 0
            and block_m(n_features) is not None and q.dtype in (torch.float32, torch.bfloat16, torch.float16))


def segment_length(t: int, bh: int) -> int:
    """Tokens per segment: whole chunks, about ``PROGRAMS`` programs over the bh heads (at least one chunk)."""
    n_chunks = -(-t // CHUNK)
    per = max(1, -(-n_chunks * bh // PROGRAMS))
    return per * CHUNK


if triton is not None:
    @triton.jit
    def _sin(x, FAST: tl.constexpr):
        """sin(x) in fp32; FAST: the PTX approximation (absolute error 2^-20.5 on [-100 pi, 100 pi], below the
        16-bit rounding of the features), else libdevice's (range reduction, far slower)."""
        if FAST:
            return tl.inline_asm_elementwise("sin.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                             pack=1)
        return tl.sin(x)

    @triton.jit
    def _cos(x, FAST: tl.constexpr):
        """cos(x) in fp32, as ``_sin``."""
        if FAST:
            return tl.inline_asm_elementwise("cos.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                             pack=1)
        return tl.cos(x)

    @triton.jit
    def _directions(w_ptr, h, blk, M, D: tl.constexpr, BM: tl.constexpr):
        """The feature directions blk..blk+BM of head h: (BM, D) fp32, loaded once per block and used by the
        exponents and (backward) the feature gradient."""
        return tl.load(w_ptr + (h * M + blk + tl.arange(0, BM))[:, None] * D + tl.arange(0, D)[None, :])

    @triton.jit
    def _exponent(x, w, b_ptr, h, blk, M, BM: tl.constexpr, PREC: tl.constexpr):
        """x (C, D) fp32 times the feature directions w (BM, D) (block blk of head h), plus their biases: (C, BM)
        fp32."""
        return tl.dot(x, tl.trans(w), input_precision=PREC) + tl.load(b_ptr + h * M + blk + tl.arange(0, BM))[None, :]

    @triton.jit
    def _load_rows(ptr, b, h, t, ok, sb, sh, st, D: tl.constexpr):
        return tl.load(ptr + b * sb + h * sh + t[:, None] * st + tl.arange(0, D)[None, :], mask=ok[:, None], other=0.0)

    @triton.jit
    def _store_rows(ptr, val, b, h, t, ok, sb, sh, st, D: tl.constexpr):
        tl.store(ptr + b * sb + h * sh + t[:, None] * st + tl.arange(0, D)[None, :], val, mask=ok[:, None])

    @triton.jit
    def _inputs(q_ptr, k_ptr, cw_ptr, mx_ptr, w_ptr, bq_ptr, b, h, t, ok, M, kcoef,
                sqb, sqh, sqt, skb, skh, skt, scb, sch, sct,
                FEAT: tl.constexpr, HAS_CW: tl.constexpr, WITH_Q: tl.constexpr, SHIFT: tl.constexpr,
                D: tl.constexpr, BM: tl.constexpr, PREC: tl.constexpr):
        """One chunk's fp32 feature inputs: (q or x^_q, k or x^_k, key weight (0 past T), |k|^2 kcoef (Performer),
        query shift (Performer; SHIFT 0: zeros, 1: computed and returned, 2: loaded from mx_ptr))."""
        k = _load_rows(k_ptr, b, h, t, ok, skb, skh, skt, D).to(tl.float32)
        wt = ok.to(tl.float32)
        if HAS_CW:
            wt = wt * tl.load(cw_ptr + b * scb + h * sch + t * sct, mask=ok, other=0.0).to(tl.float32)
        q = k
        if WITH_Q:
            q = _load_rows(q_ptr, b, h, t, ok, sqb, sqh, sqt, D).to(tl.float32)
        kn = tl.zeros_like(wt)
        mx = tl.zeros_like(wt)
        if FEAT == 0:
            kn = tl.sum(k * k, 1) * kcoef
            if SHIFT == 1:
                mx = tl.full(mx.shape, float("-inf"), tl.float32)
                for blk in range(0, M, BM):
                    w = _directions(w_ptr, h, blk, M, D, BM)
                    mx = tl.maximum(mx, tl.max(_exponent(q, w, bq_ptr, h, blk, M, BM, PREC), 1))
            elif SHIFT == 2:
                mx = tl.load(mx_ptr + t, mask=ok, other=0.0)
        else:
            k = k / tl.maximum(tl.sqrt(tl.sum(k * k, 1)), 1e-12)[:, None]
            if WITH_Q:
                q = q / tl.maximum(tl.sqrt(tl.sum(q * q, 1)), 1e-12)[:, None]
        return q, k, wt, kn, mx

    @triton.jit
    def _program(T, H, SEG):
        """(segment, head row bh = b H + h, head rows, b, h, first token, end token) of this program."""
        seg = tl.program_id(0)
        bh = tl.program_id(1)
        start = seg * SEG
        return seg, bh, tl.num_programs(1), bh // H, bh % H, start, tl.minimum(start + SEG, T)

    @triton.jit
    def _slot_row(slot, nbh, bh, M, FEAT: tl.constexpr):
        """First row of (slot, bh) in the (NSEG + 1, BH, MS, DV) carried sums; MS = M (Performer), 2M (RFA)."""
        return (slot * nbh + bh) * M * (1 + FEAT)

    @triton.jit
    def _state_ptrs(s_ptr, z_ptr, row, DV: tl.constexpr, BM: tl.constexpr):
        r = row + tl.arange(0, BM)
        return s_ptr + r[:, None] * DV + tl.arange(0, DV)[None, :], z_ptr + r

    @triton.jit
    def _more(pos, end, BM: tl.constexpr):
        """Mask (BM,) for ``_carry``: whether a later chunk of the walk reads the sums (pos < end)."""
        return tl.zeros((BM,), tl.int32) + pos < end

    @triton.jit
    def _carry(sp, zp, s, z, more):
        """RFA's store of the updated carried sums s (BM, DV), z (BM,) where ``more`` (``_more``) holds: the last
        chunk's update is not stored (1 / 8 of a walk's sum stores at 16k: rfa's three walks 1.613 -> 1.568 ms;
        H100, session 15 calls 2-3). Performer stores unmasked (``_add_keys``)."""
        tl.store(sp, s, mask=more[:, None])
        tl.store(zp, z, mask=more)

    @triton.jit
    def _add_keys(sp, zp, s, z, fk16, v, more, FEAT: tl.constexpr, PREC: tl.constexpr):
        """The forward and dq walks' sums update: s + phi(k)^T v, z + sum phi(k), stored to sp, zp. RFA forms both
        sums, then stores them masked (``_carry``); Performer stores s before it sums z, unmasked: masked its walks
        were slower (1.179 -> 1.225 ms), and each kind's kernels compile best in its own order (in Performer's, rfa's
        dq walk took 0.527 instead of 0.475 ms); H100, session 15 calls 2, 3, 6, 7. ``_dkdv_block`` stores its
        reverse sums the same way."""
        s = s + tl.dot(tl.trans(fk16), v, input_precision=PREC)
        if FEAT == 1:
            _carry(sp, zp, s, z + tl.sum(fk16.to(tl.float32), 0), more)
        else:
            tl.store(sp, s)
            tl.store(zp, z + tl.sum(fk16.to(tl.float32), 0))

    @triton.jit
    def _segment_sums_kernel(q_ptr, k_ptr, v_ptr, cw_ptr, w_ptr, bq_ptr, bk_ptr, mx_ptr, o_ptr, do_ptr, den_ptr,
                             s_ptr, z_ptr, T, H, M, SEG, NSEG, kcoef, inv_sqrt_m, floor,
                             sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, scb, sch, sct, sob, soh, sot,
                             sdb, sdh, sdt,
                             FEAT: tl.constexpr, HAS_CW: tl.constexpr, REVERSE: tl.constexpr, C: tl.constexpr,
                             D: tl.constexpr, DV: tl.constexpr, BM: tl.constexpr, PREC: tl.constexpr,
                             DT: tl.constexpr, FAST: tl.constexpr):
        """Sums of one segment for one feature block (the grid's third axis: the blocks of a segment run as programs
        of their own, each walking the segment's chunks once), written to slot 1 + seg (forward: sum phi(k) [v, 1]^T)
        or slot NSEG - seg (REVERSE: sum phi(q) [dnum, dden]^T) of the (NSEG + 1, BH, MS, DV) sums."""
        seg, bh, nbh, b, h, start, stop = _program(T, H, SEG)
        row0 = _slot_row(NSEG - seg if REVERSE else seg + 1, nbh, bh, M, FEAT)
        blk = tl.program_id(2) * BM
        w = _directions(w_ptr, h, blk, M, D, BM)
        acc1 = tl.zeros((BM, DV), tl.float32)
        z1 = tl.zeros((BM,), tl.float32)
        acc2 = tl.zeros((BM, DV), tl.float32)
        z2 = tl.zeros((BM,), tl.float32)
        for c0 in range(start, stop, C):
            t = c0 + tl.arange(0, C)
            ok = t < stop
            q, k, wt, kn, mx = _inputs(q_ptr, k_ptr, cw_ptr, mx_ptr + bh * T, w_ptr, bq_ptr, b, h, t, ok, M,
                                       kcoef, sqb, sqh, sqt, skb, skh, skt, scb, sch, sct,
                                       FEAT, HAS_CW, REVERSE, 2 if REVERSE else 0, D, BM, PREC)
            if REVERSE:
                dnum, dden = _dy(o_ptr, do_ptr, den_ptr + bh * T, b, h, t, ok, floor, sob, soh, sot,
                                 sdb, sdh, sdt, DV)
                a = _exponent(q, w, bq_ptr, h, blk, M, BM, PREC)
                rhs = dnum.to(DT)
                rs = dden
                if FEAT == 0:
                    f1 = tl.exp(a - mx[:, None])
                    f2 = f1
                else:
                    f1 = _sin(a, FAST) * inv_sqrt_m
                    f2 = _cos(a, FAST) * inv_sqrt_m
            else:
                a = _exponent(k, w, bk_ptr, h, blk, M, BM, PREC)
                rhs = _load_rows(v_ptr, b, h, t, ok, svb, svh, svt, DV).to(DT)
                rs = tl.full(wt.shape, 1.0, tl.float32)
                if FEAT == 0:
                    f1 = tl.exp(a + kn[:, None]) * wt[:, None]
                    f2 = f1
                else:
                    f1 = _sin(a, FAST) * (inv_sqrt_m * wt)[:, None]
                    f2 = _cos(a, FAST) * (inv_sqrt_m * wt)[:, None]
            f1 = f1.to(DT)
            acc1 += tl.dot(tl.trans(f1), rhs, input_precision=PREC)
            z1 += tl.sum(f1.to(tl.float32) * rs[:, None], 0)
            if FEAT == 1:
                f2 = f2.to(DT)
                acc2 += tl.dot(tl.trans(f2), rhs, input_precision=PREC)
                z2 += tl.sum(f2.to(tl.float32) * rs[:, None], 0)
        sp, zp = _state_ptrs(s_ptr, z_ptr, row0 + blk, DV, BM)
        tl.store(sp, acc1)
        tl.store(zp, z1)
        if FEAT == 1:
            sp, zp = _state_ptrs(s_ptr, z_ptr, row0 + M + blk, DV, BM)
            tl.store(sp, acc2)
            tl.store(zp, z2)

    @triton.jit
    def _dy(o_ptr, do_ptr, den_ptr, b, h, t, ok, floor, sob, soh, sot, sdb, sdh, sdt, DV: tl.constexpr):
        """dL/dy of out = y[:dh] / max(y[dh], floor): (dnum (C, DV), dden (C,)), fp32; zeros where y[dh] = 0."""
        den = tl.load(den_ptr + t, mask=ok, other=0.0)
        dc = tl.maximum(den, floor)
        do = _load_rows(do_ptr, b, h, t, ok, sdb, sdh, sdt, DV).to(tl.float32)
        o = _load_rows(o_ptr, b, h, t, ok, sob, soh, sot, DV).to(tl.float32)
        dnum = tl.where((den != 0)[:, None], do / dc[:, None], 0.0)
        dden = tl.where(den >= floor, -tl.sum(do * o, 1) / dc, 0.0)
        return dnum, dden

    @triton.jit
    def _fwd_block(fq, fk, v, s_ptr, z_ptr, row, acc, den, A, more, FEAT: tl.constexpr, DV: tl.constexpr,
                   BM: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
        """One feature block of a forward chunk: the carried-sum term, the intra-chunk scores, the sums update."""
        sp, zp = _state_ptrs(s_ptr, z_ptr, row, DV, BM)
        s = tl.load(sp)
        z = tl.load(zp)
        fq16 = fq.to(DT)
        fk16 = fk.to(DT)
        acc += tl.dot(fq16, s.to(DT), input_precision=PREC)
        den += tl.sum(fq16.to(tl.float32) * z[None, :], 1)
        A += tl.dot(fq16, tl.trans(fk16), input_precision=PREC)
        _add_keys(sp, zp, s, z, fk16, v, more, FEAT, PREC)
        return acc, den, A

    @triton.jit
    def _forward_kernel(q_ptr, k_ptr, v_ptr, cw_ptr, w_ptr, bq_ptr, bk_ptr, mx_ptr, o_ptr, den_ptr, s_ptr, z_ptr,
                        T, H, M, SEG, kcoef, inv_sqrt_m, floor,
                        sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, scb, sch, sct, sob, soh, sot,
                        FEAT: tl.constexpr, HAS_CW: tl.constexpr, C: tl.constexpr, D: tl.constexpr,
                        DV: tl.constexpr, BM: tl.constexpr, PREC: tl.constexpr, DT: tl.constexpr,
                        FAST: tl.constexpr):
        """Outputs of one segment: walks its chunks from the carried sums in slot seg (updated in place)."""
        seg, bh, nbh, b, h, start, stop = _program(T, H, SEG)
        row0 = _slot_row(seg, nbh, bh, M, FEAT)
        i = tl.arange(0, C)
        causal = i[:, None] >= i[None, :]
        for c0 in range(start, stop, C):
            t = c0 + i
            ok = t < stop
            q, k, wt, kn, mx = _inputs(q_ptr, k_ptr, cw_ptr, mx_ptr, w_ptr, bq_ptr, b, h, t, ok, M, kcoef,
                                       sqb, sqh, sqt, skb, skh, skt, scb, sch, sct, FEAT, HAS_CW, True, 1, D, BM,
                                       PREC)
            v = _load_rows(v_ptr, b, h, t, ok, svb, svh, svt, DV).to(DT)
            more = _more(c0 + C, stop, BM)                              # a later chunk reads the sums
            acc = tl.zeros((C, DV), tl.float32)
            den = tl.zeros((C,), tl.float32)
            A = tl.zeros((C, C), tl.float32)
            for blk in range(0, M, BM):
                w = _directions(w_ptr, h, blk, M, D, BM)
                aq = _exponent(q, w, bq_ptr, h, blk, M, BM, PREC)
                ak = _exponent(k, w, bk_ptr, h, blk, M, BM, PREC)
                if FEAT == 0:
                    acc, den, A = _fwd_block(tl.exp(aq - mx[:, None]), tl.exp(ak + kn[:, None]) * wt[:, None], v,
                                             s_ptr, z_ptr, row0 + blk, acc, den, A, more, FEAT, DV, BM, DT, PREC)
                else:
                    kw = (inv_sqrt_m * wt)[:, None]
                    acc, den, A = _fwd_block(_sin(aq, FAST) * inv_sqrt_m, _sin(ak, FAST) * kw, v, s_ptr, z_ptr,
                                             row0 + blk, acc, den, A, more, FEAT, DV, BM, DT, PREC)
                    acc, den, A = _fwd_block(_cos(aq, FAST) * inv_sqrt_m, _cos(ak, FAST) * kw, v, s_ptr, z_ptr,
                                             row0 + M + blk, acc, den, A, more, FEAT, DV, BM, DT, PREC)
            A16 = tl.where(causal, A, 0.0).to(DT)
            acc += tl.dot(A16, v, input_precision=PREC)
            den += tl.sum(A16.to(tl.float32), 1)
            out = acc / tl.maximum(den, floor)[:, None]
            _store_rows(o_ptr, out.to(o_ptr.dtype.element_ty), b, h, t, ok, sob, soh, sot, DV)
            tl.store(den_ptr + bh * T + t, den, mask=ok)
            if FEAT == 0:
                tl.store(mx_ptr + bh * T + t, mx, mask=ok)

    @triton.jit
    def _feature_grad(f1, f2, df1, df2, w, dx, FEAT: tl.constexpr, PREC: tl.constexpr):
        """dL/da of one feature block from dL/dphi (Performer: phi da; RFA: cos a dphi_sin - sin a dphi_cos, over
        sqrt(m) folded into f1, f2), and dx (C, D) plus da W (the block's directions w (BM, D)). Returns (dx, da)."""
        if FEAT == 0:
            da = df1 * f1
        else:
            da = df1 * f2 - df2 * f1                  # f1 = sin a / sqrt(m), f2 = cos a / sqrt(m)
        return dx + tl.dot(da, w, input_precision=PREC), da

    @triton.jit
    def _dq_kernel(q_ptr, k_ptr, v_ptr, cw_ptr, w_ptr, bq_ptr, bk_ptr, mx_ptr, o_ptr, do_ptr, den_ptr, s_ptr, z_ptr,
                   dq_ptr, ds_ptr, T, H, M, SEG, kcoef, inv_sqrt_m, floor,
                   sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, scb, sch, sct, sob, soh, sot, sdb, sdh, sdt,
                   sgb, sgh, sgt,
                   FEAT: tl.constexpr, HAS_CW: tl.constexpr, NEED_DS: tl.constexpr, C: tl.constexpr,
                   D: tl.constexpr, DV: tl.constexpr, BM: tl.constexpr, PREC: tl.constexpr, DT: tl.constexpr,
                   FAST: tl.constexpr):
        """dq of one segment, walking its chunks forward from the carried sums S (updated in place):
        dphi(q_t) = S_c [dnum_t, dden_t] + sum_{s in c, s <= t} (dy_t . [v_s, 1]) phi(k_s)."""
        seg, bh, nbh, b, h, start, stop = _program(T, H, SEG)
        row0 = _slot_row(seg, nbh, bh, M, FEAT)
        i = tl.arange(0, C)
        causal = i[:, None] >= i[None, :]
        dscale = 0.0
        for c0 in range(start, stop, C):
            t = c0 + i
            ok = t < stop
            q, k, wt, kn, mx = _inputs(q_ptr, k_ptr, cw_ptr, mx_ptr + bh * T, w_ptr, bq_ptr, b, h, t, ok, M,
                                       kcoef, sqb, sqh, sqt, skb, skh, skt, scb, sch, sct, FEAT, HAS_CW, True,
                                       2, D, BM, PREC)
            v = _load_rows(v_ptr, b, h, t, ok, svb, svh, svt, DV).to(DT)
            dnum, dden = _dy(o_ptr, do_ptr, den_ptr + bh * T, b, h, t, ok, floor, sob, soh, sot, sdb, sdh, sdt, DV)
            dn16 = dnum.to(DT)
            dA = tl.dot(dn16, tl.trans(v), input_precision=PREC) + dden[:, None]         # dy_t . [v_s, 1]
            dA = tl.where(causal, dA, 0.0).to(DT)
            more = _more(c0 + C, stop, BM)
            dq = tl.zeros((C, D), tl.float32)
            for blk in range(0, M, BM):
                w = _directions(w_ptr, h, blk, M, D, BM)
                aq = _exponent(q, w, bq_ptr, h, blk, M, BM, PREC)
                ak = _exponent(k, w, bk_ptr, h, blk, M, BM, PREC)
                if FEAT == 0:
                    fq1 = tl.exp(aq - mx[:, None])
                    fk1 = tl.exp(ak + kn[:, None]) * wt[:, None]
                    dfq1 = _dq_block(fk1, v, dn16, dden, dA, s_ptr, z_ptr, row0 + blk, more, FEAT, DV, BM, DT, PREC)
                    dq, _ = _feature_grad(fq1.to(DT).to(tl.float32), fq1, dfq1, dfq1, w, dq, FEAT, PREC)
                else:
                    kw = (inv_sqrt_m * wt)[:, None]
                    fq1 = _sin(aq, FAST) * inv_sqrt_m
                    fq2 = _cos(aq, FAST) * inv_sqrt_m
                    dfq1 = _dq_block(_sin(ak, FAST) * kw, v, dn16, dden, dA, s_ptr, z_ptr, row0 + blk, more, FEAT,
                                     DV, BM, DT, PREC)
                    dfq2 = _dq_block(_cos(ak, FAST) * kw, v, dn16, dden, dA, s_ptr, z_ptr, row0 + M + blk, more,
                                     FEAT, DV, BM, DT, PREC)
                    dq, da = _feature_grad(fq1, fq2, dfq1, dfq2, w, dq, FEAT, PREC)
                    if NEED_DS:
                        dscale += tl.sum(da * aq)
            _store_rows(dq_ptr, _input_grad(q_ptr, dq, b, h, t, ok, sqb, sqh, sqt, tl.zeros_like(wt), 0.0, FEAT,
                                            D).to(dq_ptr.dtype.element_ty), b, h, t, ok, sgb, sgh, sgt, D)
        if NEED_DS:
            tl.store(ds_ptr + seg * nbh + bh, dscale)

    @triton.jit
    def _dq_block(fk, v, dn16, dden, dA, s_ptr, z_ptr, row, more, FEAT: tl.constexpr, DV: tl.constexpr,
                  BM: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
        """dL/dphi(q) of one feature block (C, BM) fp32; adds the chunk's phi(k) [v, 1]^T to the carried sums."""
        sp, zp = _state_ptrs(s_ptr, z_ptr, row, DV, BM)
        s = tl.load(sp)
        z = tl.load(zp)
        fk16 = fk.to(DT)
        df = tl.dot(dn16, tl.trans(s.to(DT)), input_precision=PREC) + dden[:, None] * z[None, :]
        df += tl.dot(dA, fk16, input_precision=PREC)
        _add_keys(sp, zp, s, z, fk16, v, more, FEAT, PREC)
        return df

    @triton.jit
    def _input_grad(x_ptr, dx, b, h, t, ok, sb, sh, st, dsq, kcoef, FEAT: tl.constexpr, D: tl.constexpr):
        """dL/dx from dL/d(exponent inputs): Performer adds 2 kcoef x dL/d(kcoef |x|^2) (keys); RFA maps dL/dx^ back
        through x^ = x / max(|x|, 1e-12)."""
        x = _load_rows(x_ptr, b, h, t, ok, sb, sh, st, D).to(tl.float32)
        if FEAT == 0:
            return dx + (2.0 * kcoef * dsq)[:, None] * x
        norm = tl.sqrt(tl.sum(x * x, 1))
        xh = x / tl.maximum(norm, 1e-12)[:, None]
        proj = tl.where(norm > 1e-12, tl.sum(xh * dx, 1), 0.0)
        return (dx - xh * proj[:, None]) / tl.maximum(norm, 1e-12)[:, None]

    @triton.jit
    def _dkdv_block(fq, fk, v, dn16, dden, dAT, r_ptr, rz_ptr, row, dv, AT, more, FEAT: tl.constexpr,
                    DV: tl.constexpr, BM: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
        """dL/dphi(k) of one feature block (C, BM) fp32 and the carried-sum part of dv from the reverse sums R
        (then adds the chunk's phi(q) [dnum, dden]^T to R); accumulates phi(k) phi(q)^T into AT."""
        sp, zp = _state_ptrs(r_ptr, rz_ptr, row, DV, BM)
        r = tl.load(sp)
        rz = tl.load(zp)
        fq16 = fq.to(DT)
        fk16 = fk.to(DT)
        r16 = r.to(DT)
        df = tl.dot(v, tl.trans(r16), input_precision=PREC) + rz[None, :] + tl.dot(dAT, fq16, input_precision=PREC)
        dv += tl.dot(fk16, r16, input_precision=PREC)
        AT += tl.dot(fk16, tl.trans(fq16), input_precision=PREC)
        r = r + tl.dot(tl.trans(fq16), dn16, input_precision=PREC)
        if FEAT == 1:
            _carry(sp, zp, r, rz + tl.sum(fq16.to(tl.float32) * dden[:, None], 0), more)
        else:
            tl.store(sp, r)
            tl.store(zp, rz + tl.sum(fq16.to(tl.float32) * dden[:, None], 0))
        return df, dv, AT

    @triton.jit
    def _dkdv_kernel(q_ptr, k_ptr, v_ptr, cw_ptr, w_ptr, bq_ptr, bk_ptr, mx_ptr, o_ptr, do_ptr, den_ptr, r_ptr,
                     rz_ptr, dk_ptr, dv_ptr, ds_ptr, T, H, M, SEG, NSEG, kcoef, inv_sqrt_m, floor,
                     sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, scb, sch, sct, sob, soh, sot, sdb, sdh, sdt,
                     skgb, skgh, skgt, svgb, svgh, svgt,
                     FEAT: tl.constexpr, HAS_CW: tl.constexpr, NEED_DS: tl.constexpr, C: tl.constexpr,
                     D: tl.constexpr, DV: tl.constexpr, BM: tl.constexpr, PREC: tl.constexpr, DT: tl.constexpr,
                     FAST: tl.constexpr):
        """dk, dv of one segment, walking its chunks backward from the reverse sums R (slot NSEG - 1 - seg, updated in
        place): dphi(k_s) = R_c^T [v_s, 1] + sum_{t in c, t >= s} (dy_t . [v_s, 1]) phi(q_t),
        dv_s = R_c^T phi(k_s) + sum_{t in c, t >= s} (phi(q_t) . phi(k_s)) dnum_t."""
        seg, bh, nbh, b, h, start, stop = _program(T, H, SEG)
        row0 = _slot_row(NSEG - 1 - seg, nbh, bh, M, FEAT)
        n = tl.cdiv(stop - start, C)
        dscale = 0.0
        i = tl.arange(0, C)
        causal_t = i[:, None] <= i[None, :]                         # (s, t): s <= t
        for j in range(0, n):
            t = start + (n - 1 - j) * C + i
            ok = t < stop
            q, k, wt, kn, mx = _inputs(q_ptr, k_ptr, cw_ptr, mx_ptr + bh * T, w_ptr, bq_ptr, b, h, t, ok, M,
                                       kcoef, sqb, sqh, sqt, skb, skh, skt, scb, sch, sct, FEAT, HAS_CW, True,
                                       2, D, BM, PREC)
            v = _load_rows(v_ptr, b, h, t, ok, svb, svh, svt, DV).to(DT)
            dnum, dden = _dy(o_ptr, do_ptr, den_ptr + bh * T, b, h, t, ok, floor, sob, soh, sot, sdb, sdh, sdt, DV)
            dn16 = dnum.to(DT)
            dAT = tl.dot(v, tl.trans(dn16), input_precision=PREC) + dden[None, :]         # [v_s, 1] . dy_t
            dAT = tl.where(causal_t, dAT, 0.0).to(DT)
            more = _more(j, n - 1, BM)                                   # an earlier chunk reads the sums
            dk = tl.zeros((C, D), tl.float32)
            dv = tl.zeros((C, DV), tl.float32)
            AT = tl.zeros((C, C), tl.float32)
            dsq = tl.zeros_like(wt)
            for blk in range(0, M, BM):
                w = _directions(w_ptr, h, blk, M, D, BM)
                aq = _exponent(q, w, bq_ptr, h, blk, M, BM, PREC)
                ak = _exponent(k, w, bk_ptr, h, blk, M, BM, PREC)
                if FEAT == 0:
                    fk1 = tl.exp(ak + kn[:, None]) * wt[:, None]
                    dfk1, dv, AT = _dkdv_block(tl.exp(aq - mx[:, None]), fk1, v, dn16, dden, dAT, r_ptr, rz_ptr,
                                               row0 + blk, dv, AT, more, FEAT, DV, BM, DT, PREC)
                    dk, da = _feature_grad(fk1.to(DT).to(tl.float32), fk1, dfk1, dfk1, w, dk, FEAT, PREC)
                    dsq += tl.sum(da, 1)
                else:
                    kw = (inv_sqrt_m * wt)[:, None]
                    fk1 = _sin(ak, FAST) * kw
                    fk2 = _cos(ak, FAST) * kw
                    dfk1, dv, AT = _dkdv_block(_sin(aq, FAST) * inv_sqrt_m, fk1, v, dn16, dden, dAT, r_ptr, rz_ptr,
                                               row0 + blk, dv, AT, more, FEAT, DV, BM, DT, PREC)
                    dfk2, dv, AT = _dkdv_block(_cos(aq, FAST) * inv_sqrt_m, fk2, v, dn16, dden, dAT, r_ptr, rz_ptr,
                                               row0 + M + blk, dv, AT, more, FEAT, DV, BM, DT, PREC)
                    dk, da = _feature_grad(fk1, fk2, dfk1, dfk2, w, dk, FEAT, PREC)
                    if NEED_DS:
                        dscale += tl.sum(da * ak)
            dv += tl.dot(tl.where(causal_t, AT, 0.0).to(DT), dn16, input_precision=PREC)
            _store_rows(dv_ptr, dv.to(dv_ptr.dtype.element_ty), b, h, t, ok, svgb, svgh, svgt, DV)
            _store_rows(dk_ptr, _input_grad(k_ptr, dk, b, h, t, ok, skb, skh, skt, dsq, kcoef, FEAT,
                                            D).to(dk_ptr.dtype.element_ty), b, h, t, ok, skgb, skgh, skgt, D)
        if NEED_DS:
            tl.store(ds_ptr + (NSEG + seg) * nbh + bh, dscale)


if triton is not None:
    @triton.jit
    def _cumsum_cols(x_ptr, keep_ptr, cols, ok, n_slots, n_cols, KEEP: tl.constexpr, BLOCK: tl.constexpr):
        """In-place cumsum over the slots of the columns ``cols`` of (n_slots, n_cols) fp32 x, four slots per step
        (independent loads); KEEP: also writes slots 0..n_slots-2 of the result to keep (n_slots - 1, n_cols)."""
        acc = tl.zeros((BLOCK,), tl.float32)
        p0 = x_ptr + cols                               # pointers advance by n_cols: 64-bit, no int32 slot offsets
        k0 = keep_ptr + cols
        for i in range(0, n_slots, 4):
            p1 = p0 + n_cols
            p2 = p1 + n_cols
            p3 = p2 + n_cols
            slot = tl.full((BLOCK,), i, tl.int32)        # as a tensor: Triton's interpreter masks take no bools
            ok1 = ok & (slot + 1 < n_slots)
            ok2 = ok & (slot + 2 < n_slots)
            ok3 = ok & (slot + 3 < n_slots)
            acc0 = acc + tl.load(p0, mask=ok, other=0.0)
            acc1 = acc0 + tl.load(p1, mask=ok1, other=0.0)
            acc2 = acc1 + tl.load(p2, mask=ok2, other=0.0)
            acc = acc2 + tl.load(p3, mask=ok3, other=0.0)
            tl.store(p0, acc0, mask=ok)
            tl.store(p1, acc1, mask=ok1)
            tl.store(p2, acc2, mask=ok2)
            tl.store(p3, acc, mask=ok3)
            if KEEP:
                k1 = k0 + n_cols
                k2 = k1 + n_cols
                k3 = k2 + n_cols
                ty = keep_ptr.dtype.element_ty
                tl.store(k0, acc0.to(ty), mask=ok1)
                tl.store(k1, acc1.to(ty), mask=ok2)
                tl.store(k2, acc2.to(ty), mask=ok3)
                tl.store(k3, acc.to(ty), mask=ok & (slot + 4 < n_slots))
                k0 = k3 + n_cols
            p0 = p3 + n_cols

    @triton.jit
    def _cumsum_kernel(s_ptr, z_ptr, ks_ptr, kz_ptr, n_slots, n_s, n_z, KEEP: tl.constexpr, BLOCK: tl.constexpr):
        """``_cumsum_cols`` of the carried sums s (n_slots, n_s) and their normalizer sums z (n_slots, n_z): the
        first cdiv(n_s, BLOCK) programs take s, the rest z."""
        pid = tl.program_id(0)
        n_s_programs = tl.cdiv(n_s, BLOCK)
        if pid < n_s_programs:
            cols = pid * BLOCK + tl.arange(0, BLOCK)
            _cumsum_cols(s_ptr, ks_ptr, cols, cols < n_s, n_slots, n_s, KEEP, BLOCK)
        else:
            cols = (pid - n_s_programs) * BLOCK + tl.arange(0, BLOCK)
            _cumsum_cols(z_ptr, kz_ptr, cols, cols < n_z, n_slots, n_z, KEEP, BLOCK)


CUMSUM_BLOCK = 512
"""columns per program of the carried sums' cumsum over segments (one fp32 read and write of every slot)"""


def _cumsum_(s: Tensor, z: Tensor, keep: Optional[tuple[Tensor, Tensor]] = None) -> tuple[Tensor, Tensor]:
    """s.cumsum_(0), z.cumsum_(0) for the contiguous fp32 (slots, ...) carried sums in one launch (an rfa step at
    16k on an H100: two launches, 0.049 ms; torch's scans took 0.112 ms, BENCHMARKS.md session 14); ``keep``:
    (s, z)-shaped buffers with one slot fewer that receive slots 0..slots-2 of the result (the segment starts), in
    their dtype."""
    n_s, n_z = s[0].numel(), z[0].numel()
    grid = (triton.cdiv(n_s, CUMSUM_BLOCK) + triton.cdiv(n_z, CUMSUM_BLOCK),)
    ks, kz = keep if keep is not None else (s, z)
    _cumsum_kernel[grid](s, z, ks, kz, s.shape[0], n_s, n_z, KEEP=keep is not None, BLOCK=CUMSUM_BLOCK, num_warps=4)
    return s, z


def _strides(x: Optional[Tensor]) -> tuple:
    """(batch, head, token) strides of a (B, H, T, ...) tensor; a key weight (B, H or 1, T) broadcasts heads."""
    if x is None:
        return 0, 0, 0
    return x.stride(0), x.stride(1) if x.shape[1] > 1 else 0, x.stride(2)


class _Plan:
    """Shapes and constants shared by the launches of one call."""

    def __init__(self, feat: int, q: Tensor, v: Tensor, w: Tensor, kcoef: float, floor: float):
        self.feat = feat
        self.b, self.h, self.t, self.d = q.shape
        self.dv = v.shape[-1]
        self.m = w.shape[1]
        self.ms = self.m * (1 + feat)
        self.bh = self.b * self.h
        self.seg = segment_length(self.t, self.bh)
        self.nseg = -(-self.t // self.seg)
        self.kcoef, self.floor = kcoef, floor
        self.inv_sqrt_m = self.m ** -0.5
        exact = q.dtype == torch.float32
        self.consts = dict(FEAT=feat, C=CHUNK, D=self.d, DV=self.dv, BM=block_m(self.m, feat),
                           PREC=("tf32x3" if q.is_cuda else "ieee") if exact else "tf32",
                           DT=tl.float32 if exact else (tl.bfloat16 if q.dtype == torch.bfloat16 else tl.float16),
                           num_warps=NUM_WARPS, num_stages=NUM_STAGES, FAST=q.is_cuda)
        self.sums_consts = dict(self.consts, C=SUMS_CHUNK[feat] if SUMS_CHUNK else CHUNK,
                                BM=block_m(self.m, feat, SUMS_BLOCK_M),
                                num_warps=SUMS_WARPS or NUM_WARPS, num_stages=SUMS_STAGES)

    def grid(self):
        return self.nseg, self.bh

    def sums_grid(self):
        """The segment-sums kernel's grid: one program per (segment, head, feature block)."""
        return self.nseg, self.bh, self.m // self.sums_consts["BM"]

    def sums(self, device, slots: Optional[int] = None, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """Uninitialised carried sums (slots (default nseg + 1), BH, MS, DV) in ``dtype`` and (slots, BH, MS) fp32."""
        slots = self.nseg + 1 if slots is None else slots
        return (torch.empty(slots, self.bh, self.ms, self.dv, device=device, dtype=dtype),
                torch.empty(slots, self.bh, self.ms, device=device, dtype=torch.float32))


def _segment_starts(p: _Plan, q, k, v, cw, w, bq, bk, s0: Tensor, z0: Tensor,
                    keep: Optional[tuple[Tensor, Tensor]] = None):
    """Carried sums at the start of every segment (slots 0..nseg-1) and at the end (slot nseg); ``keep``: buffers
    for a copy of slots 0..nseg-1 (see ``_cumsum_``)."""
    s, z = p.sums(q.device)
    if s0 is None:                                               # no carried state: start from zeros
        s[0].zero_()
        z[0].zero_()
    else:
        s[0].view(p.b, p.h, p.ms, p.dv).copy_(s0)
        z[0].view(p.b, p.h, p.ms).copy_(z0)
    _segment_sums_kernel[p.sums_grid()](
        q, k, v, cw, w, bq, bk, s, s, s, s, s, z, p.t, p.h, p.m, p.seg, p.nseg, p.kcoef, p.inv_sqrt_m, p.floor,
        *_strides(q), *_strides(k), *_strides(v), *_strides(cw), 0, 0, 0, 0, 0, 0,
        HAS_CW=cw is not None, REVERSE=False, **p.sums_consts)
    return _cumsum_(s, z, keep)


class FusedRandomFeatureAttention(torch.autograd.Function):
    """Causal random-feature attention by the fused kernels: (out (B, H, T, dv) viewed from (B, T, H, dv)
    storage, end sums S (B, H, M, dv), z (B, H, M)). Inputs: the feature directions w (H, m, dh) fp32 (fixed),
    a per-head scale of the exponents (H,) (RFA's sqrt(tau); ones for Performer) and biases bq, bk (H, m): the
    exponents are scale_h (w . x) + b. The key weight cw (B, H or 1, T) or None, the carried sums (no gradient;
    the end sums are not differentiable). Gradients: q, k, v and (RFA) the scale, d scale_h = sum da (w . x)
    = sum da a / scale_h over tokens and features of head h (per program in the kernels, no (m, dh) scratch)."""

    @staticmethod
    def forward(ctx, feat: int, q, k, v, cw, w, scale, bq, bk, s0, z0, kcoef: float, floor: float, donate: bool):
        p = _Plan(feat, q, v, w, kcoef, floor)
        ws = (w * scale[:, None, None]).contiguous()
        keep = p.sums(q.device, p.nseg, torch.float32 if q.dtype == torch.float32 else torch.bfloat16) \
            if KEEP_STARTS and any(ctx.needs_input_grad) and not _saved_tensor_hooks() else None
        s, z = _segment_starts(p, q, k, v, cw, ws, bq, bk, s0, z0, keep)
        s_end = s[-1].view(p.b, p.h, p.ms, p.dv).clone()
        z_end = z[-1].view(p.b, p.h, p.ms).clone()
        out = torch.empty(p.b, p.t, p.h, p.dv, device=q.device, dtype=v.dtype).transpose(1, 2)
        den = torch.empty(p.bh, p.t, device=q.device, dtype=torch.float32)
        mx = torch.empty(p.bh, p.t, device=q.device, dtype=torch.float32)     # Performer: written, read per token
        _forward_kernel[p.grid()](
            q, k, v, cw, ws, bq, bk, mx, out, den, s, z, p.t, p.h, p.m, p.seg, p.kcoef, p.inv_sqrt_m, p.floor,
            *_strides(q), *_strides(k), *_strides(v), *_strides(cw), *_strides(out),
            HAS_CW=cw is not None, **p.consts)
        del s, z
        # the kept starts are an intermediate, held on ctx (not saved) so backward can free them after the dq walk;
        # not kept without a backward to come, nor under saved-tensor hooks (activation checkpointing, offloading:
        # those would not see a ctx attribute, so backward recomputes the starts)
        ctx.plan, ctx.donate, ctx.keep = p, donate, keep
        ctx.save_for_backward(q, k, v, cw, ws, scale, bq, bk, s0, z0, out, den, mx)
        ctx.mark_non_differentiable(s_end, z_end)
        return out, s_end, z_end

    @staticmethod
    def backward(ctx, g_out, _g_s, _g_z):
        q, k, v, cw, ws, scale, bq, bk, s0, z0, out, den, mx = ctx.saved_tensors
        p = ctx.plan
        need_ds = p.feat == FEAT_TRIG and ctx.needs_input_grad[6]
        g = g_out if g_out.stride(-1) == 1 else g_out.contiguous()
        ds = torch.empty(2, p.nseg, p.b, p.h, device=q.device, dtype=torch.float32) if need_ds else den
        common = dict(HAS_CW=cw is not None, NEED_DS=need_ds, **p.consts)
        kept = _graph_kept()
        if ctx.keep is None:
            s, z = _segment_starts(p, q, k, v, cw, ws, bq, bk, s0, z0)
        else:               # the walk updates its slots in place: the kept starts are used up unless kept for later
            s, z = (x.to(torch.float32, copy=kept) for x in ctx.keep)
            if not kept:
                ctx.keep = None                         # the bfloat16 copy is freed before dq is allocated
        dq = torch.empty_like(q)
        _dq_kernel[p.grid()](
            q, k, v, cw, ws, bq, bk, mx, out, g, den, s, z, dq, ds, p.t, p.h, p.m, p.seg, p.kcoef, p.inv_sqrt_m,
            p.floor, *_strides(q), *_strides(k), *_strides(v), *_strides(cw), *_strides(out), *_strides(g),
            *_strides(dq), **common)
        del s, z
        r, rz = p.sums(q.device)
        r[0].zero_()
        rz[0].zero_()
        _segment_sums_kernel[p.sums_grid()](
            q, k, v, cw, ws, bq, bk, mx, out, g, den, r, rz, p.t, p.h, p.m, p.seg, p.nseg, p.kcoef, p.inv_sqrt_m,
            p.floor, *_strides(q), *_strides(k), *_strides(v), *_strides(cw), *_strides(out), *_strides(g),
            HAS_CW=cw is not None, REVERSE=True, **p.sums_consts)
        _cumsum_(r, rz)
        donate = ctx.donate and not kept
        dk, dv = (k, v) if donate else (torch.empty_like(k), torch.empty_like(v))
        _dkdv_kernel[p.grid()](
            q, k, v, cw, ws, bq, bk, mx, out, g, den, r, rz, dk, dv, ds, p.t, p.h, p.m, p.seg, p.nseg, p.kcoef,
            p.inv_sqrt_m, p.floor, *_strides(q), *_strides(k), *_strides(v), *_strides(cw), *_strides(out),
            *_strides(g), *_strides(dk), *_strides(dv), **common)
        dscale = ds.sum((0, 1, 2)) / scale if need_ds else None
        return None, dq, dk.detach(), dv.detach(), None, None, dscale, None, None, None, None, None, None, None


def _saved_tensor_hooks() -> bool:
    """Whether saved-tensor hooks are active (``torch.utils.checkpoint``, ``save_on_cpu``)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is not None and top(False) is not None


def _graph_kept() -> bool:
    """Whether the running backward keeps the graph (``retain_graph=True``): a later backward reads k, v again."""
    kept = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if kept is None else bool(kept())


def fused_random_features(feat: int, q: Tensor, k: Tensor, v: Tensor, cw: Optional[Tensor], w: Tensor,
                          scale: Tensor, bq: Tensor, bk: Tensor, s0: Optional[Tensor], z0: Optional[Tensor],
                          kcoef: float, floor: float, donate_kv: bool = False):
    """Causal random-feature attention by the fused kernels; see ``FusedRandomFeatureAttention``. Returns
    (out (B, H, T, dv), S_end (B, H, M, dv), z_end (B, H, M)), M = m (Performer) or 2m (RFA). The carried sums
    s0 (B, H, M, dv), z0 (B, H, M): both None for a fresh start.

    ``donate_kv``: the caller hands k and v over (nothing else reads them after this call, as the fresh projections
    inside a layer's forward): backward then writes dk, dv into their storage instead of two new tensors, so the
    peak of the step, which is in the dk / dv walk, holds two fewer (B, T, H, dh) tensors (32 MiB at T = 16k, 8 x 64
    bf16 heads). Not done when the backward keeps the graph (``retain_graph=True``: k, v are read again) or when
    q, k, v share storage."""
    if q.shape[-1] != w.shape[-1]:
        raise ValueError(f"feature directions of width {w.shape[-1]} for heads of width {q.shape[-1]}")
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    donate_kv = donate_kv and len({x.untyped_storage().data_ptr() for x in (q, k, v)}) == 3
    return FusedRandomFeatureAttention.apply(feat, q, k, v, cw, w.detach().float(), scale.float(),
                                             bq.float().contiguous(), bk.float().contiguous(),
                                             *(None if x is None else x.detach().float() for x in (s0, z0)), kcoef,
                                             floor, donate_kv)



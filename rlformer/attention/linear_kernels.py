"""Triton kernels of causal linear attention from features (Performer / RFA without the gate), CUDA.

The causal sums out_t = phi(q_t)^T S_t / phi(q_t)^T z_t, S_t = sum_{s<=t} phi(k_s) v_s^T, z_t = sum_{s<=t} phi(k_s)
(``random_features``' chunk form, GLA / flash-linear-attention's chunk algorithm) as three kernels that keep the
running sums in registers, split the sequence into S segments of whole chunks so that B * H * S programs fill the
GPU, and write no per-chunk tensor to memory:

1. ``segment_sums``: each segment's sum of a_t b_t^T (and of a_t c_t): phi(K)^T V and phi(K)^T 1 forward,
   phi(Q)^T dY backward; the prefix over segments (a cumsum of S small (M, dh) matrices) gives every segment's
   starting state.
2. ``forward``: from its starting state, a segment runs its chunks in order, for chunk c with P = tril(Q_c K_c^T)
       num = P V_c + Q_c S,  den = P 1 + Q_c z,  out = num / max(den, floor),  S += K_c^T V_c,  z += K_c^T 1.
   In its "delta" mode (used by backward, which keeps no output) it writes instead the two per-token factors of
   the gradient: r = 1 / max(den, floor) and g = -(dout . out) r [den >= floor] (the normalizer's gradient).
   A query with den = 0 exactly (no key with a nonzero weight before it and no carried sums: a padded start) gets
   r = 0: its output num / floor is 0 whatever the inputs (every term carries a zero key weight), so its exact
   gradient is 0, while 1 / floor (1e38 for Performer's floor) times unweighted values overflows float32.
3. ``backward``: with dY = [dout r, g] the gradient of [num, den], the segment runs its chunks forward for
       dQ_c = tril(dY_c [V_c, 1]^T) K_c + dY_c [S, z]^T
   and backward (from the gradient of the state at its end, a reverse prefix of step 1's sums) for
       dK_c = tril(dY_c [V_c, 1]^T)^T Q_c + [V_c, 1] [dS, dz]^T,  dV_c = P^T (dout r)_c + K_c dS,
       dS += Q_c^T (dout r)_c,  dz += Q_c^T g_c.
Sums and the state are float32; the matmuls take the 16-bit input dtype (tensor cores) as the aten chunk form does,
and full float32 (``input_precision="ieee"``) for float32 inputs. Features wider than a power of two or a ragged
last chunk are zero-padded by masked loads (zero features and zero keys add nothing).

Equal to ``random_features._group_forward`` / ``_group_backward`` (their aten path, which runs on the CPU): the
tests run these kernels under Triton's interpreter on the CPU (``interpreted``), and on CUDA against the CPU
float64 path.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from rlformer.attention.compiled import fusion_enabled

try:
    import triton
    import triton.language as tl
except ImportError:          # CPU-only installs: the aten chunk form runs
    triton = None


def available(x: Tensor) -> bool:
    """Whether the kernels run for features ``x``: a CUDA tensor, Triton importable, fusion not disabled
    (``RLFORMER_FUSED=0`` or ``RLFORMER_LINEAR_KERNELS=0`` turn them off)."""
    return (triton is not None and x.is_cuda and fusion_enabled()
            and os.environ.get("RLFORMER_LINEAR_KERNELS", "1") != "0")


if triton is not None:
    @triton.jit
    def _mm(a, b, IEEE: tl.constexpr):
        """a @ b accumulated in float32; full float32 products for float32 inputs (IEEE), tensor cores otherwise."""
        if IEEE:
            return tl.dot(a, b, input_precision="ieee")
        return tl.dot(a, b)

    @triton.jit
    def _rows(ptr, sb, sh, st, bb, hh, t64, cols, ok, width):
        """Rows t of a (B, H, T, width) tensor (unit last stride) at columns ``cols``; zeros outside."""
        return tl.load(ptr + bb * sb + hh * sh + t64[:, None] * st + cols[None, :],
                       mask=ok[:, None] & (cols[None, :] < width), other=0.0)

    @triton.jit
    def _segment_sums_kernel(a_ptr, sab, sah, sat, b_ptr, sbb, sbh, sbt, r_ptr, c_ptr, s_ptr, z_ptr,
                             T, H, SEG, NSEG, M, D,
                             HAS_R: tl.constexpr, HAS_C: tl.constexpr, IEEE: tl.constexpr, C: tl.constexpr,
                             BM: tl.constexpr, BD: tl.constexpr):
        """s[bh, g] = sum_t a_t (b_t r_t)^T and z[bh, g] = sum_t a_t c_t (c = 1 without HAS_C) over segment g,
        features m0 .. m0 + BM of a (program axis 2)."""
        g = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        m0 = tl.program_id(2) * BM
        bb, hh = bh // H, bh % H
        rows = tl.arange(0, C)
        mi = m0 + tl.arange(0, BM)
        di = tl.arange(0, BD)
        acc = tl.zeros((BM, BD), dtype=tl.float32)
        accz = tl.zeros((BM,), dtype=tl.float32)
        start = g * SEG
        end = tl.minimum(start + SEG, T)
        for c0 in range(start, end, C):
            t = c0 + rows
            ok = t < end
            t64 = t.to(tl.int64)
            a = _rows(a_ptr, sab, sah, sat, bb, hh, t64, mi, ok, M)
            x = _rows(b_ptr, sbb, sbh, sbt, bb, hh, t64, di, ok, D)
            if HAS_R:
                rr = tl.load(r_ptr + bh * T + t, mask=ok, other=0.0)
                x = x.to(tl.float32) * rr[:, None]
            acc += _mm(tl.trans(a), x.to(a.dtype), IEEE)
            if HAS_C:
                cc = tl.load(c_ptr + bh * T + t, mask=ok, other=0.0)
                accz += tl.sum(a.to(tl.float32) * cc[:, None], axis=0)
            else:
                accz += tl.sum(a.to(tl.float32), axis=0)
        out = (bh * NSEG + g) * M
        tl.store(s_ptr + (out + mi[:, None]) * D + di[None, :], acc, mask=(mi[:, None] < M) & (di[None, :] < D))
        tl.store(z_ptr + out + mi, accz, mask=mi < M)

    @triton.jit
    def _forward_kernel(q_ptr, sqb, sqh, sqt, k_ptr, skb, skh, skt, v_ptr, svb, svh, svt, s_ptr, z_ptr,
                        o_ptr, sob, soh, sot, do_ptr, sdb, sdh, sdt, r_ptr, g_ptr,
                        T, H, SEG, NSEG, M, D, floor,
                        SPLIT: tl.constexpr, DELTA: tl.constexpr, IEEE: tl.constexpr, C: tl.constexpr,
                        BM: tl.constexpr, BD: tl.constexpr):
        """Segment g from its starting state (s, z). One feature block (SPLIT False): the outputs, or with DELTA
        r and g of the gradient. Features split over program axis 2 (SPLIT): this block's share of the numerator
        and normalizer, added atomically into o (B * H, T, D) and r (B * H, T) float32 (zeroed)."""
        g = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        m0 = tl.program_id(2) * BM
        bb, hh = bh // H, bh % H
        rows = tl.arange(0, C)
        mi = m0 + tl.arange(0, BM)
        di = tl.arange(0, BD)
        st = (bh * NSEG + g) * M
        state = tl.load(s_ptr + (st + mi[:, None]) * D + di[None, :], mask=(mi[:, None] < M) & (di[None, :] < D),
                        other=0.0)
        z = tl.load(z_ptr + st + mi, mask=mi < M, other=0.0)
        start = g * SEG
        end = tl.minimum(start + SEG, T)
        for c0 in range(start, end, C):
            t = c0 + rows
            ok = t < end
            t64 = t.to(tl.int64)
            q = _rows(q_ptr, sqb, sqh, sqt, bb, hh, t64, mi, ok, M)
            k = _rows(k_ptr, skb, skh, skt, bb, hh, t64, mi, ok, M)
            v = _rows(v_ptr, svb, svh, svt, bb, hh, t64, di, ok, D).to(q.dtype)
            p = tl.where(rows[:, None] >= rows[None, :], _mm(q, tl.trans(k), IEEE), 0.0)
            num = _mm(p.to(q.dtype), v, IEEE) + _mm(q, state.to(q.dtype), IEEE)
            den = tl.sum(p, axis=1) + tl.sum(q.to(tl.float32) * z[None, :], axis=1)
            if SPLIT:
                tl.atomic_add(o_ptr + (bh * T + t64)[:, None] * D + di[None, :], num,
                              mask=ok[:, None] & (di[None, :] < D))
                tl.atomic_add(r_ptr + bh * T + t, den, mask=ok)
            else:
                dc = tl.maximum(den, floor)
                if DELTA:
                    dout = _rows(do_ptr, sdb, sdh, sdt, bb, hh, t64, di, ok, D).to(tl.float32)
                    r = tl.where(den == 0.0, 0.0, 1.0 / dc)
                    gd = tl.where(den >= floor, -tl.sum(dout * num, axis=1) * r * r, 0.0)
                    tl.store(r_ptr + bh * T + t, r, mask=ok)
                    tl.store(g_ptr + bh * T + t, gd, mask=ok)
                else:
                    out = num / dc[:, None]
                    tl.store(o_ptr + bb * sob + hh * soh + t64[:, None] * sot + di[None, :],
                             out.to(o_ptr.dtype.element_ty), mask=ok[:, None] & (di[None, :] < D))
            state += _mm(tl.trans(k), v, IEEE)
            z += tl.sum(k.to(tl.float32), axis=0)

    @triton.jit
    def _backward_kernel(q_ptr, sqb, sqh, sqt, k_ptr, skb, skh, skt, v_ptr, svb, svh, svt,
                         do_ptr, sdb, sdh, sdt, r_ptr, g_ptr, s_ptr, z_ptr, ds_ptr, dz_ptr,
                         dq_ptr, dk_ptr, dv_ptr, T, H, SEG, NSEG, M, D,
                         SPLIT: tl.constexpr, IEEE: tl.constexpr, C: tl.constexpr, BM: tl.constexpr,
                         BD: tl.constexpr):
        """dq, dk (this program's feature block) and dv of segment g from its starting state (s, z) and the state's
        gradient at its end (ds, dz); with SPLIT each feature block adds its share of dv atomically (dv zeroed).
        dq / dk: (B * H, T, M) and dv: (B * H, T, D) float32, contiguous."""
        g = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        m0 = tl.program_id(2) * BM
        bb, hh = bh // H, bh % H
        rows = tl.arange(0, C)
        mi = m0 + tl.arange(0, BM)
        di = tl.arange(0, BD)
        st = (bh * NSEG + g) * M
        smask = (mi[:, None] < M) & (di[None, :] < D)
        start = g * SEG
        end = tl.minimum(start + SEG, T)
        causal = rows[:, None] >= rows[None, :]
        # forward over the chunks: dq
        state = tl.load(s_ptr + (st + mi[:, None]) * D + di[None, :], mask=smask, other=0.0)
        z = tl.load(z_ptr + st + mi, mask=mi < M, other=0.0)
        for c0 in range(start, end, C):
            t = c0 + rows
            ok = t < end
            t64 = t.to(tl.int64)
            k = _rows(k_ptr, skb, skh, skt, bb, hh, t64, mi, ok, M)
            v = _rows(v_ptr, svb, svh, svt, bb, hh, t64, di, ok, D).to(k.dtype)
            r = tl.load(r_ptr + bh * T + t, mask=ok, other=0.0)
            gd = tl.load(g_ptr + bh * T + t, mask=ok, other=0.0)
            gn = (_rows(do_ptr, sdb, sdh, sdt, bb, hh, t64, di, ok, D).to(tl.float32) * r[:, None]).to(k.dtype)
            dp = tl.where(causal, _mm(gn, tl.trans(v), IEEE) + gd[:, None], 0.0)
            dq = _mm(dp.to(k.dtype), k, IEEE) + _mm(gn, tl.trans(state.to(k.dtype)), IEEE)
            dq += gd[:, None] * z[None, :]
            tl.store(dq_ptr + (bh * T + t64)[:, None] * M + mi[None, :], dq.to(dq_ptr.dtype.element_ty),
                     mask=ok[:, None] & (mi[None, :] < M))
            state += _mm(tl.trans(k), v, IEEE)
            z += tl.sum(k.to(tl.float32), axis=0)
        # backward over the chunks: dk, dv
        dstate = tl.load(ds_ptr + (st + mi[:, None]) * D + di[None, :], mask=smask, other=0.0)
        dz = tl.load(dz_ptr + st + mi, mask=mi < M, other=0.0)
        n_chunks = tl.cdiv(end - start, C)
        for j in range(0, n_chunks):
            t = start + (n_chunks - 1 - j) * C + rows
            ok = t < end
            t64 = t.to(tl.int64)
            q = _rows(q_ptr, sqb, sqh, sqt, bb, hh, t64, mi, ok, M)
            k = _rows(k_ptr, skb, skh, skt, bb, hh, t64, mi, ok, M)
            v = _rows(v_ptr, svb, svh, svt, bb, hh, t64, di, ok, D).to(k.dtype)
            r = tl.load(r_ptr + bh * T + t, mask=ok, other=0.0)
            gd = tl.load(g_ptr + bh * T + t, mask=ok, other=0.0)
            gn = (_rows(do_ptr, sdb, sdh, sdt, bb, hh, t64, di, ok, D).to(tl.float32) * r[:, None]).to(k.dtype)
            p = tl.where(causal, _mm(q, tl.trans(k), IEEE), 0.0).to(k.dtype)
            dp = tl.where(causal, _mm(gn, tl.trans(v), IEEE) + gd[:, None], 0.0).to(k.dtype)
            dk = _mm(tl.trans(dp), q, IEEE) + _mm(v, tl.trans(dstate.to(k.dtype)), IEEE) + dz[None, :]
            dv = _mm(tl.trans(p), gn, IEEE) + _mm(k, dstate.to(k.dtype), IEEE)
            tl.store(dk_ptr + (bh * T + t64)[:, None] * M + mi[None, :], dk.to(dk_ptr.dtype.element_ty),
                     mask=ok[:, None] & (mi[None, :] < M))
            dv_at = dv_ptr + (bh * T + t64)[:, None] * D + di[None, :]
            if SPLIT:
                tl.atomic_add(dv_at, dv, mask=ok[:, None] & (di[None, :] < D))
            else:
                tl.store(dv_at, dv, mask=ok[:, None] & (di[None, :] < D))
            dstate += _mm(tl.trans(q), gn, IEEE)
            dz += tl.sum(q.to(tl.float32) * gd[:, None], axis=0)


def interpreted() -> bool:
    """Whether Triton runs its interpreter (``TRITON_INTERPRET=1`` set before triton was imported): the kernels then
    take CPU tensors (the tests' conftest sets it on machines without CUDA)."""
    if triton is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(_forward_kernel, InterpretedFunction)


def _kernel(k, x: Tensor):
    if not x.is_cuda and not interpreted():
        raise RuntimeError("linear_kernels run on CUDA tensors, or on CPU tensors under Triton's interpreter "
                           "(set TRITON_INTERPRET=1 before importing triton); the CPU path of random-feature "
                           "attention is random_features' aten chunk form")
    return k


CHUNK = 64
"""Tokens per chunk of the kernels (a tile: a power of two >= 16). The chunk form's result does not depend on it, so
``random_features.chunk_size`` (the aten form's chunk) does not set it."""
BLOCK_M = 64
"""Features per program: wider feature maps (Performer's 256, RFA's sin and cos) run one program per block of
features, which add their shares of the numerator, normalizer and dv atomically (float32)."""


def _pow2(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def _blocks(m: int) -> tuple[int, int]:
    """(features per program, number of feature blocks)."""
    bm = min(BLOCK_M, _pow2(m))
    return bm, -(-m // bm)


def _strides(x: Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _unit_last(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def segment_length(t: int, programs: int, chunk: int, device: torch.device) -> int:
    """Tokens per segment (whole chunks): about two programs per SM over ``programs`` (B * H * feature blocks)
    times the segments on CUDA; 1024 tokens on the CPU."""
    n_chunks = -(-t // chunk)
    if device.type != "cuda":
        return chunk * max(1, min(n_chunks, 1024 // chunk))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    per = max(1, -(-n_chunks * programs // (2 * sms)))
    return chunk * per


def _config(bm: int, d: int) -> dict:
    return {"num_warps": 4 if max(bm, d) <= 64 else 8, "num_stages": 2}


def segment_sums(a: Tensor, b: Tensor, seg: int, chunk: int, r: Optional[Tensor] = None,
                 c: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(S (B, H, n_seg, M, D), Z (B, H, n_seg, M)) float32: per segment of ``seg`` tokens, sum_t a_t (r_t b_t)^T and
    sum_t c_t a_t. a (B, H, T, M), b (B, H, T, D), r / c (B, H, T) float32 or None (1)."""
    bsz, h, t, m = a.shape
    d = b.shape[-1]
    a, b = _unit_last(a), _unit_last(b)
    nseg = -(-t // seg)
    bm, nm = _blocks(m)
    s = torch.empty(bsz, h, nseg, m, d, dtype=torch.float32, device=a.device)
    z = torch.empty(bsz, h, nseg, m, dtype=torch.float32, device=a.device)
    _kernel(_segment_sums_kernel, a)[(nseg, bsz * h, nm)](
        a, *_strides(a), b, *_strides(b), z if r is None else r.contiguous(), z if c is None else c.contiguous(),
        s, z, t, h, seg, nseg, m, d, HAS_R=r is not None, HAS_C=c is not None, IEEE=a.dtype == torch.float32,
        C=chunk, BM=bm, BD=_pow2(d), **_config(bm, d))
    return s, z


def _prefix(s: Tensor, z: Tensor, s0: Tensor, z0: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(starting S, starting z of every segment, S and z at the end) from the segment sums and the carried sums."""
    cs, cz = s.cumsum(2), z.cumsum(2)
    return (s0[:, :, None] + cs - s).contiguous(), (z0[:, :, None] + cz - z).contiguous(), \
        s0 + cs[:, :, -1], z0 + cz[:, :, -1]


def _states(phi_q: Tensor, phi_k: Tensor, v: Tensor, s0: Tensor, z0: Tensor, chunk: int, segment: Optional[int]):
    """(inputs with unit last strides, segment length, segment starting S and z, end S and z, launch constants)."""
    bsz, h, t, m = phi_q.shape
    d = v.shape[-1]
    bm, nm = _blocks(m)
    seg = segment or segment_length(t, bsz * h * nm, chunk, phi_q.device)
    if seg % chunk:
        raise ValueError(f"segment={seg} must be a multiple of the kernel chunk {chunk}")
    phi_q, phi_k, v = _unit_last(phi_q), _unit_last(phi_k), _unit_last(v)
    s, z = segment_sums(phi_k, v, seg, chunk)
    s_start, z_start, s_end, z_end = _prefix(s, z, s0.float(), z0.float())
    consts = dict(IEEE=phi_q.dtype == torch.float32, C=chunk, BM=bm, BD=_pow2(d), **_config(bm, d))
    grid = (s_start.shape[2], bsz * h, nm)
    return (phi_q, phi_k, v), seg, s_start, z_start, s_end, z_end, consts, grid


def forward(phi_q: Tensor, phi_k: Tensor, v: Tensor, s0: Tensor, z0: Tensor, floor: float, out_dtype: torch.dtype,
            chunk: int = CHUNK, segment: Optional[int] = None) -> tuple[Tensor, Tensor, Tensor]:
    """(out (B, H, T, D) in ``out_dtype``, S_end (B, H, M, D), z_end (B, H, M)) of causal linear attention from
    the carried sums s0 (B, H, M, D) / z0 (B, H, M) (float32). phi_q, phi_k (B, H, T, M) and v (B, H, T, D); the
    matmuls take phi's dtype (v is cast to it). ``segment``: tokens per segment (whole chunks; default
    ``segment_length``)."""
    bsz, h, t, m = phi_q.shape
    d = v.shape[-1]
    (phi_q, phi_k, v), seg, s_start, z_start, s_end, z_end, consts, grid = _states(phi_q, phi_k, v, s0, z0, chunk,
                                                                                   segment)
    args = (phi_q, *_strides(phi_q), phi_k, *_strides(phi_k), v, *_strides(v), s_start, z_start)
    if grid[2] == 1:
        out = torch.empty(bsz, h, t, d, dtype=out_dtype, device=v.device)
        _kernel(_forward_kernel, phi_q)[grid](*args, out, *_strides(out), out, 0, 0, 0, z_start, z_start,
                                               t, h, seg, grid[0], m, d, floor, SPLIT=False, DELTA=False, **consts)
    else:
        num, den = _split_num_den(args, phi_q, bsz, h, t, m, d, seg, grid, floor, consts)
        out = (num / den.clamp(min=floor)[..., None]).view(bsz, h, t, d).to(out_dtype)
    return out, s_end, z_end


def _split_num_den(args, phi_q, bsz, h, t, m, d, seg, grid, floor, consts):
    """Numerator (B * H, T, D) and normalizer (B * H, T), float32, summed over the feature blocks' programs."""
    num = torch.zeros(bsz * h, t, d, dtype=torch.float32, device=phi_q.device)
    den = torch.zeros(bsz * h, t, dtype=torch.float32, device=phi_q.device)
    _kernel(_forward_kernel, phi_q)[grid](*args, num, 0, 0, 0, num, 0, 0, 0, den, den, t, h, seg, grid[0], m, d,
                                          floor, SPLIT=True, DELTA=False, **consts)
    return num, den


def backward(phi_q: Tensor, phi_k: Tensor, v: Tensor, s0: Tensor, z0: Tensor, floor: float, dout: Tensor,
             ds_end: Optional[Tensor], dz_end: Optional[Tensor], chunk: int = CHUNK, segment: Optional[int] = None):
    """Gradients of ``forward`` for dL/dout ``dout`` (B, H, T, D) and dL/d(S_end, z_end) (or None): (d phi_q,
    d phi_k in phi's dtype, dv (B, H, T, D) float32, ds0 (B, H, M, D), dz0 (B, H, M) float32). Recomputes the
    forward's segment states and normalizers; keeps nothing per chunk."""
    bsz, h, t, m = phi_q.shape
    d = v.shape[-1]
    (phi_q, phi_k, v), seg, s_start, z_start, _, _, consts, grid = _states(phi_q, phi_k, v, s0, z0, chunk, segment)
    dout = _unit_last(dout)
    nseg = grid[0]
    args = (phi_q, *_strides(phi_q), phi_k, *_strides(phi_k), v, *_strides(v), s_start, z_start)
    if grid[2] == 1:
        r = torch.empty(bsz, h, t, dtype=torch.float32, device=v.device)
        g = torch.empty_like(r)
        _kernel(_forward_kernel, phi_q)[grid](*args, dout, 0, 0, 0, dout, *_strides(dout), r, g, t, h, seg, nseg,
                                              m, d, floor, SPLIT=False, DELTA=True, **consts)
    else:
        num, den = _split_num_den(args, phi_q, bsz, h, t, m, d, seg, grid, floor, consts)
        r = torch.where(den == 0, 0.0, 1.0 / den.clamp(min=floor))
        delta = torch.linalg.vecdot(dout.reshape(bsz * h, t, d).float(), num)
        g = torch.where(den >= floor, -delta * r * r, 0.0).view(bsz, h, t)
        r = r.view(bsz, h, t)
        del num, den, delta
    # gradient of the state at each segment's end: what the later segments (and the end state) send back
    gs, gz = segment_sums(phi_q, dout, seg, chunk, r=r, c=g)
    ds_end = torch.zeros(bsz, h, m, d, dtype=torch.float32, device=v.device) if ds_end is None else ds_end.float()
    dz_end = torch.zeros(bsz, h, m, dtype=torch.float32, device=v.device) if dz_end is None else dz_end.float()
    later_s = gs.flip(2).cumsum(2).flip(2) - gs
    later_z = gz.flip(2).cumsum(2).flip(2) - gz
    ds0 = ds_end + gs.sum(2)
    dz0 = dz_end + gz.sum(2)
    seg_ds = (ds_end[:, :, None] + later_s).contiguous()
    seg_dz = (dz_end[:, :, None] + later_z).contiguous()
    del gs, gz, later_s, later_z
    dq = torch.empty(bsz, h, t, m, dtype=phi_q.dtype, device=v.device)
    dk = torch.empty_like(dq)
    split = grid[2] > 1
    dv = (torch.zeros if split else torch.empty)(bsz, h, t, d, dtype=torch.float32, device=v.device)
    _kernel(_backward_kernel, phi_q)[grid](
        phi_q, *_strides(phi_q), phi_k, *_strides(phi_k), v, *_strides(v), dout, *_strides(dout), r, g,
        s_start, z_start, seg_ds, seg_dz, dq, dk, dv, t, h, seg, nseg, m, d, SPLIT=split, **consts)
    return dq, dk, dv, ds0, dz0

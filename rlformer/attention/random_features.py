"""Random-feature attention: Performer FAVOR+ (Choromanski et al. 2021) and RFA (Peng et al. 2021).

Both replace exp(q . k) by phi(q) . phi(k) with random features phi, so attention becomes
linear in T:  out_t = phi(q_t)^T S_t / phi(q_t)^T z_t,  S_t = sum_s phi(k_s) v_s^T,
z_t = sum_s phi(k_s), the sums running over s <= t when causal and over all s otherwise.

Causal sums use the chunk form of (gated) linear attention (as in GLA, Yang et al. 2023, and
flash-linear-attention's chunk kernels): inside a chunk of ``random_features.chunk_size`` tokens
the masked quadratic form (phi(Q) phi(K)^T * tril(decay)) [V, 1]; across chunks the chunk sums
phi(K)^T [V, 1], one batched matmul, accumulated by a cumsum (gated: one matmul with the decays
between chunks). Numerator and normalizer come together from the ones column. Training keeps
only q, k, v (and gates) for backward: features and chunk sums are recomputed in backward
(``_LinearAttention``, a hand-written chunk backward), in groups of ``recompute_group`` tokens.
Memory is O(T * dh) kept plus O(group * (M + chunk)) transient, never O(T^2). The sums at the end of a segment are the
recurrent state ({"S": (B, H, M, dh), "z": (B, H, M)}, zeros = fresh), so feeding a sequence
step by step with ``state`` equals the full causal pass. The returned state is detached (the
stop-gradient of Transformer-XL's memory): gradients flow within a segment, not into earlier
ones. Bidirectional: global sums (plus the carried state, a memory of earlier segments).
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rlformer.attention import random_features_fused as fused_rf
from rlformer.attention.base import Attention, merge_heads
from rlformer.attention.compiled import fused
from rlformer.attention.lsh import Float32Buffers, layer_generator
from rlformer.config import EncoderConfig
from rlformer.context import AttentionContext
from rlformer.registry import register

DEN_EPS = 1e-6
"""RFA's floor of the normalizer phi(q)^T z: trigonometric features can make the estimate <= 0.
Performer's positive features only need a floor for a query with no valid key (a padded token at
the start, z = 0; it then outputs 0), so it uses the dtype's smallest normal number."""


def orthogonal_gaussian(n_heads: int, m: int, d: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """(n_heads, m, d) orthogonal random features (Performer sec. 4.2, "regular" variant).

    Blocks of d rows are orthonormal (QR of a Gaussian matrix, signs fixed by diag(R) so that
    the block is Haar-distributed; without it the directions are biased); each row is rescaled by the norm
    of an independent d-dim Gaussian vector, so rows are marginally N(0, I_d) yet orthogonal
    within a block.
    """
    blocks = []
    for _ in range(-(-m // d)):
        g = torch.randn(n_heads, d, d, generator=generator)
        qmat, rmat = torch.linalg.qr(g)
        qmat = qmat * torch.sign(torch.diagonal(rmat, dim1=-2, dim2=-1))[..., None, :]   # Haar (Mezzadri 2007)
        blocks.append(qmat.transpose(-1, -2))
    w = torch.cat(blocks, dim=1)[:, :m]
    norms = torch.randn(n_heads, m, d, generator=generator).norm(dim=-1, keepdim=True)
    return w * norms


def _chunks(x: Tensor, n: int, c: int) -> Tensor:
    """(B, H, T, ...) -> (B, H, n, C, ...), zero-padded at the end to n * C tokens."""
    pad = n * c - x.shape[2]
    if pad:
        x = F.pad(x, (0, 0) * (x.dim() - 3) + (0, pad))
    return x.reshape(*x.shape[:2], n, c, *x.shape[3:])


ALIGN = 8
"""Matmul operand widths are zero-padded to a multiple of 8 elements: cuBLAS runs its fast (sm90 tensor-core)
kernels only on 16-byte aligned rows, and [v, 1] is dh + 1 wide (65 for dh = 64), the augmented feature inputs
dh + 1 or dh + 2 (on the H100, unpadded, 36 of performer's matmuls per 16k step fell back to sm75 kernels)."""

TF32_FEATURES = True
"""With 16-bit inputs, the fp32 matmuls (feature exponents x' W^T and their backward, the gated decay matmul) use
TF32 tensor cores: the features are rounded to the 16-bit dtype right after, a larger error than TF32's.
float32 / float64 inputs always keep full precision."""


def _pad_cols(x: Optional[Tensor], width: int) -> Optional[Tensor]:
    """x zero-padded on its last dim to ``width`` (None stays None)."""
    return x if x is None or x.shape[-1] == width else F.pad(x, (0, width - x.shape[-1]))


def _aligned(width: int) -> int:
    return -(-width // ALIGN) * ALIGN


@contextlib.contextmanager
def _fp32_matmuls(mm: torch.dtype):
    """TF32 for fp32 matmuls while the matmul dtype ``mm`` is 16-bit (``TF32_FEATURES``); restored after."""
    if not TF32_FEATURES or mm not in (torch.bfloat16, torch.float16):
        yield
        return
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def _exponents(x: Tensor, extras: tuple, w: Tensor) -> Tensor:
    """x' W^T for augmented inputs x' = [x, extras..., zeros] and weights W (H, M, d'): the d input columns as one
    matmul of x itself (TF32 under 16-bit inputs, ``TF32_FEATURES``), the extra columns (biases such as
    |w|^2 / 2 ~ d / 2 and squared norms, which TF32 would round to 2^-11 of their size: an error in the exponent,
    so a relative one in every feature) added exactly, elementwise. ``extras``: (B, H, T, 1) tensors or floats."""
    d = x.shape[-1]
    a = x @ w[..., :d].contiguous().transpose(-1, -2)
    for i, e in enumerate(extras):
        a = a + e * w[:, None, :, d + i]
    return a


def _matmul_dtype(v_dtype: torch.dtype, acc: torch.dtype) -> torch.dtype:
    """Batched matmuls run in the 16-bit input dtype (tensor cores; fp32 accumulation inside, as in
    flash-linear-attention's chunk kernels) and in ``acc`` otherwise; sums over chunks are always ``acc``."""
    return v_dtype if v_dtype in (torch.bfloat16, torch.float16) else acc


def _chunk_pass(q: Tensor, k: Tensor, v1: Tensor, lg: Optional[Tensor], s0: Tensor) -> dict:
    """The chunk form of (gated) causal linear attention, shared by forward and backward.

    q, k: (B, H, n, C, M) and v1 = [v, 1]: (B, H, n, C, dh + 1) in the matmul dtype; lg: (B, H, n, C)
    log-gates (``acc``) or None; s0: (B, H, M, dh + 1) carried sums [S, z] (``acc``).
    With b_i the cumulative log-gate inside a chunk (0 without gates) and S_c the sums before chunk c:
        Y = ((Q K^T) * tril(exp(b_i - b_j))) V1 + (Q * exp(b)) S_c,
        S_{c+1} = exp(b_C) S_c + (K * exp(b_C - b))^T V1,
    the second as one batched matmul per chunk and a cumsum over chunks (gated: one matmul with the
    (n + 1, n) matrix of decays exp(ex_c - ex_{j+1}), ex_c = log-decay from the start to chunk c; every
    exponent <= 0, so nothing overflows). Y[..., :dh] is the numerator, Y[..., dh] the normalizer.
    """
    acc, mm = s0.dtype, q.dtype
    b, h, n, c, m = q.shape
    p = q @ k.transpose(-1, -2)                                                     # (B, H, n, C, C)
    r = {}
    if lg is None:
        a = p.tril_()
        ds = (k.transpose(-1, -2) @ v1).to(acc)                                     # (B, H, n, M, dh+1)
        cs = ds.cumsum(2)
        s_start = cs - ds + s0[:, :, None]
        s_end = s0 + cs[:, :, -1]
        qd = q
    else:
        cum = lg.cumsum(-1)                                                         # b_i
        dec = (cum[..., :, None] - cum[..., None, :]).clamp(max=0).exp().tril()    # exp(b_i - b_j), j <= i
        a = p.mul_(dec.to(mm))
        to_end = (cum[..., -1:] - cum).exp()                                        # exp(b_C - b_j)
        kd = k * to_end[..., None].to(mm)
        ds = (kd.transpose(-1, -2) @ v1).to(acc)
        ex = F.pad(cum[..., -1].cumsum(-1), (1, 0))                                 # (B, H, n + 1)
        w = (ex[..., :, None] - ex[..., None, 1:]).clamp(max=0).exp().tril(-1)     # (B, H, n + 1, n)
        s_all = (w @ ds.flatten(-2)).view(b, h, n + 1, m, -1) + ex.exp()[..., None, None] * s0[:, :, None]
        s_start, s_end = s_all[:, :, :-1], s_all[:, :, -1]
        qd = q * cum.exp()[..., None].to(mm)
        r.update(cum=cum, dec=dec, to_end=to_end, kd=kd, ex=ex, w=w)
    y = (a @ v1).to(acc) + (qd @ s_start.to(mm)).to(acc)
    r.update(a=a, ds=ds, s_start=s_start, s_end=s_end, qd=qd, y=y)
    return r


def _normalize(y: Tensor, floor: float, dh: int) -> Tensor:
    """Numerator over normalizer: y[..., :dh] / y[..., dh] (columns after dh are alignment padding)."""
    return y[..., :dh] / y[..., dh:dh + 1].clamp(min=floor)


def _chunk_backward(q, k, v1, lg, s0, floor, dout, ds_end):
    """Gradients of ``_normalize(_chunk_pass(...)["y"], floor, dh)`` and of the end sums, recomputing the pass.

    dout: (B, H, n, C, dh) (``acc``); v1, s0 and ds_end ((B, H, M, W) or None) may carry zero columns after
    the normalizer's (W >= dh + 1). Returns (dq, dk, dv1 in the matmul dtype, dlg (B, H, n, C) or None,
    ds0 (B, H, M, W)); everything by batched matmuls and (reverse) cumsums, no autograd graph.
    """
    r = _chunk_pass(q, k, v1, lg, s0)
    acc, mm = s0.dtype, q.dtype
    b, h, n, c, m = q.shape
    dh = dout.shape[-1]
    y = r.pop("y")
    den = y[..., dh:dh + 1]
    dc = den.clamp(min=floor)
    dnum = (dout / dc).masked_fill_(den == 0, 0.0)       # den = 0: no weighted key, out = 0 whatever the inputs
    dden = -(dnum * y[..., :dh]).sum(-1, keepdim=True) / dc * (den >= floor)
    dy = _pad_cols(torch.cat([dnum, dden], -1), y.shape[-1]).to(mm)                # dL/dY
    del y, dnum, dden, dc, den
    a, qd = r.pop("a"), r.pop("qd")
    dv1 = a.transpose(-1, -2) @ dy
    da = dy @ v1.transpose(-1, -2)                                                  # (B, H, n, C, C)
    dqd = dy @ r.pop("s_start").to(mm).transpose(-1, -2)                            # (B, H, n, C, M)
    g_loc = (qd.transpose(-1, -2) @ dy).to(acc)                                     # dL/dS_c from chunk c
    del dy
    if lg is None:
        del a, qd
        dp = da.tril_()
        dq = (dp @ k).add_(dqd)
        del dqd
        dk = dp.transpose(-1, -2) @ q
        del dp, da
        tot = g_loc.sum(2)
        if ds_end is not None:
            tot = tot + ds_end
        e = (tot[:, :, None] - g_loc.cumsum(2)).to(mm)                              # dL/d(chunk sums)
        dk = dk + v1 @ e.transpose(-1, -2)
        dv1 = dv1 + k @ e
        return dq, dk, dv1, None, tot
    cum, dec, to_end, kd, ex, w = (r[key] for key in ("cum", "dec", "to_end", "kd", "ex", "w"))
    ada = da.to(acc) * a.to(acc)                                                    # dL/d(b_i - b_j)
    del a
    db = ada.sum(-1) - ada.sum(-2)
    del ada
    dp = da.mul_(dec.to(mm))
    db = db + (qd.to(acc) * dqd.to(acc)).sum(-1)
    del qd
    dq = (dp @ k).add_(dqd.mul_(cum.exp()[..., None].to(mm)))
    del dqd
    dk = dp.transpose(-1, -2) @ q
    del dp
    end = torch.zeros_like(s0) if ds_end is None else ds_end
    g_all = torch.cat([g_loc, end[:, :, None]], 2).flatten(-2)                       # (B, H, n + 1, F)
    ds_flat = r["ds"].flatten(-2)                                                   # (B, H, n, F)
    e = w.transpose(-1, -2) @ g_all                                                 # dL/d(chunk sums)
    eex = ex.exp()
    ds0 = (eex[..., None] * g_all).sum(2).view_as(s0)
    dw = (g_all @ ds_flat.transpose(-1, -2)) * w                                    # dL/dW * W
    dex = dw.sum(-1) - F.pad(dw.sum(-2), (1, 0)) + eex * (g_all @ s0.flatten(-2)[..., None])[..., 0]
    dtot = dex.flip(-1).cumsum(-1).flip(-1)[..., 1:]                                # ex_c = sum_{u<c} tot_u
    e = e.view(b, h, n, m, -1).to(mm)
    dkd = v1 @ e.transpose(-1, -2)
    dk = dk + dkd * to_end[..., None].to(mm)
    dv1 = dv1 + kd @ e
    t = (kd.to(acc) * dkd.to(acc)).sum(-1)                                          # dL/d(b_C - b_j)
    db = db - t
    db[..., -1] += t.sum(-1) + dtot
    dlg = db.flip(-1).cumsum(-1).flip(-1)                                           # b = cumsum(lg)
    return dq, dk, dv1, dlg, ds0


def _group_forward(phi_q: Tensor, phi_k: Tensor, v1: Tensor, lg: Optional[Tensor], s0: Tensor, chunk: int,
                   floor: float) -> tuple[Tensor, Tensor]:
    """Causal linear attention of one stretch of tokens from the carried sums s0 = [S, z].

    phi_q, phi_k: (B, H, T, M) and v1: (B, H, T, dh + 1) values with the ones column (both scaled by each
    key's weight), all in the matmul dtype. Returns (out (B, H, T, dh), end sums (B, H, M, dh + 1)).
    [v, 1] and the sums run zero-padded to an ``ALIGN``ed width."""
    b, h, t, dh1 = v1.shape
    n = -(-t // chunk)
    width = _aligned(dh1)
    q, k, v1c = (_chunks(x, n, chunk) for x in (phi_q, phi_k, _pad_cols(v1, width)))
    lgc = None if lg is None else _chunks(lg.to(s0.dtype), n, chunk)
    r = _chunk_pass(q, k, v1c, lgc, _pad_cols(s0, width))
    out = _normalize(r["y"], floor, dh1 - 1).reshape(b, h, n * chunk, dh1 - 1)[:, :, :t]
    return out, r["s_end"][..., :dh1]


def _group_backward(phi_q, phi_k, v1, lg, s0, chunk, floor, g_out, g_end):
    """Gradients of ``_group_forward`` w.r.t. (phi_q, phi_k, v1, lg, s0), recomputing it (no graph kept)."""
    b, h, t, dh1 = v1.shape
    n = -(-t // chunk)
    width = _aligned(dh1)
    q, k, v1c = (_chunks(x, n, chunk) for x in (phi_q, phi_k, _pad_cols(v1, width)))
    lgc = None if lg is None else _chunks(lg.to(s0.dtype), n, chunk)
    dq, dk, dv1, dlg, ds0 = _chunk_backward(q, k, v1c, lgc, _pad_cols(s0, width), floor,
                                            _chunks(g_out.to(s0.dtype), n, chunk), _pad_cols(g_end, width))

    def unchunk(x):
        return x.reshape(b, h, n * chunk, *x.shape[4:])[:, :, :t]

    return unchunk(dq), unchunk(dk), unchunk(dv1)[..., :dh1], None if dlg is None else unchunk(dlg), ds0[..., :dh1]


def _sliced(x: Optional[Tensor], a: int, e: int) -> Optional[Tensor]:
    """Tokens a..e of a (B, H or 1, T, ...) tensor (None stays None)."""
    return None if x is None else x[:, :, a:e]


def _features_of_group(spec, mm, qg, kg, wq, wk):
    """(phi(q), x'_q, phi(k), x'_k) of one group: ``spec`` = (class, constants) of the feature map, or None when
    q and k are the features already (x' None)."""
    if spec is None:
        return qg.to(mm), None, kg.to(mm), None
    cls, consts = spec
    phi_q, xq = cls.feature_pass(consts, qg, wq, True, mm)
    phi_k, xk = cls.feature_pass(consts, kg, wk, False, mm)
    return phi_q, xq, phi_k, xk


def _forward_group(spec, chunk: int, floor: float, mm: torch.dtype, s: Tensor, qg: Tensor, kg: Tensor, vg: Tensor,
                   wg: Optional[Tensor], lg: Optional[Tensor], wq: Optional[Tensor], wk: Optional[Tensor]):
    """One stretch of ``_LinearAttention.forward``: features, [v, 1] * key weight, the chunk form from the carried
    sums s. Returns (out in v's dtype, end sums). Pure tensor code (``compiled.fused`` compiles it on CUDA)."""
    phi_q, _, phi_k, _ = _features_of_group(spec, mm, qg, kg, wq, wk)
    o, s_end = _group_forward(phi_q, phi_k, _values_with_ones(vg, wg, mm), lg, s, chunk, floor)
    return o.to(vg.dtype), s_end


def _backward_group(spec, chunk: int, floor: float, mm: torch.dtype, need: tuple, s_start: Tensor, qg: Tensor,
                    kg: Tensor, vg: Tensor, wg: Optional[Tensor], lg: Optional[Tensor], wq: Optional[Tensor],
                    wk: Optional[Tensor], g_out: Tensor, g_s: Optional[Tensor]):
    """Gradients of one stretch of ``_LinearAttention`` (recomputing its forward): (dq, dk, dv, d key weight,
    dlg, d carried sums, dW_q, dW_k), None where ``need`` (q, k, v, weight, lg, wq, wk) says no. Pure tensor code
    (``compiled.fused`` compiles it on CUDA)."""
    phi_q, xq, phi_k, xk = _features_of_group(spec, mm, qg, kg, wq, wk)
    dphi_q, dphi_k, dv1, dlg, ds = _group_backward(phi_q, phi_k, _values_with_ones(vg, wg, mm), lg, s_start, chunk,
                                                   floor, g_out, g_s)
    dv = dw = None
    if need[2]:
        dv = (dv1[..., :-1] if wg is None else dv1[..., :-1] * wg[..., None]).to(vg.dtype)
    if need[3]:
        dw = torch.linalg.vecdot(dv1[..., :-1], vg.to(mm)) + dv1[..., -1]
        dw = dw.sum(1, keepdim=True) if wg.shape[1] == 1 else dw
    grads = []
    for x, phi, dphi, xa, w, need_x, need_w, query in ((qg, phi_q, dphi_q, xq, wq, need[0], need[5], True),
                                                      (kg, phi_k, dphi_k, xk, wk, need[1], need[6], False)):
        if spec is None:
            grads.append((dphi.to(x.dtype) if need_x else None, None))
            continue
        cls, consts = spec
        dx, dw_f = cls.features_backward(consts, x, xa, w, phi, dphi, query, need_x, need_w)
        grads.append((None if dx is None else dx.to(x.dtype), dw_f))
    (dq, dwq), (dk, dwk) = grads
    return dq, dk, dv, dw, dlg if need[4] else None, ds, dwq, dwk


class _LinearAttention(torch.autograd.Function):
    """Causal (gated) linear attention that keeps only its inputs for backward.

    ``spec`` = (feature-map class, its constants) maps queries and keys to features by one fp32 matmul of
    augmented inputs with feature weights ``wq`` / ``wk`` (H, M, d') and one elementwise activation, written in
    the matmul dtype (the static ``feature_pass`` / ``features_backward`` of ``RandomFeatureAttention``; the
    feature weights are inputs, so gradients reach what they are made of, e.g. RFA's tau); ``spec=None``: q and
    k are the features already. ``v1`` = [v, 1] * (key weight) carries values and the normalizer's ones column
    together (padding and RFA's (1 - g_t) are key weights). Forward runs features and the chunk form
    (``_chunk_pass``) without a graph; backward recomputes the features and differentiates them and the chunk
    form by hand (``_chunk_backward``), no autograd graph. Saved for backward: q, k, v, key weights, gates and
    the carried sums at the start of each group, O(T * dh) per head instead of the O(T * M) feature maps and
    per-chunk tensors. ``bounds``: the stretches of tokens processed one after another (whole chunks;
    [(0, T)]: one batched pass; more groups bound the transient O(group * M) tensors, see
    ``RandomFeatureConfig.recompute_group``). Each stretch is one call of ``_forward_group`` /
    ``_backward_group``, compiled into a few fused kernels on CUDA (``compiled.fused``). Not twice
    differentiable.
    """

    @staticmethod
    def forward(ctx, spec, bounds, chunk, floor, s0, q, k, v, weight, lg, wq, wk):
        mm = _matmul_dtype(v.dtype, s0.dtype)
        out = v.new_empty(v.shape) if len(bounds) > 1 else None
        step = fused(_forward_group, q)
        starts = []
        s = s0
        with _fp32_matmuls(mm):
            for a, e in bounds:
                starts.append(s)
                o, s = step(spec, chunk, floor, mm, s, q[:, :, a:e], k[:, :, a:e], v[:, :, a:e],
                            _sliced(weight, a, e), _sliced(lg, a, e), wq, wk)
                if out is None:
                    out = o
                else:
                    out[:, :, a:e] = o
        ctx.spec, ctx.bounds, ctx.chunk, ctx.floor = spec, bounds, chunk, floor
        ctx.save_for_backward(torch.stack(starts), q, k, v, weight, lg, wq, wk)
        return out, s

    @staticmethod
    def backward(ctx, g_out, g_end):
        starts, q, k, v, weight, lg, wq, wk = ctx.saved_tensors
        n = ctx.needs_input_grad
        need = (n[5], n[6], n[7], n[8] and weight is not None, n[9] and lg is not None,
                n[10] and wq is not None, n[11] and wk is not None)
        mm = _matmul_dtype(v.dtype, starts.dtype)
        dq_all, dk_all, dv_all, dw_all, dlg_all = (torch.empty_like(x) if want else None
                                                   for x, want in zip((q, k, v, weight, lg), need))
        dwq = dwk = None
        step = fused(_backward_group, q)
        g_s = g_end
        with _fp32_matmuls(mm):
            for i in reversed(range(len(ctx.bounds))):
                a, e = ctx.bounds[i]
                dq, dk, dv, dw, dlg, g_s, dwq_g, dwk_g = step(
                    ctx.spec, ctx.chunk, ctx.floor, mm, need, starts[i], q[:, :, a:e], k[:, :, a:e], v[:, :, a:e],
                    _sliced(weight, a, e), _sliced(lg, a, e), wq, wk, g_out[:, :, a:e], g_s)
                for dst, g in ((dq_all, dq), (dk_all, dk), (dv_all, dv)):
                    if dst is not None:
                        dst[:, :, a:e] = g
                if dw_all is not None:
                    dw_all[..., a:e] = dw
                if dlg_all is not None:
                    dlg_all[..., a:e] = dlg
                dwq = dwq_g if dwq is None else dwq + dwq_g
                dwk = dwk_g if dwk is None else dwk + dwk_g
        return (None, None, None, None, g_s if n[4] else None, dq_all, dk_all, dv_all, dw_all, dlg_all, dwq, dwk)


def _values_with_ones(v: Tensor, weight: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    """[v, 1] (B, H, T, dh + 1) in ``dtype``, rows scaled by ``weight`` (B, H or 1, T) when given: a key
    weight c_t enters the sums as c_t phi(k_t) [v_t, 1]^T, so it scales the values instead of the wider
    features."""
    v1 = F.pad(v.to(dtype), (0, 1), value=1.0)
    return v1 if weight is None else v1.mul_(weight[..., None])


def _carried_sums(state: Optional[dict], b: int, h: int, m: int, dh: int, acc: torch.dtype, device) -> Tensor:
    """The recurrent state {"S", "z"} as one (B, H, M, dh + 1) tensor [S, z] in ``acc`` (zeros: fresh)."""
    if not state:
        return torch.zeros(b, h, m, dh + 1, dtype=acc, device=device)
    return torch.cat([state["S"].to(acc), state["z"].to(acc)[..., None]], -1)


def chunked_linear_attention(phi_q: Tensor, phi_k: Tensor, v: Tensor, chunk_size: int, *,
                             causal: bool, state: Optional[dict] = None,
                             log_gate: Optional[Tensor] = None, den_floor: float = DEN_EPS) -> tuple[Tensor, dict]:
    """Linear attention from features. phi_q, phi_k: (B, H, T, M); v: (B, H, T, dh).

    ``log_gate`` (B, H, T): RFA's gated recurrence S_t = g_t S_{t-1} + phi(k_t) v_t^T with
    g_t = exp(log_gate_t) (the caller folds (1 - g_t) into phi(k_t)); causal only.
    ``den_floor``: lower bound of the normalizer phi(q_t)^T z_t.
    Causal: the chunk form (``_chunk_pass``) with a hand-written backward that keeps only the inputs.
    Returns (out (B, H, T, dh) in v's dtype, new state {"S": (B, H, M, dh), "z": (B, H, M)}).
    """
    b, h, t, m = phi_k.shape
    dh = v.shape[-1]
    acc = torch.promote_types(phi_k.dtype, torch.float32)
    s0 = _carried_sums(state, b, h, m, dh, acc, phi_k.device)
    if not causal:
        if log_gate is not None:
            raise ValueError("the gated recurrence is causal; use causal=True or no gate")
        vv = v.to(acc)
        s = s0[..., :dh] + torch.einsum("bhtm,bhtd->bhmd", phi_k.to(acc), vv)
        z = s0[..., dh] + phi_k.to(acc).sum(2)
        num = torch.einsum("bhtm,bhmd->bhtd", phi_q.to(acc), s)
        den = torch.einsum("bhtm,bhm->bht", phi_q.to(acc), z)
        return (num / den.clamp(min=den_floor)[..., None]).to(v.dtype), {"S": s, "z": z}
    out, s_end = _LinearAttention.apply(None, [(0, t)], chunk_size, den_floor, s0, phi_q, phi_k, v, None, log_gate,
                                        None, None)
    return out.to(v.dtype), {"S": s_end[..., :dh], "z": s_end[..., dh]}


def recurrent_linear_attention(phi_q: Tensor, phi_k: Tensor, v: Tensor, *, causal: bool,
                               state: Optional[dict] = None, log_gate: Optional[Tensor] = None,
                               den_floor: float = DEN_EPS) -> tuple[Tensor, dict]:
    """Reference for ``chunked_linear_attention``: one explicit recurrence step per token (causal),
    or the explicit sums over all tokens (bidirectional)."""
    b, h, t, m = phi_k.shape
    dh = v.shape[-1]
    vv = v.to(phi_k.dtype)
    s = state["S"] if state else phi_k.new_zeros(b, h, m, dh)
    z = state["z"] if state else phi_k.new_zeros(b, h, m)
    if not causal:
        for i in range(t):
            s = s + phi_k[:, :, i, :, None] * vv[:, :, i, None, :]
            z = z + phi_k[:, :, i]
        outs = [(phi_q[:, :, i, :, None] * s).sum(-2) / (phi_q[:, :, i] * z).sum(-1).clamp(min=den_floor)[..., None]
                for i in range(t)]
        return torch.stack(outs, 2).to(v.dtype), {"S": s, "z": z}
    outs = []
    for i in range(t):
        g = 1.0 if log_gate is None else log_gate[:, :, i].exp()[..., None]
        s = (g[..., None] if log_gate is not None else 1.0) * s + phi_k[:, :, i, :, None] * vv[:, :, i, None, :]
        z = g * z + phi_k[:, :, i]
        num = (phi_q[:, :, i, :, None] * s).sum(-2)
        den = (phi_q[:, :, i] * z).sum(-1)
        outs.append(num / den.clamp(min=den_floor)[..., None])
    return torch.stack(outs, 2).to(v.dtype), {"S": s, "z": z}


class RandomFeatureAttention(Float32Buffers, Attention):
    """Shared machinery of Performer and RFA: features, chunked prefix sums, the recurrent state.

    Position hooks: "input" and "rotary" only (random features never form scores, so score and
    value hooks such as ALiBi or Shaw are refused at build time). Rotary rotates q and k at their
    absolute positions (tokens since the row's reset), so the carried state stays consistent
    across segments. No memory prefix: the recurrent state is the memory (supports_memory=False).
    """

    supports_memory = False
    stateful = True
    position_hooks = frozenset({"input", "rotary"})
    feature_multiplier = 1
    """M = feature_multiplier * n_features outputs of phi"""
    float32_buffers = ("features",)

    def __init__(self, cfg: EncoderConfig, layer: int, position=None):
        super().__init__(cfg, layer, position)
        self.n_features = cfg.random_features.n_features
        self.recompute_group = cfg.random_features.recompute_group
        """causal: tokens per batched pass (rounded down to whole chunks; 0: the whole sequence)"""
        gen = layer_generator(cfg.random_features.seed, layer, salt=3)
        self.register_buffer("features", orthogonal_gaussian(cfg.n_heads, self.n_features, cfg.d_head, gen))

    @classmethod
    def validate(cls, cfg: EncoderConfig) -> None:
        rf = cfg.random_features
        if rf.n_features < 1 or rf.chunk_size < 1:
            raise ValueError(f"random_features.n_features={rf.n_features} and chunk_size={rf.chunk_size} must be "
                             f">= 1 (e.g. 64 and 64)")
        if rf.recompute_group < 0:
            raise ValueError(f"random_features.recompute_group={rf.recompute_group}: tokens per pass must be >= 0 "
                             f"(0: the whole sequence in one pass; e.g. 4096)")

    def redraw(self, generator: Optional[torch.Generator] = None) -> None:
        """Draw fresh features (Performer's periodic redrawing); the global RNG when no generator."""
        w = orthogonal_gaussian(self.n_heads, self.n_features, self.d_head, generator)
        self.features.copy_(w.to(self.features))

    def feature_map(self, x: Tensor, query: bool) -> Tensor:
        """(B, H, T, dh) -> (B, H, T, M) in float32 (float64 for float64 inputs), differentiable."""
        wq, wk = self.feature_weights(torch.promote_types(x.dtype, torch.float32))
        return self.feature_pass(self.feature_consts, x, wq if query else wk, query, wq.dtype)[0]

    def feature_weights(self, acc: torch.dtype) -> tuple[Tensor, Tensor]:
        """(W_q, W_k): (H, M, d') weights of the augmented inputs, built once per call (with autograd), d' padded
        with zero columns to a multiple of ``ALIGN`` (the augmented inputs get the same zero columns)."""
        raise NotImplementedError

    def fused_weights(self) -> tuple[Tensor, Tensor, Tensor, Tensor, float, int]:
        """(w (H, m, dh), scale (H,), bq, bk (H, m), kcoef, kind) of ``random_features_fused``: exponents
        scale_h (w . x) + b (+ kcoef |k|^2 for keys), fp32; the scale carries autograd to learned parameters."""
        raise NotImplementedError

    @property
    def feature_consts(self) -> tuple[int, int]:
        """(d_head, n_features): the constants the static feature functions read."""
        return self.d_head, self.n_features

    @staticmethod
    def feature_pass(consts: tuple[int, int], x: Tensor, w: Tensor, query: bool,
                     dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(phi(x) in ``dtype``, augmented input x' (B, H, T, d') in w's dtype): phi = act(x' W^T), the
        exponents in w's dtype (fp32 for 16-bit inputs). Differentiable when dtype is w's dtype. Static (pure
        tensor code with constants ``feature_consts``), so the fused CUDA path can compile it."""
        raise NotImplementedError

    @staticmethod
    def features_backward(consts: tuple[int, int], x: Tensor, xa: Tensor, w: Tensor, phi: Tensor, dphi: Tensor,
                          query: bool, need_x: bool, need_w: bool) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """(dL/dx, dL/dW summed over the batch) from dL/dphi, by hand (no graph)."""
        raise NotImplementedError

    def softmax_target(self, q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
        """The exact softmax attention that phi(q) . phi(k) estimates (for tests and diagnostics)."""
        raise NotImplementedError

    def log_gates(self, x: Tensor) -> Optional[Tensor]:
        """(B, H, T) log g_t of the gated recurrence, or None."""
        return None

    def _rotate(self, q: Tensor, k: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
        if bool((pos == pos[:1]).all()):
            return self.position.rotate(q, k, pos[0], pos[0])
        pairs = [self.position.rotate(q[i:i + 1], k[i:i + 1], pos[i], pos[i]) for i in range(q.shape[0])]
        return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])

    def forward(self, x: Tensor, kv: Tensor, ctx: AttentionContext) -> tuple[Tensor, dict]:
        if self.training and self.cfg.random_features.redraw:
            self.redraw()
        q, k, v = self.project(x, kv)
        if self.position is not None and "rotary" in self.position.hooks:
            q, k = self._rotate(q, k, ctx.q_pos)
        out, state = self.attend(q, k, v, ctx, self.log_gates(x), donate_kv=True)    # k, v: only read here
        return self.out_proj(merge_heads(out)), state

    def features_of(self, q: Tensor, k: Tensor, key_valid: Optional[Tensor],
                    log_gate: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """(phi(q), phi(k)) with invalid keys zeroed and (1 - g_t) folded into phi(k_t) when gated."""
        phi_q, phi_k = self.feature_map(q, query=True), self.feature_map(k, query=False)
        if key_valid is not None:
            phi_k = phi_k * key_valid[:, None, :, None].to(phi_k.dtype)
        if log_gate is not None:
            phi_k = phi_k * (-torch.expm1(log_gate.to(phi_k.dtype)))[..., None]       # (1 - g_t)
        return phi_q, phi_k

    def feature_params(self) -> list[Tensor]:
        """Parameters the feature map reads (they receive gradients through the recomputation)."""
        return []

    def attend(self, q, k, v, ctx, log_gate: Optional[Tensor] = None, donate_kv: bool = False):
        """Causal / bidirectional attention of q to k, v. ``donate_kv``: nothing reads k, v after this call, so the
        fused CUDA kernels may write dk, dv over them in backward (see ``fused_random_features``)."""
        rf = self.cfg.random_features
        acc = torch.promote_types(q.dtype, torch.float32)
        floor = self.den_floor(acc)
        if not ctx.causal:
            phi_q, phi_k = self.features_of(q, k, ctx.key_valid, log_gate)
            out, state = chunked_linear_attention(phi_q, phi_k, v, rf.chunk_size, causal=False,
                                                  state=ctx.state or None, den_floor=floor)
            return out, {name: t.detach() for name, t in state.items()}
        b, h, t, dh = v.shape
        m = self.feature_multiplier * self.n_features
        weight = None if ctx.key_valid is None else ctx.key_valid[:, None, :].to(acc)
        if log_gate is not None:
            gate_in = -torch.expm1(log_gate.to(acc))                                    # (1 - g_t)
            weight = gate_in if weight is None else weight * gate_in
        state = ctx.state or {}
        if (log_gate is None and fused_rf.available(q, self.n_features)
                and not any(x.requires_grad for x in state.values())):
            w, scale, bq, bk, kcoef, feat = self.fused_weights()
            out, s_end, z_end = fused_rf.fused_random_features(feat, q, k, v, weight, w, scale, bq, bk,
                                                               state.get("S"), state.get("z"), kcoef, floor,
                                                               donate_kv=donate_kv)
            return out, {"S": s_end, "z": z_end}
        s0 = _carried_sums(ctx.state, b, h, m, dh, acc, q.device)
        wq, wk = self.feature_weights(acc)
        spec = (type(self), self.feature_consts)
        out, s_end = _LinearAttention.apply(spec, self.groups(t), rf.chunk_size, floor, s0, q, k, v, weight,
                                            log_gate, wq, wk)
        return out, {"S": s_end[..., :dh].detach(), "z": s_end[..., dh].detach()}

    def groups(self, t: int) -> list[tuple[int, int]]:
        """Stretches of tokens processed one after another (``recompute_group``; whole chunks)."""
        chunk = self.cfg.random_features.chunk_size
        size = self.recompute_group
        size = t if size <= 0 else chunk * max(1, size // chunk)
        return [(a, min(a + size, t)) for a in range(0, t, size)]

    def reference(self, q, k, v, ctx, log_gate: Optional[Tensor] = None):
        """Naive version of ``attend``: the token-by-token recurrence."""
        phi_q, phi_k = self.features_of(q, k, ctx.key_valid, log_gate)
        return recurrent_linear_attention(phi_q, phi_k, v, causal=ctx.causal, state=ctx.state or None,
                                          log_gate=log_gate, den_floor=self.den_floor(phi_k.dtype))

    def den_floor(self, dtype: torch.dtype) -> float:
        return DEN_EPS


def _softmax_attention(scores: Tensor, v: Tensor, causal: bool) -> Tensor:
    if causal:
        t = scores.shape[-1]
        mask = torch.ones(t, t, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v.to(scores.dtype)


@register("attention", "performer")
class PerformerAttention(RandomFeatureAttention):
    """Performer FAVOR+ (Choromanski et al. 2021): positive orthogonal random features.

    softmax kernel exp(q . k / sqrt(d)) = E_w[phi(q~) . phi(k~)] with x~ = x d^{-1/4} and (Lemma 1)
        phi(x) = exp(w_r^T x - |x|^2 / 2) / sqrt(m),  r = 1..m,
    w_r orthogonal Gaussian (sec. 4.2; fixed per layer from ``random_features.seed``, redrawn
    every training forward when ``random_features.redraw``). Attention = D^{-1} phi(Q) (phi(K)^T V)
    (eq. 5), causal by prefix sums (sec. 2.3 / chunked here).

    Numerical stabilizers that cancel exactly: query features drop their per-query factors 1/sqrt(m) and
    exp(-|q|^2/2) and subtract max_r (w_r^T q + |w_r|^2/2); key features are multiplied by
    exp(-|w_r|^2/2) and query features by exp(+|w_r|^2/2), so phi(k) <= 1 (no overflow) and no
    data-dependent key shift enters the carried state.
    """

    @classmethod
    def validate(cls, cfg: EncoderConfig) -> None:
        super().validate(cfg)
        if cfg.random_features.gate:
            raise ValueError("random_features.gate is RFA's gated recurrence; use attention='rfa' for gating or "
                             "set random_features.gate=False with attention='performer'")

    def den_floor(self, dtype):
        return torch.finfo(dtype).tiny

    def feature_weights(self, acc):
        w = self.features.to(acc)
        half_w = 0.5 * w.square().sum(-1, keepdim=True)                            # |w_r|^2 / 2, (H, m, 1)
        ws = w * self.d_head ** -0.25                                               # w^T x~ = (w d^{-1/4})^T x
        log_scale = torch.full_like(half_w, 0.5 * math.log(self.n_features))       # the 1 / sqrt(m)
        # queries: exponent w^T q~ + |w|^2/2 = [q, 1] . [ws, |w|^2/2]; keys: w^T k~ - |k~|^2/2 - |w|^2/2 - log m/2
        wq, wk = torch.cat([ws, half_w], -1), torch.cat([ws, torch.ones_like(half_w), -half_w - log_scale], -1)
        return _pad_cols(wq, _aligned(wq.shape[-1])), _pad_cols(wk, _aligned(wk.shape[-1]))

    def fused_weights(self):
        w = self.features.float()
        half_w = 0.5 * w.square().sum(-1)                                          # |w_r|^2 / 2
        bk = -half_w - 0.5 * math.log(self.n_features)
        scale = w.new_ones(w.shape[0])
        return w * self.d_head ** -0.25, scale, half_w, bk, -0.5 * self.d_head ** -0.5, fused_rf.FEAT_EXP

    @staticmethod
    def feature_pass(consts, x, w, query, dtype):
        d_head = consts[0]
        xf = x.to(w.dtype)
        if query:
            xa = F.pad(xf, (0, 1), value=1.0)
        else:
            sq = torch.linalg.vecdot(xf, xf).mul_(-0.5 * d_head ** -0.5)[..., None]    # -|k~|^2 / 2
            xa = torch.cat([xf, sq, torch.ones_like(sq)], -1)
        xa = _pad_cols(xa, w.shape[-1])                                             # w's zero columns (ALIGN)
        a = _exponents(xf, (1.0,) if query else (sq, 1.0), w)
        if query:      # the per-query shift cancels exactly in num / den, so it is a constant for autograd
            a = a.sub_(a.detach().amax(-1, keepdim=True))
        if dtype == a.dtype:
            return a.exp_(), xa
        return torch.exp(a, out=torch.empty(a.shape, dtype=dtype, device=a.device)), xa

    @staticmethod
    def features_backward(consts, x, xa, w, phi, dphi, query, need_x, need_w):
        da = dphi.to(w.dtype).mul_(phi)                                             # d exp(a) = exp(a) da
        dx = dw = None
        if need_x:
            dxa = da @ w
            d = x.shape[-1]
            dx = dxa[..., :d]
            if not query:                                                           # through -|k|^2 / (2 sqrt(d))
                dx = dx.sub_(dxa[..., d:d + 1] * xa[..., :d] * consts[0] ** -0.5)
        if need_w:
            dw = (da.transpose(-1, -2) @ xa).sum(0)
        return dx, dw

    def softmax_target(self, q, k, v, causal):
        acc = torch.promote_types(q.dtype, torch.float32)
        return _softmax_attention(torch.einsum("bhid,bhjd->bhij", q.to(acc), k.to(acc)) * self.scale, v, causal)


@register("attention", "rfa")
class RFAAttention(RandomFeatureAttention):
    """Random Feature Attention (Peng et al. 2021): trigonometric random features, optional gate.

    Queries and keys are l2-normalized and scaled by a learned per-head sqrt(tau) (RFA's learned
    feature variance), x~ = sqrt(tau) x / |x|; with
        phi(x) = [sin(w_1^T x), ..., sin(w_m^T x), cos(w_1^T x), ..., cos(w_m^T x)] / sqrt(m)
    (eq. 2, Rahimi & Recht 2007), phi(x) . phi(y) estimates exp(-|x - y|^2 / 2) =
    exp(tau (q^ . k^ - 1)), i.e. softmax attention with scores tau q^ . k^ (eq. 4-5). w_r
    orthogonal Gaussian, fixed per layer (redrawn per training forward when ``redraw``).
    Gating (sec. 3.1, ``random_features.gate``, causal only):
        S_t = g_t S_{t-1} + (1 - g_t) phi(k_t) v_t^T,  z_t = g_t z_{t-1} + (1 - g_t) phi(k_t),
        g_t = sigmoid(w_g^T x_t + b_g) per head, from the layer input x_t (bias starts at 2, g ~ 0.88).
    The normalizer phi(q)^T z can be <= 0 for trigonometric features; it is floored at 1e-6.
    """

    feature_multiplier = 2

    def __init__(self, cfg: EncoderConfig, layer: int, position=None):
        super().__init__(cfg, layer, position)
        self.log_tau = nn.Parameter(torch.zeros(cfg.n_heads))
        self.gate = None
        if cfg.random_features.gate:
            self.gate = nn.Linear(cfg.d_model, cfg.n_heads)
            nn.init.constant_(self.gate.bias, 2.0)

    @classmethod
    def validate(cls, cfg: EncoderConfig) -> None:
        super().validate(cfg)
        if cfg.random_features.gate and not cfg.causal:
            raise ValueError("random_features.gate gates RFA's causal recurrence; set causal=True or gate=False")

    def feature_params(self):
        return [self.log_tau]

    def _scaled(self, x: Tensor) -> Tensor:
        acc = torch.promote_types(x.dtype, torch.float32)
        tau = self.log_tau.to(acc).exp()[None, :, None, None]
        return F.normalize(x.to(acc), dim=-1) * tau.sqrt()

    def feature_weights(self, acc):
        # sin(w^T (sqrt(tau) x^)) = sin((sqrt(tau) w)^T x^): tau folds into the weights; cos(a) = sin(a + pi/2)
        w = self.features.to(acc) * (0.5 * self.log_tau.to(acc)).exp()[:, None, None]     # (H, m, d)
        zero = torch.zeros_like(w[..., :1])
        wa = torch.cat([torch.cat([w, zero], -1), torch.cat([w, zero + math.pi / 2], -1)], 1)
        wa = _pad_cols(wa, _aligned(wa.shape[-1]))                                  # zero columns (ALIGN)
        return wa, wa

    def fused_weights(self):
        w = self.features.float()
        zero = w.new_zeros(w.shape[:2])
        return w, (0.5 * self.log_tau.float()).exp(), zero, zero, 0.0, fused_rf.FEAT_TRIG     # scale sqrt(tau)

    @staticmethod
    def feature_pass(consts, x, w, query, dtype):
        xh = F.normalize(x.to(w.dtype), dim=-1)
        xa = _pad_cols(F.pad(xh, (0, 1), value=1.0), w.shape[-1])                   # [x^, 1, 0..]
        a = _exponents(xh, (1.0,), w)
        phi = a.sin() if dtype == a.dtype else torch.sin(a, out=torch.empty(a.shape, dtype=dtype, device=a.device))
        return phi.mul_(consts[1] ** -0.5), xa

    @staticmethod
    def features_backward(consts, x, xa, w, phi, dphi, query, need_x, need_w):
        # phi = [sin a, cos a] / sqrt(m) (the second half of w is the first shifted by pi/2), so
        # d phi / d[a, a + pi/2] = [cos a, -sin a] / sqrt(m) = [phi_2, -phi_1]: no second exponent matmul
        m = consts[1]
        da = torch.cat([phi[..., m:], -phi[..., :m]], -1).to(w.dtype).mul_(dphi)
        dx = dw = None
        if need_x:
            d = x.shape[-1]
            dxh, xh = (da @ w)[..., :d], xa[..., :d]
            norm = x.to(w.dtype).norm(dim=-1, keepdim=True)
            proj = torch.linalg.vecdot(xh, dxh)[..., None] * (norm > 1e-12)         # x^ = x / max(|x|, eps)
            dx = dxh.sub_(xh * proj).div_(norm.clamp(min=1e-12))
        if need_w:
            dw = (da.transpose(-1, -2) @ xa).sum(0)
        return dx, dw

    def log_gates(self, x):
        if self.gate is None:
            return None
        return F.logsigmoid(self.gate(x)).transpose(1, 2)

    def softmax_target(self, q, k, v, causal):
        return _softmax_attention(torch.einsum("bhid,bhjd->bhij", self._scaled(q), self._scaled(k)), v, causal)

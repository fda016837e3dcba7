"""Triton kernels that move rows between position order and the bucket-sorted order of lsh / routing (CUDA).

``flex_bucket_attention`` gathers q, k, v into the bucket-sorted order of every hash round, runs one FlexAttention
call, and brings the output back, rounds combined by their log-normalizers (Kitaev et al. 2020, sec. 2). Done with
aten, each move is an ``index_select`` whose generic gather kernel copied the 128-byte rows at ~0.4 TB/s on an
H100 (a quarter of lsh's GPU time at 16k), plus index arithmetic and per-round multiply / add / cast launches.
Here each direction is one kernel that reads and writes whole rows (d_head contiguous elements) and computes its
addresses from the int32 tables itself:

- ``gather_slots``: y[b, h R + r, s] = x[b, h, rows[b, h, r, s]] (the sorted copies; x in any strided layout).
- ``sum_rounds``: dx[b, h, t] = sum_r g[b, h R + r, slot[b, h, r, t]] (the gather's backward: the inverse
  permutation per round, summed; no atomics).
- ``combine_rounds``: o[b, t, h] = sum_r w_r out[b, h R + r, slot_r] with w = softmax_r(lse at slot_r), also
  returning w (float32) for the backward; accumulated in float32.
- ``combine_rounds_backward``: dout at slot_r = w_r dO[b, t, h] and dlse at slot_r = w_r (<dO, o_r> - sum_r' w_r'
  <dO, o_r'>); padding slots (s >= T) get zeros.

Every function equals the aten expressions of ``flex_bucket`` (its CPU path); the CUDA tests compare them. Used
only for CUDA tensors when Triton imports and fusion is on (``RLFORMER_FUSED=0`` turns it off, as for
``compiled.fused``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from rlformer.attention.compiled import fusion_enabled

try:
    import triton
    import triton.language as tl
except ImportError:          # CPU-only installs: the aten path runs
    triton = None

BLOCK_ROWS = 64
"""Rows per program (each row d_head contiguous elements)"""


def available(x: Tensor) -> bool:
    """Whether the Triton row kernels run for ``x``: a CUDA tensor, Triton importable, fusion not disabled, and
    a power-of-two row size (the kernels load a row as one block; flex paths need that anyway)."""
    d = x.shape[-1]
    return triton is not None and x.is_cuda and fusion_enabled() and d >= 16 and d & (d - 1) == 0


if triton is not None:
    @triton.jit
    def _gather_slots_kernel(x_ptr, rows_ptr, out_ptr, L, H, R, sxb, sxh, sxt,
                             BLOCK: tl.constexpr, D: tl.constexpr):
        pid = tl.program_id(0)
        bhr = tl.program_id(1).to(tl.int64)
        b = bhr // (H * R)
        h = (bhr // R) % H
        s = pid * BLOCK + tl.arange(0, BLOCK)
        ok = s < L
        t = tl.load(rows_ptr + bhr * L + s, mask=ok, other=0).to(tl.int64)
        d = tl.arange(0, D)
        vals = tl.load(x_ptr + b * sxb + h * sxh + t[:, None] * sxt + d[None, :], mask=ok[:, None])
        tl.store(out_ptr + (bhr * L + s)[:, None] * D + d[None, :], vals, mask=ok[:, None])

    @triton.jit
    def _positions(T, H, BLOCK: tl.constexpr):
        """This program's (b, h) and block of positions t < T (grid: position blocks x B * H)."""
        bh = tl.program_id(1).to(tl.int64)
        t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        return bh, bh // H, bh % H, t, t < T

    @triton.jit
    def _sorted_row(slot_ptr, bh, r, R: tl.constexpr, T, L, t, ok):
        """Row (in the flattened (B * H * R * L) sorted rows) of positions t in round r."""
        s = tl.load(slot_ptr + (bh * R + r) * T + t, mask=ok, other=0).to(tl.int64)
        return (bh * R + r) * L + s

    @triton.jit
    def _sum_rounds_kernel(g_ptr, slot_ptr, dx_ptr, T, L, H, sdb, sdh, sdt,
                           R: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr):
        bh, b, h, t, ok = _positions(T, H, BLOCK)
        d = tl.arange(0, D)
        acc = tl.zeros((BLOCK, D), dtype=tl.float32)
        for r in tl.static_range(R):
            row = _sorted_row(slot_ptr, bh, r, R, T, L, t, ok)
            acc += tl.load(g_ptr + row[:, None] * D + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        dst = dx_ptr + b * sdb + h * sdh + t.to(tl.int64)[:, None] * sdt + d[None, :]
        tl.store(dst, acc.to(dx_ptr.dtype.element_ty), mask=ok[:, None])

    @triton.jit
    def _combine_kernel(out_ptr, lse_ptr, slot_ptr, o_ptr, w_ptr, T, L, H,
                        R: tl.constexpr, HAS_LSE: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr):
        bh, b, h, t, ok = _positions(T, H, BLOCK)
        d = tl.arange(0, D)
        acc = tl.zeros((BLOCK, D), dtype=tl.float32)
        if HAS_LSE:
            m = tl.full((BLOCK,), float("-inf"), tl.float32)
            for r in tl.static_range(R):
                row = _sorted_row(slot_ptr, bh, r, R, T, L, t, ok)
                m = tl.maximum(m, tl.load(lse_ptr + row, mask=ok, other=0.0).to(tl.float32))
            den = tl.zeros((BLOCK,), dtype=tl.float32)
            for r in tl.static_range(R):
                row = _sorted_row(slot_ptr, bh, r, R, T, L, t, ok)
                den += tl.exp(tl.load(lse_ptr + row, mask=ok, other=0.0).to(tl.float32) - m)
        for r in tl.static_range(R):
            row = _sorted_row(slot_ptr, bh, r, R, T, L, t, ok)
            val = tl.load(out_ptr + row[:, None] * D + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
            if HAS_LSE:
                w = tl.exp(tl.load(lse_ptr + row, mask=ok, other=0.0).to(tl.float32) - m) / den
                tl.store(w_ptr + (bh * R + r) * T + t, w, mask=ok)
                acc += val * w[:, None]
            else:
                acc += val
        dst = o_ptr + ((b * T + t.to(tl.int64)) * H + h)[:, None] * D + d[None, :]
        tl.store(dst, acc.to(o_ptr.dtype.element_ty), mask=ok[:, None])

    @triton.jit
    def _combine_backward_kernel(do_ptr, sdb, sdt, sdh, out_ptr, w_ptr, slot_ptr, dout_ptr, dlse_ptr, T, L, H,
                                 R: tl.constexpr, HAS_LSE: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr):
        bh, b, h, t, ok = _positions(T, H, BLOCK)
        d = tl.arange(0, D)
        g = tl.load(do_ptr + b * sdb + h * sdh + t.to(tl.int64)[:, None] * sdt + d[None, :], mask=ok[:, None],
                    other=0.0).to(tl.float32)
        if HAS_LSE:
            total = tl.zeros((BLOCK,), dtype=tl.float32)
            for r in tl.static_range(R):
                row = _sorted_row(slot_ptr, bh, r, R, T, L, t, ok)
                o = tl.load(out_ptr + row[:, None] * D + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
                w = tl.load(w_ptr + (bh * R + r) * T + t, mask=ok, other=0.0)
                total += w * tl.sum(g * o, axis=1)
        for r in tl.static_range(R):
            row = _sorted_row(slot_ptr, bh, r, R, T, L, t, ok)
            if HAS_LSE:
                o = tl.load(out_ptr + row[:, None] * D + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
                w = tl.load(w_ptr + (bh * R + r) * T + t, mask=ok, other=0.0)
                tl.store(dlse_ptr + row, w * (tl.sum(g * o, axis=1) - total), mask=ok)
                val = g * w[:, None]
            else:
                val = g
            tl.store(dout_ptr + row[:, None] * D + d[None, :], val.to(dout_ptr.dtype.element_ty), mask=ok[:, None])


def _grid(n: int, groups: int) -> tuple[int, int]:
    return (triton.cdiv(n, BLOCK_ROWS), groups)


def gather_slots(x: Tensor, rows: Tensor) -> Tensor:
    """y (B, H * R, L, dh) with y[b, h R + r, s] = x[b, h, rows[b, h, r, s]]; x (B, H, T, dh) with unit stride
    in its last dim (any other strides), rows (B, H, R, L) int32 in [0, T)."""
    b, h, r, length = rows.shape
    dh = x.shape[-1]
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty(b, h * r, length, dh, dtype=x.dtype, device=x.device)
    _gather_slots_kernel[_grid(length, b * h * r)](x, rows.contiguous(), out, length, h, r, x.stride(0),
                                                   x.stride(1), x.stride(2), BLOCK=BLOCK_ROWS, D=dh)
    return out


def sum_rounds(g: Tensor, slot: Tensor, split: bool, out: Optional[Tensor] = None) -> Tensor:
    """dx (B, H, T, dh) with dx[b, h, t] = sum_r g[b, h R + r, slot[b, h, r, t]], in (B, T, H, dh) storage when
    ``split`` (the layout of split_heads' views) else (B, H, T, dh); written into ``out`` when given (a (B, H, T,
    dh) tensor of g's dtype with a unit last stride, any other strides, e.g. a head slice). g (B, H * R, L, dh),
    slot (B, H, R, T) int32."""
    b, h, r, t = slot.shape
    dh, length = g.shape[-1], g.shape[2]
    if out is not None:
        if out.shape != (b, h, t, dh) or out.stride(-1) != 1 or out.dtype != g.dtype:
            raise ValueError(f"sum_rounds: out must be ({b}, {h}, {t}, {dh}) {g.dtype} with a unit last stride; "
                             f"got {tuple(out.shape)} {out.dtype} with strides {out.stride()}")
        dx = out
    elif split:
        dx = torch.empty(b, t, h, dh, dtype=g.dtype, device=g.device).transpose(1, 2)
    else:
        dx = torch.empty(b, h, t, dh, dtype=g.dtype, device=g.device)
    _sum_rounds_kernel[_grid(t, b * h)](g.contiguous(), slot.contiguous(), dx, t, length, h, dx.stride(0),
                                        dx.stride(1), dx.stride(2), R=r, BLOCK=BLOCK_ROWS, D=dh)
    return dx


def combine_rounds(out: Tensor, lse: Optional[Tensor], slot: Tensor) -> tuple[Tensor, Optional[Tensor]]:
    """(o, w): o (B, H, T, dh) in (B, T, H, dh) storage, o[b, h, t] = sum_r w_r out[b, h R + r, slot_r] with
    w (B, H, R, T) float32 = softmax over r of lse[b, h R + r, slot_r] (w None and weights 1 without lse, one
    round). out (B, H * R, L, dh), lse (B, H * R, L) natural-log, slot (B, H, R, T) int32."""
    b, h, r, t = slot.shape
    dh, length = out.shape[-1], out.shape[2]
    o = torch.empty(b, t, h, dh, dtype=out.dtype, device=out.device)
    w = None if lse is None else torch.empty(b, h, r, t, dtype=torch.float32, device=out.device)
    _combine_kernel[_grid(t, b * h)](out.contiguous(), out if lse is None else lse.contiguous(), slot.contiguous(),
                                     o, o if w is None else w, t, length, h, R=r, HAS_LSE=lse is not None,
                                     BLOCK=BLOCK_ROWS, D=dh)
    return o.transpose(1, 2), w


def combine_rounds_backward(grad: Tensor, slot: Tensor, length: int, out: Optional[Tensor] = None,
                            w: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
    """(dout (B, H * R, L, dh), dlse (B, H * R, L) float32 or None) of ``combine_rounds`` for dL/do ``grad``
    (B, H, T, dh, any strides with a unit last one); zero at the padding slots (s >= T). ``out`` and ``w`` (the
    forward's kernel output and weights) only with lse; without, dout is dO gathered, in grad's dtype."""
    b, h, r, t = slot.shape
    dh = grad.shape[-1]
    if grad.stride(-1) != 1:
        grad = grad.contiguous()
    dout = torch.empty(b, h * r, length, dh, dtype=grad.dtype if out is None else out.dtype, device=grad.device)
    dlse = None if w is None else torch.empty(b, h * r, length, dtype=torch.float32, device=grad.device)
    if length > t:
        dout[:, :, t:] = 0
        if dlse is not None:
            dlse[:, :, t:] = 0
    out = dout if out is None else out.contiguous()                     # (unread without lse)
    _combine_backward_kernel[_grid(t, b * h)](
        grad, grad.stride(0), grad.stride(2), grad.stride(1), out, out if w is None else w,
        slot.contiguous(), dout, dout if dlse is None else dlse, t, length, h, R=r, HAS_LSE=w is not None,
        BLOCK=BLOCK_ROWS, D=dh)
    return dout, dlse

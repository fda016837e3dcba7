"""Triton kernel for Reformer's angular LSH, h(x) = argmax([xR; -xR]) (Kitaev et al. 2020, sec. 2), on CUDA.

``lsh.lsh_buckets`` forms the rotated values xR ((T, R * n_buckets / 2) float32 per head) block by block with a
batched matmul, then reads them back twice for a max and a min reduction. With many buckets that is most of the
hashing's cost: at T = 64k, 8 heads, 2 rounds and 1024 buckets, 2 GiB of float32 written and read three times
(about 2 ms a step on an H100, plus 32 blocks of eager launches). Here one program takes ``BLOCK_T`` tokens of
one head and round, walks the rotation's columns ``BLOCK_N`` at a time with the products in registers, and keeps
only the running max / min and their first indices:

    h(x) = argmax(xR)            when max(xR) >= -min(xR),
           n_buckets/2 + argmin(xR)   otherwise,

the same rule (first index on ties) as ``lsh_buckets``. Products in float32 accuracy from tensor cores
(``tf32x3``: x and R split into a TF32 head and tail, three products); where two buckets' values differ by less
than that rounding, either may be chosen, as between any two float32 summation orders. Inputs in float32 or
16-bit (promoted to float32 on load, as ``lsh_buckets`` does); float64 and CPU tensors stay on ``lsh_buckets``'
matmul path.
"""
from __future__ import annotations

import torch
from torch import Tensor

from rlformer.attention.compiled import fusion_enabled

try:
    import triton
    import triton.language as tl
except ImportError:          # CPU-only installs: lsh_buckets' matmul path runs
    triton = None

BLOCK_T = 64
"""tokens per program"""
BLOCK_N = 64
"""rotation columns per step of a program's walk"""


def available(x: Tensor) -> bool:
    """Whether the kernel runs for x (B, H, T, dh): CUDA, Triton importable, fusion on (``RLFORMER_FUSED``),
    float32 / bfloat16 / float16, d_head a power of two in [16, 256]."""
    d = x.shape[-1]
    return (triton is not None and x.is_cuda and fusion_enabled() and 16 <= d <= 256 and d & (d - 1) == 0
            and x.dtype in (torch.float32, torch.bfloat16, torch.float16))


if triton is not None:
    @triton.jit
    def _hash_kernel(x_ptr, rot_ptr, out_ptr, T, H, R, HALF, sxb, sxh, sxt,
                     D: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr):
        bhr = tl.program_id(1).to(tl.int64)
        r = bhr % R
        h = (bhr // R) % H
        b = bhr // (R * H)
        t = tl.program_id(0) * BT + tl.arange(0, BT)
        ok = t < T
        d = tl.arange(0, D)
        x = tl.load(x_ptr + b * sxb + h * sxh + t.to(tl.int64)[:, None] * sxt + d[None, :], mask=ok[:, None],
                    other=0.0).to(tl.float32)
        hi = tl.full((BT,), float("-inf"), tl.float32)
        lo = tl.full((BT,), float("inf"), tl.float32)
        arg_hi = tl.zeros((BT,), tl.int32)
        arg_lo = tl.zeros((BT,), tl.int32)
        rot = rot_ptr + (h * R + r) * D * HALF                      # rotations (H, R, D, HALF), contiguous
        for n0 in range(0, HALF, BN):
            n = n0 + tl.arange(0, BN)
            cols = n < HALF
            w = tl.load(rot + d[:, None] * HALF + n[None, :], mask=cols[None, :], other=0.0)
            val = tl.dot(x, w, input_precision="tf32x3")          # (BT, BN) float32
            v_hi = tl.where(cols[None, :], val, float("-inf"))
            v_lo = tl.where(cols[None, :], val, float("inf"))
            blk_hi, blk_arg_hi = tl.max(v_hi, axis=1, return_indices=True, return_indices_tie_break_left=True)
            blk_lo, blk_arg_lo = tl.min(v_lo, axis=1, return_indices=True, return_indices_tie_break_left=True)
            take_hi = blk_hi > hi                                    # strictly: the first block keeps ties
            take_lo = blk_lo < lo
            arg_hi = tl.where(take_hi, blk_arg_hi + n0, arg_hi)
            arg_lo = tl.where(take_lo, blk_arg_lo + n0, arg_lo)
            hi = tl.where(take_hi, blk_hi, hi)
            lo = tl.where(take_lo, blk_lo, lo)
        bucket = tl.where(hi >= -lo, arg_hi, arg_lo + HALF)
        tl.store(out_ptr + bhr * T + t, bucket.to(tl.int64), mask=ok)


def hash_buckets(x: Tensor, rotations: Tensor) -> Tensor:
    """(B, H, R, T) int64 buckets of x (B, H, T, dh; any strides with a unit last one) under rotations (H, R, dh,
    n_buckets / 2) (any dtype; used in float32), n_buckets / 2 >= 1. See the module docstring."""
    b, h, t, d = x.shape
    n_rounds, half = rotations.shape[1], rotations.shape[-1]
    if x.stride(-1) != 1:
        x = x.contiguous()
    rot = rotations.to(device=x.device, dtype=torch.float32).contiguous()
    out = torch.empty(b, h, n_rounds, t, dtype=torch.long, device=x.device)
    grid = (triton.cdiv(t, BLOCK_T), b * h * n_rounds)
    _hash_kernel[grid](x, rot, out, t, h, n_rounds, half, x.stride(0), x.stride(1), x.stride(2),
                       D=d, BT=BLOCK_T, BN=BLOCK_N)
    return out

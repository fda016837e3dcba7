"""Image Transformer local self-attention, 1D and 2D (Parmar et al. 2018, sec. 3.2)."""
from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from rlformer.attention.masks import Pattern, PatternAttention, block_of
from rlformer.config import EncoderConfig
from rlformer.registry import register


@register("attention", "local")
class LocalAttention(PatternAttention):
    """Image Transformer 1D local attention (Parmar et al. 2018, sec. 3.2, "Local Self-Attention").

    The sequence is cut into non-overlapping query blocks of length l_q = ``local.block_size``; every
    query of block b = floor(i / l_q) attends to the memory block made of its own query block plus
    the l_m = ``local.lookback`` positions preceding it:

        A_i = { j : b*l_q - l_m <= j < (b + 1)*l_q },       causal: additionally j <= i,

    then softmax(q_i k_j^T / sqrt(d), j in A_i) v_j. Indices are key-sequence indices, so an XL memory
    prefix is simply the preceding positions (blocks are aligned to the start of the memory).
    ``block_size >= T`` (or ``lookback`` reaching the start) gives full attention.
    """

    @classmethod
    def validate(cls, cfg: EncoderConfig) -> None:
        if cfg.local.block_size < 1 or cfg.local.lookback < 0:
            raise ValueError(f"attention='local' needs local.block_size >= 1 and local.lookback >= 0; got "
                             f"block_size={cfg.local.block_size}, lookback={cfg.local.lookback}")

    def pattern(self, ctx, tk):
        lq, lm = self.cfg.local.block_size, self.cfg.local.lookback

        def rule(h, i, j):
            start = block_of(i, lq) * lq
            return (j >= start - lm) & (j < start + lq)

        return Pattern(rule, ("local", lq, lm))

    def reference_rule(self, ctx, tk):
        lq, lm = self.cfg.local.block_size, self.cfg.local.lookback

        def rule(h, i, j):
            block = i // lq
            memory_block = range(block * lq - lm, (block + 1) * lq)
            return j in memory_block

        return rule


def grid_shape(cfg: EncoderConfig, t: int) -> tuple[int, int]:
    """(H, W) of the local2d grid for a sequence of length t; ValueError when t does not fit."""
    rows, cols = cfg.local.grid
    if rows == 0 and cols == 0:
        side = math.isqrt(t)
        if side * side != t:
            raise ValueError(f"attention='local2d' with local.grid=(0, 0) infers a square grid, but T={t} is not a "
                             f"perfect square; set local.grid=(H, W) with H*W == T")
        return side, side
    if rows * cols != t:
        raise ValueError(f"attention='local2d' lays the sequence out on local.grid={tuple(cfg.local.grid)} "
                         f"({rows * cols} cells) but got T={t} tokens; the segment must fill the grid exactly")
    return rows, cols


@functools.lru_cache(maxsize=32)
def tile_order(rows: int, cols: int, lh: int, lw: int) -> Tensor:
    """Raster positions of an (rows, cols) image listed rectangle by rectangle ((lh, lw) rectangles in raster
    order, cells in raster order inside each; edge rectangles are smaller): a (rows * cols,) long permutation.
    Cached (``pattern`` asks for it on every forward); callers must not modify it."""
    r, c = torch.arange(rows)[:, None], torch.arange(cols)[None, :]
    n_rect_cols = -(-cols // lw)
    rank = ((r // lh) * n_rect_cols + c // lw) * (lh * lw) + (r % lh) * lw + c % lw
    return torch.argsort(rank.flatten())


@register("attention", "local2d")
class Local2DAttention(PatternAttention):
    """Image Transformer 2D local attention (Parmar et al. 2018, sec. 3.2, Fig. 2 right).

    The T = H*W tokens are an (H, W) image in raster order (``local.grid``; (0, 0) = square). The image
    is cut into query rectangles of ``local.query_shape`` = (l_h, l_w); a query at (r, c) in rectangle
    (R, C) = (floor(r / l_h), floor(c / l_w)) attends to the memory rectangle that extends its query
    rectangle by f_h = ``memory_flange[0]`` rows up and f_w = ``memory_flange[1]`` columns left and right:

        A_(r,c) = { (r', c') : R*l_h - f_h <= r' < (R+1)*l_h,  C*l_w - f_w <= c' < (C+1)*l_w + f_w },

    causal: additionally raster index r'*W + c' <= r*W + c (the paper's masked decoder). Grids not
    divisible by the rectangle are fine (the last rectangles are smaller). The grid is the segment
    itself, so an XL memory prefix has no place in it: ``supports_memory = False``.

    On the FlexAttention path queries and keys are taken in rectangle order (``tile_order``: rectangle by
    rectangle, raster order inside each), as the paper's implementation does: a raster-order query block is a
    strip of one image row that needs every rectangle of the rows above it, a rectangle-order block needs
    only the few rectangles around its own, most of them whole (dense) key blocks.
    """

    supports_memory = False

    @classmethod
    def validate(cls, cfg: EncoderConfig) -> None:
        lc = cfg.local
        if min(lc.query_shape) < 1 or min(lc.memory_flange) < 0:
            raise ValueError(f"attention='local2d' needs local.query_shape >= (1, 1) and local.memory_flange >= "
                             f"(0, 0); got query_shape={tuple(lc.query_shape)}, memory_flange={tuple(lc.memory_flange)}")
        rows, cols = lc.grid
        if (rows == 0) != (cols == 0) or rows < 0 or cols < 0:
            raise ValueError(f"attention='local2d' needs local.grid=(H, W) with H, W >= 1, or (0, 0) for a square "
                             f"grid inferred from T; got {tuple(lc.grid)}")

    def _shape(self, ctx, tk):
        if ctx.n_mem:
            raise ValueError("attention='local2d' cannot attend to a memory prefix (use memory='none')")
        rows, cols = grid_shape(self.cfg, tk)
        (lh, lw), (fh, fw) = self.cfg.local.query_shape, self.cfg.local.memory_flange
        return rows, cols, lh, lw, fh, fw

    def pattern(self, ctx, tk):
        rows, cols, lh, lw, fh, fw = self._shape(ctx, tk)

        def rule(h, i, j):
            r0, c0 = block_of(i, cols), i % cols
            r1, c1 = block_of(j, cols), j % cols
            top, left = block_of(r0, lh) * lh, block_of(c0, lw) * lw
            return (r1 >= top - fh) & (r1 < top + lh) & (c1 >= left - fw) & (c1 < left + lw + fw)

        order = tile_order(rows, cols, lh, lw)
        return Pattern(rule, ("local2d", rows, cols, lh, lw, fh, fw, "tiles"), key_order=order, query_order=order)

    def reference_rule(self, ctx, tk):
        rows, cols, lh, lw, fh, fw = self._shape(ctx, tk)

        def rule(h, i, j):
            (r, c), (r2, c2) = divmod(i, cols), divmod(j, cols)
            big_r, big_c = r // lh, c // lw
            memory_rows = range(big_r * lh - fh, (big_r + 1) * lh)
            memory_cols = range(big_c * lw - fw, (big_c + 1) * lw + fw)
            return r2 in memory_rows and c2 in memory_cols

        return rule

"""Sparsity patterns of the mask-shaped attentions, one definition per pattern, two back-ends.

A pattern is a function ``rule(h, i, j) -> bool tensor`` on broadcastable integer tensors: ``h`` the
head, ``i`` the query's index and ``j`` the key's index in the key sequence [memory; segment]
(``ctx.q_index`` / ``ctx.k_index``; a query of the segment sits at key index M + t when M memory
slots precede it). Extra keys that are not part of the sequence (ETC's global tokens) get negative
indices. Only elementwise integer ops are used (``//``, ``%``, comparisons, ``&``, ``|``, lookups in
small tables), so the very same function

- builds the dense (B|1, H|1, Tq, Tk) bool mask for SDPA and the reference on CPU (``dense_mask``), and
- is the FlexAttention ``mask_mod`` behind a compiled BlockMask on CUDA (``flex_mask_mod``).

Both go through ``combine``, which adds causality (j <= i), key validity (padding, empty memory) and
the own-key fallback (with a validity mask, a query may always see itself, as in
``AttentionContext.allowed``), so the fast path and the reference cannot disagree about the pattern.

``PatternAttention`` is the shared ``attend``: CPU or dropout -> SDPA with the dense mask (or the
dense reference when the position rewrites scores); CUDA -> ``flex_attention`` with the BlockMask
(ALiBi through a ``score_mod``; other score/value positions fall back to the dense path, which is
O(T^2) memory).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from rlformer.attention.base import Attention
from rlformer.attention.reference import dense_attention
from rlformer.context import AttentionContext

Rule = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True, eq=False)
class Pattern:
    """A sparsity pattern: ``rule(h, i, j, **tables)`` plus what identifies it for caching."""

    rule: Callable[..., Tensor]
    key: tuple
    """hashable description; equal keys must mean equal patterns (BlockMask cache)"""
    per_head: bool = False
    tables: dict = field(default_factory=dict)
    """small integer tensors the rule looks up (moved to the device of the call)"""
    key_order: Optional[Tensor] = None
    """FlexAttention only: a permutation of the key positions (long, (Tk,)). The Flex path gathers the
    keys and values in this order and its mask_mod maps a permuted key back through the table, so the
    attention is unchanged while keys that a pattern picks from all over the sequence (Sparse
    Transformer's summary columns) become contiguous and the BlockMask block-sparse. Part of ``key``.
    The dense path ignores it (a dense mask costs the same in any order)."""
    query_order: Optional[Tensor] = None
    """FlexAttention only: a permutation of the query positions (long, (Tq,)), for patterns whose query groups are
    not contiguous runs of the sequence (local2d's rectangles of a raster-order image). The Flex path gathers the
    queries in this order, its mask_mod maps a permuted query back through the table, and the output is put back
    in sequence order. Part of ``key``; the dense path ignores it."""

    @property
    def ordered(self) -> bool:
        """Whether the Flex path permutes keys or queries (``key_order`` / ``query_order``)."""
        return self.key_order is not None or self.query_order is not None

    def orders(self, device: torch.device) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """(key_order, query_order) as int32 tables on ``device`` for a mask_mod / score_mod (None where absent)."""
        return tuple(None if o is None else o.to(device=device, dtype=torch.int32)
                     for o in (self.key_order, self.query_order))

    def bind(self, device: torch.device) -> Rule:
        tables = {name: t.to(device) for name, t in self.tables.items()}
        return lambda h, i, j: self.rule(h, i, j, **tables)


def combine(allowed: Tensor, i: Tensor, j: Tensor, causal: bool, valid: Optional[Tensor]) -> Tensor:
    """pattern AND (j <= i if causal) AND key valid, OR own key when a validity mask is given."""
    if causal:
        allowed = allowed & (j <= i)
    if valid is not None:
        allowed = (allowed & valid) | (i == j)
    return allowed


def dense_mask(pattern: Pattern, q_index: Tensor, k_index: Tensor, n_heads: int, causal: bool,
               key_valid: Optional[Tensor]) -> Tensor:
    """(B|1, H|1, Tq, Tk) bool mask of allowed (query, key) pairs."""
    device = q_index.device
    h = torch.arange(n_heads if pattern.per_head else 1, device=device).view(-1, 1, 1)
    i, j = q_index.view(1, -1, 1), k_index.view(1, 1, -1)
    allowed = pattern.bind(device)(h, i, j).expand(h.shape[0], i.shape[1], j.shape[2])[None]
    valid = None if key_valid is None else key_valid[:, None, None, :]
    return combine(allowed, i[None], j[None], causal, valid)


def flex_mask_mod(pattern: Pattern, n_mem: int, k_offset: int, causal: bool, key_valid: Optional[Tensor],
                  device: torch.device):
    """FlexAttention mask_mod(b, h, q_idx, kv_idx) of the same pattern.

    q_idx / kv_idx are positions in the q / k tensors: the query index is n_mem + q_idx and the key
    index kv_idx - k_offset (k_offset extra keys with negative indices come first). With a
    ``pattern.key_order`` the k tensor is permuted: its kv_idx-th key is key_order[kv_idx] of the
    unpermuted keys (``key_valid`` stays unpermuted); likewise q with ``pattern.query_order``.
    """
    rule = pattern.bind(device)
    order, q_order = pattern.orders(device)

    def mask_mod(b, h, q_idx, kv_idx):
        kv = kv_idx if order is None else order[kv_idx]
        q = q_idx if q_order is None else q_order[q_idx]
        i, j = q + n_mem, kv - k_offset
        valid = None if key_valid is None else key_valid[b, kv]
        return combine(rule(h, i, j), i, j, causal, valid)

    return mask_mod


def loop_mask(rule: Callable[[int, int, int], bool], q_index: Tensor, k_index: Tensor, n_heads: int,
              causal: bool, key_valid: Optional[Tensor]) -> Tensor:
    """Naive reference: the (B|1, H, Tq, Tk) mask from a plain-Python rule, one pair at a time."""
    qs, ks = q_index.tolist(), k_index.tolist()
    rows = 1 if key_valid is None else key_valid.shape[0]
    mask = torch.zeros(rows, n_heads, len(qs), len(ks), dtype=torch.bool)
    for b in range(rows):
        for h in range(n_heads):
            for a, i in enumerate(qs):
                for c, j in enumerate(ks):
                    ok = rule(h, i, j) and (not causal or j <= i)
                    if key_valid is not None:
                        ok = (ok and bool(key_valid[b, c])) or i == j
                    mask[b, h, a, c] = ok
    return mask.to(q_index.device)


def alibi_slopes_of(position) -> Optional[Tensor]:
    """The per-head ALiBi slopes when ``position`` is ALiBi (FlexAttention score_mod), else None."""
    from rlformer.position.bias import ALiBiPosition
    return position.slopes if isinstance(position, ALiBiPosition) else None


class PatternAttention(Attention):
    """Base of the mask-shaped attentions: ``pattern(ctx, tk)`` names the allowed pairs.

    CPU (and attention dropout in training): SDPA with the dense mask, or the dense reference
    when the position rewrites scores. CUDA: compiled ``flex_attention`` with a cached BlockMask
    built from the same pattern, so no (Tq, Tk) tensor is formed.
    """

    def pattern(self, ctx: AttentionContext, tk: int) -> Pattern:
        raise NotImplementedError

    def reference_rule(self, ctx: AttentionContext, tk: int) -> Callable[[int, int, int], bool]:
        """The pattern as a plain-Python predicate written from the paper's set definitions."""
        raise NotImplementedError

    def reference(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext) -> Tensor:
        """Naive dense reference: loop-built mask + ``dense_attention`` (tests compare against it)."""
        mask = loop_mask(self.reference_rule(ctx, k.shape[2]), ctx.q_index, ctx.k_index, self.n_heads,
                         ctx.causal, ctx.key_valid)
        return dense_attention(q, k, v, mask, self.scale, self.score_position, ctx.q_index, ctx.k_index)

    def attend(self, q, k, v, ctx):
        return self.attend_pattern(q, k, v, ctx, self.pattern(ctx, k.shape[2])), {}

    def use_flex(self, q: Tensor) -> bool:
        from rlformer.attention.flex import flex_available
        pos = self.score_position
        dropout = self.dropout > 0 and self.training
        return (q.is_cuda and flex_available() and not dropout
                and (pos is None or alibi_slopes_of(pos) is not None))

    def attend_pattern(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttentionContext, pattern: Pattern,
                       k_index: Optional[Tensor] = None, key_valid: Optional[Tensor] = None,
                       k_offset: int = 0) -> Tensor:
        """Masked attention of q over k, v with ``pattern``; ``k_index``/``key_valid`` default to ctx's
        (ETC passes its extended keys, whose first ``k_offset`` have negative indices)."""
        k_index = ctx.k_index if k_index is None else k_index
        key_valid = ctx.key_valid if key_valid is None else key_valid
        pos = self.score_position
        if self.use_flex(q):
            from rlformer.attention.flex import flex_pattern_attention
            n_mem = k.shape[2] - k_offset - q.shape[2]
            return flex_pattern_attention(q, k, v, pattern, n_mem, k_offset, ctx.causal, key_valid, self.scale,
                                          None if pos is None else alibi_slopes_of(pos))
        mask = dense_mask(pattern, ctx.q_index, k_index, self.n_heads, ctx.causal, key_valid)
        dropout = self.dropout if self.training else 0.0
        if pos is not None and not pos.additive:
            return dense_attention(q, k, v, mask, self.scale, pos, ctx.q_index, k_index, dropout, self.training)
        if pos is not None:
            bias = pos.bias(ctx.q_index, k_index).to(q.dtype)[None]
            mask = bias.masked_fill(~mask, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=self.scale)


def block_of(x: Tensor, size: int) -> Tensor:
    return torch.div(x, size, rounding_mode="floor")


def is_global(x: Tensor, positions: tuple[int, ...]) -> Tensor:
    """x in positions: an OR over runs of consecutive positions (lo <= x <= hi), so it also runs
    inside a mask_mod and stays cheap for BigBird's blocks of global tokens."""
    out = x != x
    for lo, hi in runs(positions):
        out = out | ((x >= lo) & (x <= hi)) if hi > lo else out | (x == lo)
    return out


def runs(positions: tuple[int, ...]) -> list[tuple[int, int]]:
    """Sorted distinct positions as (first, last) runs of consecutive integers."""
    out: list[tuple[int, int]] = []
    for p in sorted(set(positions)):
        if out and p == out[-1][1] + 1:
            out[-1] = (out[-1][0], p)
        else:
            out.append((p, p))
    return out


def mix_hash(*parts):
    """A deterministic 31-bit integer hash of ints or integer tensors (LCG rounds). Every product
    stays below 2**62, so Python ints and int64 tensors give the same value; the loop references
    call it on ints, BigBird's random-block table on CPU tensors. Keep it out of mask_mods: Flex
    would have to compile the int64 multiply/xor/shift into its Triton kernels (a table lookup
    of precomputed values compiles everywhere)."""
    x = 0
    for p in parts:
        if isinstance(p, Tensor):
            p = p.long()                     # FlexAttention hands int32 indices to a mask_mod
        x = (((x + p) & 0x7FFFFFFF) * 1103515245 + 12345) & 0x7FFFFFFF
        x = x ^ (x >> 13)
    return x

"""FlexAttention fast path of the mask-shaped attentions (CUDA only).

``flex_pattern_attention`` runs a compiled ``flex_attention`` with a BlockMask made from a
``masks.Pattern`` (the same rule the dense CPU mask uses). BlockMasks are cached per (pattern,
shape, causality, device) when the mask does not depend on data; with a key-validity mask
(padding, partly empty XL memory) the BlockMask has a batch dimension and is rebuilt each call
(compiled ``create_block_mask``, so still no (Tq, Tk) tensor) from a cached mask_mod. A pattern with a
``key_order`` gets its keys and values gathered in that order first (the mask_mod and the ALiBi score_mod map
them back), which makes patterns like Sparse Transformer's summary columns block-sparse. FlexAttention has no
backward on CPU, so callers use it only for CUDA tensors.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Optional

import torch
from torch import Tensor

from rlformer.attention.masks import Pattern, flex_mask_mod

_CACHE: "OrderedDict[tuple, object]" = OrderedDict()
_CACHE_SIZE = 64
_COMPILED: dict = {}


def flex_available() -> bool:
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


BLOCK = 128
"""BlockMask block (queries and keys) of the banded fast paths: FlexAttention's default sparse block, a multiple
of every kernel tile"""


def flex_eligible(q: Tensor, dropout: float, training: bool) -> bool:
    """Whether a FlexAttention fast path can run on ``q``: a CUDA tensor, no dropout in training (the kernel never
    forms the probabilities dropout needs), a head size the kernels compile (16..256, a power of two), and
    flex_attention importable."""
    dh = q.shape[-1]
    return (q.is_cuda and not (dropout > 0 and training) and 16 <= dh <= 256 and dh & (dh - 1) == 0
            and flex_available())


def with_mask_mod(block_mask, mask_mod):
    """A shallow copy of a cached BlockMask with this call's mask_mod (the block tables are shared)."""
    out = copy.copy(block_mask)
    out.mask_mod = mask_mod
    return out


def flex_with_lse(flex, q: Tensor, k: Tensor, v: Tensor, **kwargs) -> tuple[Tensor, Tensor]:
    """(out, lse) of ``flex`` (natural-log logsumexp): ``return_aux=AuxRequest(lse=True)`` where torch has it
    (``return_lse`` is deprecated there), else ``return_lse=True``."""
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:
        return flex(q, k, v, return_lse=True, **kwargs)
    out, aux = flex(q, k, v, return_aux=AuxRequest(lse=True), **kwargs)
    return out, aux.lse


def capturing(x: Tensor) -> bool:
    """True while ``x``'s CUDA stream is being captured into a CUDA graph: no host reads of device values then."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def raise_recompile_limit() -> None:
    """Raise Dynamo's recompile limits (8 per function by default): every distinct pattern (per layer, length,
    memory length) is a new mask_mod and so a recompile, and past the limit a compiled function silently runs
    eagerly (flex_attention then with O(T^2) memory)."""
    dynamo = torch._dynamo.config
    limit = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
    setattr(dynamo, limit, max(getattr(dynamo, limit), 256))
    if hasattr(dynamo, "accumulated_recompile_limit"):
        dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, 4096)


def _flex():
    if "flex" not in _COMPILED:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        raise_recompile_limit()
        _COMPILED["flex"] = torch.compile(flex_attention, dynamic=False)
        # dynamic=False here too: with create_block_mask(_compile=True), Dynamo's automatic dynamic shapes turn
        # the integer constants of the rules (block sizes, strides) into SymInts once a second pattern with other
        # values is compiled, and ``torch.div(x, SymInt, rounding_mode=...)`` then fails to trace.
        _COMPILED["create_block_mask"] = torch.compile(create_block_mask, dynamic=False)
    return _COMPILED["flex"], _COMPILED["create_block_mask"]


def _cached(key, build):
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    value = _CACHE[key] = build()
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return value


EVAL_BUDGET = 1 << 25
"""Scores per chunk of ``evaluated_block_mask``: (heads x rows x keys) mask values evaluated at once (int64
intermediates: ~256 MiB of transient memory per rule operation)"""


@torch.no_grad()
def evaluated_block_mask(mask_mod, n_heads: Optional[int], tq: int, tk: int, device: torch.device,
                         budget: int = EVAL_BUDGET):
    """The BlockMask of a batch-independent ``mask_mod``, evaluated eagerly on ``device``: no compile.

    The mask_mod runs on (heads, rows, keys) index grids, a band of 128-row query blocks at a time (at most
    ``budget`` values per band), and each 128 x 128 block is classified: every pair allowed -> a full block
    (no mask_mod inside the kernel), some -> a partial one, none -> skipped. Positions past tq / tk count as
    masked, so edge blocks are partial. Same block sets as ``create_block_mask`` (tested), without compiling
    it (a compiled ``create_block_mask`` is one more Inductor compile per pattern and shape, before the
    kernel's own). Cost: one pass of the rule over tq x tk (x heads) scores, once per cached pattern, in
    max(1, budget / (heads x 128 x tk)) query blocks per band (BigBird's 8-head rule at 16k: 0.48 s on an H100,
    ``scripts/probe_first_step.py``).
    """
    from torch.nn.attention.flex_attention import BlockMask
    h = n_heads or 1
    nq, nk = -(-tq // BLOCK), -(-tk // BLOCK)
    rows = max(1, budget // (h * nk * BLOCK * BLOCK))
    head = torch.arange(h, device=device).view(h, 1, 1)
    kv = torch.arange(nk * BLOCK, device=device).view(1, 1, -1)
    batch = torch.zeros((), dtype=torch.long, device=device)
    partial, full = [], []
    for m0 in range(0, nq, rows):
        m1 = min(nq, m0 + rows)
        q = torch.arange(m0 * BLOCK, m1 * BLOCK, device=device).view(1, -1, 1)
        # past-the-end indices are clamped for the rule (its tables have tq / tk entries), then masked
        ok = mask_mod(batch, head, q.clamp(max=tq - 1), kv.clamp(max=tk - 1)) & (q < tq) & (kv < tk)
        ok = ok.expand(h, q.shape[1], kv.shape[2]).reshape(h, m1 - m0, BLOCK, nk, BLOCK)
        some, every = ok.any(4).any(2), ok.all(4).all(2)
        partial.append(some & ~every)
        full.append(every)

    def tables(sel: list[Tensor]) -> tuple[Tensor, Tensor]:
        sel = torch.cat(sel, 1)[None]                                   # (1, H, NQ, NK)
        order = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True)  # chosen blocks first, in order
        return sel.sum(-1, dtype=torch.int32), order.to(torch.int32)

    count, index = tables(partial)
    full_count, full_index = tables(full)
    return BlockMask.from_kv_blocks(count, index, full_count, full_index, BLOCK_SIZE=BLOCK, mask_mod=mask_mod,
                                    seq_lengths=(tq, tk))


def block_mask_for(pattern: Pattern, batch: int, n_heads: int, tq: int, tk: int, n_mem: int, k_offset: int,
                   causal: bool, key_valid: Optional[Tensor], device: torch.device):
    """The BlockMask of ``pattern`` for these shapes.

    Without ``key_valid`` the BlockMask itself is cached (``evaluated_block_mask``: no compile). With it, the
    BlockMask depends on the data and is rebuilt each call, but the mask_mod is cached together with a buffer
    that receives ``key_valid``, so the compiled ``create_block_mask`` sees the same function and tensor every
    call (no recompiles).
    """
    _, create_block_mask = _flex()
    heads = n_heads if pattern.per_head else None
    key = (pattern.key, heads, tq, tk, n_mem, k_offset, causal, str(device))
    if key_valid is None:
        return _cached(key, lambda: evaluated_block_mask(flex_mask_mod(pattern, n_mem, k_offset, causal, None, device),
                                                         heads, tq, tk, device))

    def build():
        buffer = torch.ones(batch, tk, dtype=torch.bool, device=device)
        return flex_mask_mod(pattern, n_mem, k_offset, causal, buffer, device), buffer

    mask_mod, buffer = _cached(key + ("valid", batch), build)
    buffer.copy_(key_valid)
    return create_block_mask(mask_mod, batch, heads, tq, tk, device=device)


def alibi_score_mod(slopes: Tensor, n_mem: int, k_offset: int, pattern: Optional[Pattern] = None):
    """score - m_h |i - j| as a FlexAttention score_mod (cached per slopes tensor and offsets; with the
    pattern's ``key_order`` / ``query_order``, kv_idx / q_idx are mapped back through them)."""
    order_key = pattern.key if pattern is not None and pattern.ordered else None

    def build():
        table = slopes.detach().to(torch.float32)
        order, q_order = (None, None) if order_key is None else pattern.orders(slopes.device)

        def score_mod(score, b, h, q_idx, kv_idx):
            kv = kv_idx if order is None else order[kv_idx]
            q = q_idx if q_order is None else q_order[q_idx]
            return score - table[h] * (q + n_mem - (kv - k_offset)).abs()

        return score_mod, slopes                     # keep ``slopes`` alive so its id stays unique

    return _cached(("alibi", id(slopes), n_mem, k_offset, str(slopes.device), order_key), build)[0]


def flex_pattern_attention(q: Tensor, k: Tensor, v: Tensor, pattern: Pattern, n_mem: int, k_offset: int,
                           causal: bool, key_valid: Optional[Tensor], scale: float,
                           alibi_slopes: Optional[Tensor] = None) -> Tensor:
    """softmax(scale q k^T [- m_h |i - j|], masked by the pattern) v with FlexAttention."""
    flex, _ = _flex()
    b, h, tq, _ = q.shape
    block_mask = block_mask_for(pattern, b, h, tq, k.shape[2], n_mem, k_offset, causal, key_valid, q.device)
    score_mod = None if alibi_slopes is None else alibi_score_mod(alibi_slopes, n_mem, k_offset, pattern)
    if pattern.key_order is not None:           # keys in the pattern's block-sparse order (see Pattern)
        k, v = (permute_positions(x, pattern.key_order, pattern.key) for x in (k, v))
    if pattern.query_order is None:
        return flex(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)
    # queries in the pattern's order too; the output goes back through the inverse permutation
    out = flex(permute_positions(q, pattern.query_order, pattern.key), k, v, score_mod=score_mod,
               block_mask=block_mask, scale=scale)
    return permute_positions(out, pattern.query_order, pattern.key, inverse=True)


def permute_positions(x: Tensor, order: Tensor, key: tuple, inverse: bool = False) -> Tensor:
    """x (B, H, T, dh) with its positions in ``order`` (y[:, :, s] = x[:, :, order[s]]); ``inverse``: put such a
    tensor back (y[:, :, order[s]] = x[:, :, s]), returned in (B, T, H, dh) storage, which merge_heads reshapes
    without a copy. Both directions and their backward passes are row gathers with the permutation or its inverse
    (``flex_bucket._Gather`` / ``_Ungather`` with one round: Triton row kernels on CUDA, no index_add and no
    zero-filled gradient as index_select's backward makes), one autograd node per tensor so that backward frees
    each gradient as soon as it is moved. ``key`` (the pattern's) caches the (B, H, 1, T) int32 index tables."""
    from rlformer.attention.flex_bucket import _Gather, _Ungather     # flex_bucket builds on this module

    b, h, t = x.shape[0], x.shape[1], x.shape[2]

    def build():
        rows = order.to(device=x.device, dtype=torch.int32)
        slot = torch.empty_like(rows).scatter_(0, rows.long(), torch.arange(t, dtype=torch.int32, device=x.device))
        return tuple(i.view(1, 1, 1, t).expand(b, h, 1, t).contiguous() for i in (rows, slot))

    rows, slot = _cached(("positions", key, b, h, t, str(x.device)), build)
    if inverse:
        return _Ungather.apply(x, None, rows, slot)
    return _Gather.apply(rows, slot, x)[0]

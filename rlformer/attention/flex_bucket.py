"""FlexAttention fast path of sort-and-chunk attention (lsh, routing): one compiled kernel call.

Same meaning as ``chunked_softmax.bucket_softmax_attention`` (and ``chunked.bucket_attention`` followed by
``combine_rounds``): tokens are sorted by (bucket, position) per round; each bucket's run is cut into chunks of
``chunk_size`` starting at the run's first token; a query attends to the keys of its bucket whose chunk is
``before`` chunks earlier .. ``after`` chunks later than its own, j <= i when causal, |i - j| < ``window`` when
set (i - j < window when causal), valid keys only; its own key is always allowed and lowered by SELF_PENALTY
(``self_penalty``); with ``dedup`` the score of (i, j) is lowered by log N_ij, N_ij the number of rounds in
which i and j share a bucket; rounds are combined by their log-normalizers, o_i = sum_r softmax_r(lse_i^r) o_i^r
(Kitaev et al. 2020, sec. 2).

How it runs: q, k, v are gathered into the bucket-sorted order of every round, rounds folded into the head
axis, (B, H * R, L, dh) with L = T rounded up to the kernel block (``BLOCK`` = 128). In that order the keys a
query may use lie in a static band around it: with sorted index s, the keys of its bucket in chunks
c - before .. c + after sit at sorted indices s - (before + 1) * C + 1 .. s + (after + 1) * C - 1 (and, causal,
<= s; with a window, within window - 1 of s, since positions inside a bucket are increasing in the sorted order).
So ONE ``flex_attention`` call runs with a BlockMask that is that band in blocks of 128 (built directly from
``kv_num_blocks`` / ``kv_indices``, cached per (L, C, before, after, causal, window, device): (L / 128)^2 int32
in the BlockMask format, 1 MiB at L = 64k; nothing of size L x L), and a mask_mod / score_mod that read per-slot int32 tables (original position, bucket,
chunk within the bucket, key validity folded into the key's bucket, the other rounds' buckets) to apply the exact
rule. The band is only a superset for speed; the mask_mod alone defines the allowed set.

The sorted order is not padded per bucket (the chunk of a slot is its rank in the bucket // C, a table value), so
the gathered tensors hold R * T rows, not R * (T + n_buckets * C). Block size 128 for any chunk size: the
Triton kernels need the BlockMask block to be a multiple of their tiles (up to 128), and a band of 128-blocks
around a chunk band of any C is correct because the mask_mod checks chunks exactly. A query slot always keeps
its own slot (the diagonal), so no row is fully masked; the padding slots at the end of a row (L > T) read row
0 of the inputs, are never keys of real queries and never written back, so they get zero gradient.

The mod tables are fresh tensors captured by fresh closures on every call; Dynamo guards on the closures' code
and the tables' shapes, not their values, so calls with the same shapes do not recompile, and a later call
(another layer) never overwrites tables that an earlier call's backward still reads. FlexAttention has no
backward on CPU: callers use this for CUDA tensors; on CPU it runs forward only (``compile=False`` there runs
the dense eager implementation, for tests at small sizes).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from rlformer.attention import row_gather
from rlformer.attention.chunked import SELF_PENALTY
from rlformer.attention.compiled import fused
from rlformer.attention.flex import BLOCK, _cached, _flex, flex_eligible, flex_with_lse, with_mask_mod

__all__ = ["BLOCK", "auto_head_groups", "band_block_mask", "bucket_slots", "flex_bucket_attention", "gather_sorted",
           "sum_sorted", "use_flex_bucket"]


def use_flex_bucket(q: Tensor, dropout: float, training: bool) -> bool:
    """Whether lsh / routing take this path: float32 / bfloat16 / float16 tensors on which ``flex.flex_eligible``
    holds (CUDA, no dropout in training, a head size the kernels compile, flex_attention importable)."""
    return q.dtype in (torch.float32, torch.bfloat16, torch.float16) and flex_eligible(q, dropout, training)


def _band_reach(chunk_size: int, before: int, after: int, causal: bool, window: int | None) -> tuple[int, int]:
    """How far back / ahead of its sorted index a query's allowed keys can lie (see the module docstring)."""
    back = (before + 1) * chunk_size - 1
    ahead = 0 if causal else max(0, (after + 1) * chunk_size - 1)
    if window is not None:
        back, ahead = min(back, window - 1), min(ahead, window - 1)
    return back, ahead


def band_blocks(length: int, chunk_size: int, before: int, after: int, causal: bool,
                window: int | None, device=None) -> tuple[Tensor, Tensor]:
    """kv_num_blocks (1, 1, NQ) and kv_indices (1, 1, NQ, NQ) int32 of the band, NQ = ceil(length / BLOCK).

    Query block m holds sorted indices [m B, m B + B); its keys lie in [m B - back, m B + B - 1 + ahead]. Row m
    of kv_indices lists those blocks first; the rest of the row is unused (the BlockMask format has one column
    per key block: (L / 128)^2 int32, 1 MiB at L = 64k, built once per length, on ``device``: no host-to-device
    copy, so it can be built inside a CUDA graph capture).
    """
    back, ahead = _band_reach(chunk_size, before, after, causal, window)
    nq = -(-length // BLOCK)
    m = torch.arange(nq, device=device)
    first = (m * BLOCK - back).clamp(min=0) // BLOCK
    last = (m * BLOCK + BLOCK - 1 + ahead).clamp(max=nq * BLOCK - 1) // BLOCK
    count = last - first + 1
    idx = first[:, None] + torch.arange(nq, device=device)
    idx = torch.where(idx <= last[:, None], idx, 0)
    return count.to(torch.int32).view(1, 1, nq), idx.to(torch.int32).view(1, 1, nq, nq)


def band_block_mask(length: int, chunk_size: int, before: int, after: int, causal: bool, window: int | None,
                    device) -> object:
    """The cached band BlockMask (mask_mod: none yet; ``flex_bucket_attention`` sets it per call)."""
    def build():
        from torch.nn.attention.flex_attention import BlockMask
        count, idx = band_blocks(length, chunk_size, before, after, causal, window, device)
        lp = count.shape[-1] * BLOCK
        return BlockMask.from_kv_blocks(count, idx, BLOCK_SIZE=BLOCK, seq_lengths=(lp, lp))

    return _cached(("bucket_band", length, chunk_size, before, after, causal, window, str(device)), build)


PAD_QUERY, NO_KEY = -(1 << 29), -(1 << 30)
"""``group`` of the padding query slots and ``kgroup`` of invalid / padding key slots: no difference between them
and any other group number is within the reach (group numbers are < 2^29 for any sequence that fits in memory)"""


@torch.no_grad()
def bucket_slots(buckets: Tensor, chunk_size: int, key_valid: Tensor | None, dedup: bool, reach: int = 1) -> dict:
    """Per-slot tables of the bucket-sorted order, rounds folded into heads.

    buckets: (B, H, R, T). Returns ``rows`` (B, H, R, L) int32: the position of each slot (0 for the padding
    slots, L - T of them at the end), ``slot`` (B, H, R, T) int32: the slot of each position, and int32 tables
    (B, H * R, L): ``pos`` (T for padding); ``group``: the slot's chunk (its rank in its bucket's run // C)
    numbered along the whole sorted order with a gap of ``reach`` + 1 numbers before each bucket's run, so that
    for |dc| <= ``reach`` two slots share a bucket and lie dc chunks apart exactly when their group numbers differ
    by dc (``PAD_QUERY`` for padding); ``kgroup``: the same as a key, ``NO_KEY`` when the key is invalid or
    padding; ``others`` (with ``dedup`` and R > 1): for each round r' != r (in order), the bucket of the slot's
    token in round r'. ``reach`` must be >= the chunks a query looks back or ahead. Built by ``_slot_tables``
    (fused into a few kernels on CUDA, ``compiled.fused``).
    """
    length = -(-buckets.shape[-1] // BLOCK) * BLOCK
    rows, slot, pos, group, kgroup, others = fused(_slot_tables, buckets)(buckets, chunk_size, key_valid, dedup,
                                                                          length, reach)
    return {"rows": rows, "slot": slot, "length": length, "pos": pos, "group": group, "kgroup": kgroup,
            "others": list(others)}


def _slot_tables(buckets: Tensor, chunk_size: int, key_valid: Tensor | None, dedup: bool, length: int,
                 reach: int):
    """The tensors of ``bucket_slots`` (pure tensor code): (rows, slot, pos, group, kgroup, others)."""
    b, h, r, t = buckets.shape
    dev = buckets.device
    pos = torch.arange(t, device=dev)
    perm = (buckets * t + pos).argsort(dim=-1)                                      # sorted index -> position
    sb = torch.take_along_dim(buckets, perm, dim=-1)
    new_run = torch.ones_like(sb, dtype=torch.bool)
    new_run[..., 1:] = sb[..., 1:] != sb[..., :-1]
    run_start = torch.where(new_run, pos, 0).cummax(dim=-1).values
    chunk = (pos - run_start) // chunk_size
    # +1 at each new chunk of a run, +(reach + 1) at each new run: chunks of different buckets stay > reach apart
    step = torch.where(new_run, reach + 1, chunk - torch.nn.functional.pad(chunk[..., :-1], (1, 0)))
    group = step.cumsum(-1)
    slot = torch.empty_like(perm).scatter_(-1, perm, pos.expand_as(perm))
    pad = length - t

    def table(x: Tensor, fill: int) -> Tensor:
        x = torch.nn.functional.pad(x, (0, pad), value=fill) if pad else x
        return x.to(torch.int32).reshape(b, h * r, length)

    kgroup = group
    if key_valid is not None:
        ok = torch.take_along_dim(key_valid.to(torch.bool)[:, None, None, :].expand(b, h, r, t), perm, dim=-1)
        kgroup = torch.where(ok, group, NO_KEY)
    others = []
    if dedup and r > 1:
        for k in range(r - 1):      # the k-th round other than the slot's own
            choice = [[rr for rr in range(r) if rr != own][k] for own in range(r)]
            src = torch.stack([buckets[:, :, c] for c in choice], dim=2)          # (B, H, R, T): round choice[r]
            # (Python ints, not an index tensor: no host-to-device copy, so a CUDA graph can capture this)
            others.append(table(torch.take_along_dim(src, perm, dim=-1), -1))
    rows = torch.nn.functional.pad(perm, (0, pad), value=0) if pad else perm
    return (rows.to(torch.int32), slot.to(torch.int32), table(perm, t), table(group, PAD_QUERY),
            table(kgroup, NO_KEY), tuple(others))


def _mods(tables: dict, before: int, after: int, causal: bool, window: int | None,
          self_penalty: bool, key_scale: Tensor | None = None):
    """mask_mod and score_mod (None when there is nothing to add) reading the tables (fresh closures).

    Two table reads per score decide bucket and chunk (``group`` numbers, see ``bucket_slots``); causality is
    kv_idx <= q_idx, since inside a bucket the sorted order is the position order; positions are read only
    for a window. ``key_scale`` (B, H * R, L), float32 or wider: a per-key factor on the score, applied first (shared-QK
    keys: 1 / |k|, see ``_UnitKeys``)."""
    pos, group, kgroup, others = (tables[n] for n in ("pos", "group", "kgroup", "others"))

    def mask_mod(b, h, q_idx, kv_idx):
        dc = group[b, h, q_idx] - kgroup[b, h, kv_idx]
        ok = (dc <= before) & (dc >= -after)
        if causal:
            ok = ok & (kv_idx <= q_idx)
        if window is not None:
            pq, pk = pos[b, h, q_idx], pos[b, h, kv_idx]
            ok = ok & ((pq - pk < window) if causal else ((pq - pk).abs() < window))
        return ok | (q_idx == kv_idx)

    if not self_penalty and not others and key_scale is None:
        return mask_mod, None

    def score_mod(score, b, h, q_idx, kv_idx):
        if key_scale is not None:
            score = score * key_scale[b, h, kv_idx]
        if self_penalty:
            score = torch.where(q_idx == kv_idx, score - SELF_PENALTY, score)
        if len(others) == 1:
            score = torch.where(others[0][b, h, q_idx] == others[0][b, h, kv_idx], score - math.log(2.0), score)
        elif others:
            shared = sum((o[b, h, q_idx] == o[b, h, kv_idx]).to(score.dtype) for o in others)
            score = score - torch.log1p(shared)
        return score

    return mask_mod, score_mod


def _rows(x: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
    """x (B, H, T, dh) as rows of a 2-D (N, dh) view of its storage and the row strides (sb, sh, st), so that
    x[b, h, t] = rows[b sb + h sh + t st]: no copy for the (B, H, T, dh) and split_heads (B, T, H, dh) orders,
    nor for head slices or ``chunk`` views of a wider projection (any element strides that are multiples of
    dh with unit stride inside a row); other layouts are copied first."""
    dh = x.shape[-1]
    if x.stride(-1) != 1 or any(n > 1 and s % dh for n, s in zip(x.shape[:3], x.stride()[:3])):
        x = x.contiguous()
    strides = tuple(s // dh if n > 1 else 0 for n, s in zip(x.shape[:3], x.stride()[:3]))
    n = 1 + sum((size - 1) * s for size, s in zip(x.shape[:3], strides))
    return x.as_strided((n, dh), (dh, 1)), strides


def _row_index(strides: tuple[int, int, int], t_index: Tensor) -> Tensor:
    """Row (in ``_rows``' view) of x[b, h, t_index[b, h, ...]] for an index tensor (B, H, ...)."""
    b, h = t_index.shape[:2]
    extra = (1,) * (t_index.dim() - 2)
    bi = torch.arange(b, device=t_index.device).view(b, 1, *extra)
    hi = torch.arange(h, device=t_index.device).view(1, h, *extra)
    return bi * strides[0] + hi * strides[1] + t_index.long() * strides[2]


def _select_rows(rows: Tensor, index: Tensor) -> Tensor:
    """rows.index_select(0, index) (rows: (N, dh)) moving whole rows as 8-byte words where the row size
    allows (4x fewer elements for bf16 than element-wise indexing; the bits are copied unchanged)."""
    wide = rows
    if rows.shape[-1] * rows.element_size() % 8 == 0 and rows.element_size() < 8:
        try:
            wide = rows.view(torch.int64)
        except RuntimeError:      # storage offset not 8-byte aligned
            wide = rows
    out = wide.index_select(0, index.reshape(-1))
    return out.view(rows.dtype) if wide is not rows else out


def _grad_like(x_shape, split: bool, rows: Tensor) -> Tensor:
    """(B, H, T, dh) gradient from rows laid out (B, T, H, dh) (``split``) or (B, H, T, dh)."""
    b, h, t, dh = x_shape
    return rows.view(b, t, h, dh).transpose(1, 2) if split else rows.view(b, h, t, dh)


def _dst(slot: Tensor, length: int) -> Tensor:
    """Row of each (b, h, r, position) in the flattened (B * H * R * L, dh) sorted rows (aten path)."""
    b, h, r, _ = slot.shape
    return (torch.arange(b * h * r, device=slot.device) * length).view(b, h, r, 1) + slot


def gather_sorted(x: Tensor, rows: Tensor) -> Tensor:
    """y (B, H * R, L, dh), y[b, h r, s] = x[b, h, rows[b, h, r, s]] (no autograd): the bucket-sorted copy of x
    (B, H, T, dh) in any storage order ``_rows`` reads. On CUDA one Triton kernel (``row_gather``), else aten."""
    b, h, r, length = rows.shape
    if row_gather.available(x):
        return row_gather.gather_slots(x, rows)
    src, strides = _rows(x)
    return _select_rows(src, _row_index(strides, rows)).view(b, h * r, length, x.shape[-1])


def sum_sorted(g: Tensor, slot: Tensor, shape, split: bool, out: Tensor | None = None) -> Tensor:
    """The backward of ``gather_sorted`` (no autograd): dx[b, h, t] = sum_r g[b, h r, slot[b, h, r, t]], (B, H, T,
    dh) in (B, T, H, dh) storage when ``split`` else (B, H, T, dh); written into ``out`` (a (B, H, T, dh) view with
    a unit last stride) when given. The inverse permutation per round, summed: no index_add."""
    if row_gather.available(g):
        return row_gather.sum_rounds(g, slot, split, out=out)
    r, length = slot.shape[2], g.shape[2]
    dst = _dst(slot, length)
    g = g.contiguous().view(-1, shape[-1])
    order = dst.permute(2, 0, 3, 1) if split else dst.permute(2, 0, 1, 3)     # (R, B, T, H) or (R, B, H, T)
    acc = _select_rows(g, order[0])
    for k in range(1, r):
        acc += _select_rows(g, order[k])
    dx = _grad_like(shape, split, acc)
    return dx if out is None else out.copy_(dx)


def _is_split(x: Tensor) -> bool:
    """Whether x (B, H, T, dh) lies in (B, T, H, dh) storage (split_heads' views)."""
    return x.stride(2) > x.stride(1)


class _Gather(torch.autograd.Function):
    """Bucket-sorted copies of q, k, v: y[b, h r, s] = x[b, h, rows[b, h, r, s]], (B, H * R, L, dh) each.

    The gather is R copies of a permutation (plus the L - T padding slots, which read position 0 and get zero
    gradient from the kernel: their queries see only themselves and their keys only their own query). So the
    backward is a gather too, with the inverse permutation ``slot`` (the slot of each (b, h, r, t)), summed
    over rounds: no index_add (atomics) and nothing saved but the two int32 index tables. On CUDA one Triton
    kernel per tensor and direction (``row_gather``), else aten index_select.
    """

    @staticmethod
    def forward(ctx, rows: Tensor, slot: Tensor, *xs: Tensor):
        ctx.save_for_backward(rows, slot)
        ctx.meta = [(x.shape, _is_split(x)) for x in xs]
        return tuple(gather_sorted(x, rows) for x in xs)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        rows, slot = ctx.saved_tensors
        out = [None, None]
        for g, (shape, split) in zip(grads, ctx.meta):
            want = g is not None and ctx.needs_input_grad[len(out)]
            out.append(sum_sorted(g, slot, shape, split) if want else None)
        return tuple(out)


NORM_EPS = 1e-12
"""``F.normalize``'s floor of |k| for the shared-QK keys"""


class _UnitKeys(torch.autograd.Function):
    """Shared-QK keys k = x / |x| (Reformer) without a normalized copy: the kernel gets x itself as its keys (a
    view, so it saves one tensor for queries and keys) and 1 / |x| as a per-key score factor (``key_scale`` of
    ``_mods``): q . k = (q . x) / |x|. The kernel's key gradient is then taken w.r.t. x with the factor inside,
    d/dx_j of (q_i . x_j) s_j = s_j q_i, i.e. s_j dL/dk_j; the normalization's Jacobian (I - k k^T) / |x| turns it
    into the true gradient: dx = g - x s^2 (x . g). Backward works ``ROWS`` rows at a time (bounded temporaries)."""

    ROWS = 1 << 18

    @staticmethod
    def forward(ctx, x: Tensor, inv: Tensor):
        ctx.save_for_backward(x, inv)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: Tensor):
        x, inv = ctx.saved_tensors
        dh = x.shape[-1]
        xs, gs, s2 = x.reshape(-1, dh), g.reshape(-1, dh), inv.reshape(-1).square()
        out = torch.empty_like(gs)
        for a in range(0, xs.shape[0], _UnitKeys.ROWS):
            e = a + _UnitKeys.ROWS
            coef = (xs[a:e] * gs[a:e]).sum(-1, dtype=s2.dtype) * s2[a:e]
            torch.addcmul(gs[a:e], xs[a:e], coef.neg_().to(gs.dtype)[:, None], out=out[a:e])
        return out.view_as(g), None


def unit_key_scale(x: Tensor) -> Tensor:
    """1 / max(|x|, eps) over the last dim in at least float32, no graph (``_UnitKeys``)."""
    with torch.no_grad():
        acc = torch.promote_types(x.dtype, torch.float32)
        return torch.linalg.vector_norm(x, dim=-1, dtype=acc).clamp_(min=NORM_EPS).reciprocal_()


class _Ungather(torch.autograd.Function):
    """The kernel's (B, H * R, L, dh) output back in position order, rounds combined by their log-normalizers:
    o[b, h, t] = sum_r w_r out[b, h r, slot_r] with w = softmax_r(lse[b, h r, slot_r]) (``combine_rounds``;
    with one round o is the gathered row). Returned in (B, T, H, dh) storage, which ``merge_heads`` reshapes
    without a copy; accumulated in float32 for half inputs.

    Backward (dO): in slot order, dout[b, h r, s] = w_r dO[b, h, rows_s] and dlse_r = w_r (<dO, o_r> - <dO, o>)
    with <dO, o> = sum_r w_r <dO, o_r>: gathers of dO and of per-row scalars, no index_add. Saves the kernel
    output (which the kernel keeps for its own backward anyway), w (float32, B H R T) and the index tables; the
    padding slots get zero gradient. On CUDA one Triton kernel each way (``row_gather``), else aten.
    """

    @staticmethod
    def forward(ctx, out: Tensor, lse: Tensor | None, rows: Tensor, slot: Tensor):
        b, h, r, t = slot.shape
        dh, length = out.shape[-1], out.shape[2]
        if row_gather.available(out):
            o, w = row_gather.combine_rounds(out, lse, slot)
            ctx.save_for_backward(rows, slot, *(() if lse is None else (out, w)))
            return o
        flat = out.reshape(-1, dh)
        dst = _dst(slot, length)
        order = dst.permute(0, 3, 1, 2)                                       # (B, T, H, R)
        if lse is None:
            ctx.save_for_backward(rows, slot)
            return _select_rows(flat, order).view(b, t, h, dh).transpose(1, 2)
        acc_dtype = torch.promote_types(out.dtype, torch.float32)
        w = torch.softmax(lse.reshape(-1).index_select(0, dst.reshape(-1)).view(b, h, r, t).to(acc_dtype), dim=2)
        wt = w.permute(0, 3, 1, 2)[..., None].to(acc_dtype)                   # (B, T, H, R, 1)
        o = None
        for k in range(r):
            term = _select_rows(flat, order[..., k]).view(b, t, h, dh) * wt[..., k, :]
            o = term if o is None else o.add_(term)
        ctx.save_for_backward(rows, slot, out, w)
        return o.to(out.dtype).transpose(1, 2)

    @staticmethod
    def backward(ctx, grad: Tensor):
        rows, slot = ctx.saved_tensors[:2]
        b, h, r, length = rows.shape
        t, dh = slot.shape[-1], grad.shape[-1]
        if row_gather.available(grad):
            dout, dlse = row_gather.combine_rounds_backward(grad, slot, length, *ctx.saved_tensors[2:])
            return dout, dlse, None, None
        src, strides = _rows(grad)
        index = _row_index(strides, rows)                                    # (B, H, R, L)
        if len(ctx.saved_tensors) == 2:
            dout = _select_rows(src, index).view(b, h, length, dh)
            dout[:, :, t:] = 0
            return dout, None, None, None
        out, w = ctx.saved_tensors[2:]
        wg = torch.take_along_dim(w, rows.long(), dim=-1)                   # (B, H, R, L): w of each slot
        wg[..., t:] = 0
        dout = torch.empty(b, h, r, length, dh, dtype=out.dtype, device=out.device)
        dots = torch.empty(b, h, r, length, dtype=w.dtype, device=out.device)
        outr = out.view(b, h, r, length, dh)
        for k in range(r):
            dog = _select_rows(src, index[:, :, k]).view(b, h, length, dh)
            dots[:, :, k] = (dog * outr[:, :, k]).sum(-1, dtype=w.dtype)
            torch.mul(dog, wg[:, :, k, :, None].to(dog.dtype), out=dout[:, :, k])
        dots_u = dots.view(-1).index_select(0, _dst(slot, length).reshape(-1)).view(b, h, r, t)   # <dO, o_r>
        dlse = w * (dots_u - (w * dots_u).sum(2, keepdim=True))
        dlse_g = torch.take_along_dim(dlse, rows.long(), dim=-1)
        dlse_g[..., t:] = 0
        return dout.view(b, h * r, length, dh), dlse_g.view(b, h * r, length), None, None


GROUP_ROWS = 1 << 18
"""Sorted rows (heads x rounds x L) per kernel call that ``auto_head_groups`` aims for: at T = 64k (8 heads, two
rounds) 4 groups: 9.6 ms, 594 MiB in a CUDA graph and 12-15 ms eagerly, vs 8 groups' 9.9 ms, 472 MiB and 29-31 ms
eagerly (each group's calls cost host time; H100, session 13)"""


def auto_head_groups(n_heads: int, n_rounds: int, length: int) -> int:
    """Head groups for ``flex_bucket_attention``'s ``head_groups=0``: one (a single kernel call, no recomputation)
    up to 2 ``GROUP_ROWS`` sorted rows in all (T = 16k with 8 heads and two rounds), else about ``GROUP_ROWS`` per
    group, at most one head per group (4 groups at T = 64k)."""
    rows = n_heads * n_rounds * length
    return 1 if rows <= 2 * GROUP_ROWS else min(n_heads, -(-rows // GROUP_ROWS))


def flex_bucket_attention(q: Tensor, k: Tensor | None, v: Tensor, buckets: Tensor, n_buckets: int,
                          chunk_size: int, scale: float, *, causal: bool, before: int = 1, after: int = 0,
                          self_penalty: bool = False, key_valid: Tensor | None = None, window: int | None = None,
                          dedup: bool = False, compile: bool | None = None, head_groups: int = 1) -> Tensor:
    """``bucket_softmax_attention`` (same arguments and allowed sets) as one FlexAttention call (per head group).

    q, k, v: (B, H, T, dh), any of the storage orders ``_rows`` reads without a copy; ``k=None``: shared-QK
    keys, k = q / |q| (Reformer): the gathered q serves as the keys too, 1 / |q| applied to the scores
    (``_UnitKeys``: one gather and one saved tensor fewer). buckets (B, H, R, T) long in
    [0, n_buckets). Returns (B, H, T, dh) in (B, T, H, dh) storage, the rounds combined. With one bucket and
    one round (T a multiple of ``BLOCK``) the sorted order is the identity and q, k, v go to the kernel as they
    are. ``compile``: run the compiled kernel (default: on CUDA); uncompiled it is the dense eager
    implementation (forward only on CPU, small sizes). Time and memory O(R * T * (before + 1 + after) * C).
    The gathers into and out of the sorted order are permutations (``_Gather``, ``_Ungather``): their
    backward passes are gathers with the inverse permutation, no index_add.

    ``head_groups`` (0: ``auto_head_groups``): with G > 1 and gradients wanted, the heads run in G groups, one
    kernel call each, recomputed group by group in backward (``_HeadGroups``): the sorted copies, outputs and
    their gradients then exist for one group at a time, not kept from forward to backward; same results, one
    more forward kernel call per group.
    """
    call = _BucketCall(q, k, buckets, n_buckets, chunk_size, scale, causal, before, after, self_penalty, key_valid,
                       window, dedup, compile)
    h, r = q.shape[1], buckets.shape[2]
    groups = auto_head_groups(h, r, call.length) if head_groups == 0 else min(max(1, head_groups), h)
    wants_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (q, k, v))
    if groups > 1 and wants_grad and not call.identity:
        size = -(-h // groups)
        return _HeadGroups.apply(call, [slice(a, min(a + size, h)) for a in range(0, h, size)], q, k, v)
    if call.identity:       # sorted order = positions (routing's local heads)
        out, _ = call.kernel([q, torch.nn.functional.normalize(q, dim=-1) if k is None else k, v], call.tables())
        return out
    tables = call.tables()
    rows, slot = tables["rows"], tables["slot"]
    gathered = list(_Gather.apply(rows, slot, *(x for x in (q, k, v) if x is not None)))
    if k is None:
        gathered.insert(1, None)
    return _Ungather.apply(*call.kernel(gathered, tables), rows, slot)


class _BucketCall:
    """The settings of one ``flex_bucket_attention`` call: slot tables (all heads, and views of a head slice of
    them) and the kernel call on sorted copies."""

    def __init__(self, q, k, buckets, n_buckets, chunk_size, scale, causal, before, after, self_penalty, key_valid,
                 window, dedup, compile):
        if compile is None:
            compile = q.device.type == "cuda"
        if compile:
            self.flex, _ = _flex()
        else:
            from torch.nn.attention.flex_attention import flex_attention
            self.flex = flex_attention
        t = q.shape[2]
        self.buckets, self.chunk_size, self.scale, self.causal = buckets, chunk_size, scale, causal
        self.before, self.after, self.self_penalty, self.key_valid = before, after, self_penalty, key_valid
        self.window, self.dedup = window, dedup
        self.length = -(-t // BLOCK) * BLOCK
        self.identity = n_buckets == 1 and buckets.shape[2] == 1 and self.length == t

    def tables(self) -> dict:
        """``bucket_slots`` of all heads."""
        return bucket_slots(self.buckets, self.chunk_size, self.key_valid, self.dedup,
                            reach=max(self.before, self.after))

    @staticmethod
    def head_tables(tables: dict, heads: slice) -> dict:
        """The slot tables of the heads ``heads`` (views of ``tables``): rows / slot (B, H', R, ...), the folded
        per-slot tables (B, H' R, L) (head h's rounds are rows h R .. h R + R - 1 of the fold)."""
        r = tables["rows"].shape[2]
        fold = slice(heads.start * r, heads.stop * r)
        return {"rows": tables["rows"][:, heads], "slot": tables["slot"][:, heads], "length": tables["length"],
                **{n: tables[n][:, fold] for n in ("pos", "group", "kgroup")},
                "others": [x[:, fold] for x in tables["others"]]}

    def kernel(self, qkv: list, tables: dict) -> tuple[Tensor, Tensor | None]:
        """(out, lse) of the kernel on sorted (B, H' R, L, dh) q, k, v (lse None with one round); k None: the
        shared-QK keys from q (``_UnitKeys``)."""
        q, k, v = qkv
        key_scale = None
        if k is None:
            key_scale = unit_key_scale(q)
            k = _UnitKeys.apply(q, key_scale)
        mask_mod, score_mod = _mods(tables, self.before, self.after, self.causal, self.window, self.self_penalty,
                                    key_scale)
        band = band_block_mask(tables["length"], self.chunk_size, self.before, self.after, self.causal, self.window,
                               q.device)
        kw = {"score_mod": score_mod, "block_mask": with_mask_mod(band, mask_mod), "scale": self.scale}
        if self.buckets.shape[2] == 1:
            return self.flex(q, k, v, **kw), None
        return flex_with_lse(self.flex, q, k, v, **kw)


class _HeadGroups(torch.autograd.Function):
    """``flex_bucket_attention`` by head groups, recomputed group by group in backward (activation checkpointing
    of the sorted attention, Chen et al. 2016, per group of heads).

    Forward, per group of heads: the sorted copies of the group's q, (k,) v, the kernel call and the combination
    of rounds (``_Ungather``) run without autograd, written into the group's heads of the result; kept for
    backward: q, k, v themselves and the int32 slot tables (sorted once for all heads, sliced per group).
    Backward, per group: the sorted copies are made again as leaves of a graph of their own, the kernel and the
    combination run again under ``enable_grad``, ``torch.autograd.grad`` takes that graph to the sorted copies, and
    their rows are summed back into position order straight into the group's heads of the input gradients
    (``sum_sorted``). So the sorted copies, kernel
    outputs and their gradients (R (B, H, T, dh)-sized blocks each for q, v, the output, dout and the kernel's
    dq, dk, dv: with one graph for all heads all of them are alive at the kernel backward's peak, 12 such blocks
    with two rounds) exist for one group at a time, for the price of a second forward kernel call. Nothing is
    freed in backward, so a second backward (``retain_graph=True``) works.
    """

    @staticmethod
    def forward(ctx, call: _BucketCall, groups: list, q: Tensor, k: Tensor | None, v: Tensor):
        b, h, t, dh = q.shape
        o = torch.empty(b, t, h, dh, dtype=v.dtype, device=v.device).transpose(1, 2)
        ctx.call, ctx.groups = call, []
        every = call.tables()           # one sort for all heads (a call per group costs host time, eagerly)
        for heads in groups:
            tables = call.head_tables(every, heads)
            sorted_ = [None if x is None else gather_sorted(x[:, heads], tables["rows"]) for x in (q, k, v)]
            o[:, heads] = _Ungather.apply(*call.kernel(sorted_, tables), tables["rows"], tables["slot"])
            ctx.groups.append((heads, tables))
        ctx.save_for_backward(q, k, v)
        return o

    @staticmethod
    def backward(ctx, grad: Tensor):
        inputs = ctx.saved_tensors
        grads = [torch.empty_like(x) if x is not None and want else None       # x's strides (split_heads' too)
                 for x, want in zip(inputs, ctx.needs_input_grad[2:])]
        for heads, tables in reversed(ctx.groups):
            rows, slot = tables["rows"], tables["slot"]
            sorted_ = [None if x is None else gather_sorted(x[:, heads], rows).requires_grad_(dst is not None)
                       for x, dst in zip(inputs, grads)]
            leaves = [x for x in sorted_ if x is not None and x.requires_grad]
            with torch.enable_grad():
                og = _Ungather.apply(*ctx.call.kernel(sorted_, tables), rows, slot)
            got = iter(torch.autograd.grad(og, leaves, grad[:, heads]))
            del og, leaves
            for dst in grads:
                if dst is not None:
                    part = dst[:, heads]
                    sum_sorted(next(got), slot, part.shape, _is_split(part), out=part)
            del sorted_, got
        return (None, None, *grads)

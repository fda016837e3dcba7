"""Sort-and-chunk attention, shared by the content-based sparse variants (LSH, routing).

Every position carries a bucket id (a hash for Reformer, a cluster for the Routing
Transformer, a constant for local attention). The sequence is sorted by (bucket, position),
each bucket's run is cut into chunks of ``chunk_size``, and each chunk of queries attends
densely to its own chunk and the ``before`` preceding / ``after`` following chunks, restricted
to keys of the same bucket (Kitaev et al. 2020, sec. 2: the chunked P~_i with the bucket mask
m(j, P_i)). Scores exist only for (chunk, window) pairs: O(T * chunk * window) time and
memory, never O(T^2).

One deliberate difference from the paper: chunks are cut per bucket (each bucket's run starts
on a chunk boundary, padded; at most n_buckets extra chunks) instead of over the concatenated
sorted sequence. The paper's boundaries depend on how many tokens, future ones included, fall
in lower buckets, so a future token can change which past keys a query sees; per-bucket chunks
depend only on the tokens of the query's own bucket, which makes the causal form exactly causal.

Queries and keys share one sort order (shared-QK hashing / clustering), so a query always
finds its own key in its own chunk and no row is empty. ``bucket_attention`` is the fast path;
``naive_bucket_attention`` builds the same allowed sets with explicit Python loops over rounds,
buckets and positions and a dense T x T mask, for the tests.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor

# Large enough that exp(-SELF_PENALTY + any realistic score) is 0 in float32, small enough that
# s - SELF_PENALTY keeps float32 precision: with 1e5 the rows whose only key is their own (the first
# causal token) lost ~1% of dV in the recomputed backward on CUDA (float32 ulp at 1e5 is 0.008).
SELF_PENALTY = 1e3
"""Reformer sec. 2 (shared-QK): the score of a query with its own key is lowered by SELF_PENALTY (10^3), so a
token attends to itself only when no other key is available."""


def bucket_layout(buckets: Tensor, n_buckets: int, chunk_size: int) -> tuple[Tensor, Tensor, int]:
    """Slots of the bucket-sorted sequence where every bucket's run starts on a chunk boundary.

    buckets: (..., T) long in [0, n_buckets). Tokens are stably sorted by (bucket, position);
    bucket u's run is padded to a multiple of ``chunk_size``. Returns ``src`` (..., L): the
    position held by each slot (T for an empty slot), ``slot`` (..., T): the slot of each
    position, and L = (ceil(T / C) + n_buckets) * C, a static bound on the padded length.
    """
    t = buckets.shape[-1]
    c = chunk_size
    length = (-(-t // c) + n_buckets) * c
    pos = torch.arange(t, device=buckets.device).expand_as(buckets)
    perm = (buckets * t + pos).argsort(dim=-1)                                     # sorted -> position
    counts = torch.zeros(*buckets.shape[:-1], n_buckets, dtype=torch.long, device=buckets.device)
    counts.scatter_add_(-1, buckets, torch.ones_like(buckets))
    start = counts.cumsum(-1) - counts                                             # first sorted index
    padded_start = ((counts + c - 1) // c * c).cumsum(-1) - (counts + c - 1) // c * c
    sorted_bucket = torch.take_along_dim(buckets, perm, dim=-1)
    rank = torch.arange(t, device=buckets.device) - torch.take_along_dim(start, sorted_bucket, dim=-1)
    sorted_slot = torch.take_along_dim(padded_start, sorted_bucket, dim=-1) + rank
    slot = torch.empty_like(perm).scatter_(-1, perm, sorted_slot)
    src = torch.full((*buckets.shape[:-1], length), t, dtype=torch.long, device=buckets.device)
    src.scatter_(-1, sorted_slot, perm)
    return src, slot, length


_CHUNK_DIM = 3
"""chunk axis of the (B, H, R, n, C, ...) layout used below"""


def _pad_spec(ndim: int, dim: int, before: int, after: int) -> list[int]:
    """F.pad spec that pads dimension ``dim`` of an ``ndim``-d tensor by (before, after)."""
    return [0, 0] * (ndim - 1 - dim) + [before, after]


def _windows(x: Tensor, before: int, after: int, fill) -> Tensor:
    """x: (B, H, R, n, C, *rest) chunks -> (B, H, R, n, (before + 1 + after) * C, *rest).

    Chunk i's window is chunks i - before .. i + after concatenated; missing chunks are ``fill``.
    """
    n = x.shape[_CHUNK_DIM]
    padded = F.pad(x, _pad_spec(x.dim(), _CHUNK_DIM, before, after), value=fill)
    parts = [padded.narrow(_CHUNK_DIM, before + o, n) for o in range(-before, after + 1)]
    return torch.cat(parts, dim=_CHUNK_DIM + 1)


def bucket_attention(q: Tensor, k: Tensor, v: Tensor, buckets: Tensor, n_buckets: int, chunk_size: int,
                     scale: float, *,
                     causal: bool, before: int = 1, after: int = 0, self_penalty: bool = False,
                     key_valid: Optional[Tensor] = None, window: Optional[int] = None,
                     round_buckets: Optional[Tensor] = None, dropout: float = 0.0,
                     training: bool = False, max_scores: int = 2 ** 24) -> tuple[Tensor, Tensor]:
    """Attention inside chunks of the bucket-sorted sequence.

    q, k, v: (B, H, T, dh). buckets: (B, H, R, T) long in [0, n_buckets), one sort per round r.
    Query i may attend to key j when: same bucket in round r; with c(i) = (number of earlier
    positions in i's bucket) // chunk_size, c(i) - before <= c(j) <= c(i) + after; j <= i when causal;
    |i - j| < window when ``window`` is set (i - j < window when causal); key j is valid (its
    own key is always allowed). ``self_penalty``: the own key's score is lowered by SELF_PENALTY (10^3).
    ``round_buckets`` (B, H, R, T): the buckets of all rounds; when given, the score of (i, j)
    is lowered by log N_ij, N_ij = number of rounds in which i and j share a bucket (Reformer's
    multi-round de-duplication), so combining rounds by their logsumexp counts each key once.

    ``max_scores``: when the (chunk x window) scores of the whole batch exceed this many elements,
    groups of chunks are processed one after another, each under activation checkpointing when
    gradients are needed, so peak memory stays O(T * (dh + R)) plus one group's scores.

    Returns (out (B, H, R, T, dh), lse (B, H, R, T)) in the original order, lse being the
    per-round log normalizer used to combine rounds (float32, or float64 for float64 inputs).
    """
    b, h, t, dh = q.shape
    r = buckets.shape[2]
    c = chunk_size
    src, slot, length = bucket_layout(buckets, n_buckets, c)                      # (B, H, R, L), (B, H, R, T)
    n = length // c

    def gather(x: Tensor, fill) -> Tensor:            # (B, H|1, R|1, T, *rest) -> (B, H, R, n, C, *rest)
        x = F.pad(x, _pad_spec(x.dim(), 3, 0, 1), value=fill)                     # slot value T -> fill
        index = src.reshape(*src.shape, *([1] * (x.dim() - 4)))
        out = torch.take_along_dim(x, index, dim=3)
        return out.reshape(b, h, r, n, c, *out.shape[4:])

    qs, ks, vs = (gather(x[:, :, None], 0.0) for x in (q, k, v))
    pos = gather(torch.arange(t, device=q.device).expand(b, h, 1, t), -1)          # -1 = empty slot
    bkt = gather(buckets, -1)
    valid = torch.ones(b, 1, 1, t, dtype=torch.bool, device=q.device) if key_valid is None \
        else key_valid[:, None, None, :].to(torch.bool)
    kvalid = gather(valid, False)

    kwin, vwin = _windows(ks, before, after, 0.0), _windows(vs, before, after, 0.0)
    kpos, kbkt = _windows(pos, before, after, -1), _windows(bkt, before, after, -1)
    kval = _windows(kvalid, before, after, False)

    qa = ka = None
    if round_buckets is not None and round_buckets.shape[2] > 1:
        qa = gather(round_buckets.permute(0, 1, 3, 2)[:, :, None], -1)   # (B, H, R, n, C, R): all rounds' buckets
        ka = _windows(qa, before, after, -2)

    def core(qs, kwin, vwin, pos, kpos, bkt, kbkt, kval, qa, ka):
        return _chunk_scores_attention(qs, kwin, vwin, pos, kpos, bkt, kbkt, kval, qa, ka, scale=scale,
                                       causal=causal, window=window, self_penalty=self_penalty,
                                       dropout=dropout, training=training)

    inputs = (qs, kwin, vwin, pos, kpos, bkt, kbkt, kval, qa, ka)
    w = kwin.shape[4]
    groups = min(n, -(-(b * h * r * n * c * w) // max_scores))
    if groups <= 1:
        out, lse = core(*inputs)
    else:   # bound the score memory: chunk groups one at a time, recomputed in backward
        size = -(-n // groups)
        parts = zip(*[x.split(size, dim=_CHUNK_DIM) if x is not None else [None] * (-(-n // size))
                      for x in inputs])
        grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
        results = [torch.utils.checkpoint.checkpoint(core, *part, use_reentrant=False) if grad else core(*part)
                   for part in parts]
        out, lse = torch.cat([o for o, _ in results], _CHUNK_DIM), torch.cat([s for _, s in results], _CHUNK_DIM)
    out, lse = out.reshape(b, h, r, length, dh), lse.reshape(b, h, r, length)
    return torch.take_along_dim(out, slot[..., None], dim=3), torch.take_along_dim(lse, slot, dim=3)


def _chunk_scores_attention(qs, kwin, vwin, pos, kpos, bkt, kbkt, kval, qa, ka, *, scale, causal, window,
                            self_penalty, dropout, training):
    """Masked softmax attention of each chunk to its window (all tensors chunked, chunk axis 3)."""
    acc = torch.promote_types(qs.dtype, torch.float32)
    scores = torch.einsum("bhrncd,bhrnwd->bhrncw", qs, kwin).to(acc) * scale
    qp, kp = pos[..., :, None], kpos[..., None, :]
    own = (qp == kp)
    allowed = (bkt[..., :, None] == kbkt[..., None, :]) & kval[..., None, :]
    if causal:
        allowed &= kp <= qp
    if window is not None:
        dist = qp - kp
        allowed &= (dist < window) if causal else (dist.abs() < window)
    allowed = (allowed & (kp >= 0)) | own                                 # own key always allowed
    if self_penalty:
        scores = scores - own.to(acc) * SELF_PENALTY
    if qa is not None:
        count = (qa[..., :, None, :] == ka[..., None, :, :]).sum(-1)      # N_ij: rounds sharing a bucket
        scores = scores - torch.log(count.clamp(min=1).to(acc))
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None])
    if dropout > 0 and training:
        probs = F.dropout(probs, dropout)
    out = torch.einsum("bhrncw,bhrnwd->bhrncd", probs.to(vwin.dtype), vwin)
    return out, lse


def combine_rounds(out: Tensor, lse: Tensor) -> Tensor:
    """Reformer's multi-round combination: o_i = sum_r exp(lse_r - logsumexp_r lse_r) o_i^(r).

    out: (B, H, R, T, dh), lse: (B, H, R, T) -> (B, H, T, dh).
    """
    w = torch.softmax(lse, dim=2).to(out.dtype)
    return (w[..., None] * out).sum(2)


def naive_bucket_attention(q: Tensor, k: Tensor, v: Tensor, buckets: Tensor, n_buckets: int, chunk_size: int,
                           scale: float, *, causal: bool, before: int = 1, after: int = 0,
                           self_penalty: bool = False, key_valid: Optional[Tensor] = None,
                           window: Optional[int] = None, round_buckets: Optional[Tensor] = None,
                           dropout: float = 0.0, training: bool = False) -> tuple[Tensor, Tensor]:
    """Reference for ``bucket_attention`` (same arguments): explicit loops over (b, h, round), buckets
    and positions build a dense (T, T) mask; scores are dense. No dropout.

    Returns (out (B, H, R, T, dh), lse (B, H, R, T)) like the fast path.
    """
    if dropout > 0 and training:
        raise ValueError("naive_bucket_attention is deterministic; call it with dropout=0 or training=False")
    if int(buckets.max()) >= n_buckets:
        raise ValueError(f"bucket {int(buckets.max())} out of range for n_buckets={n_buckets}")
    dedup = round_buckets is not None
    b, h, t, _ = q.shape
    r = buckets.shape[2]
    bk = buckets.tolist()
    kv = None if key_valid is None else key_valid.tolist()
    allowed = torch.zeros(b, h, r, t, t, dtype=torch.bool)
    penalty = torch.zeros(b, h, r, t, t, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            for ri in range(r):
                row = bk[bi][hi][ri]
                chunk_of = [0] * t
                for bucket in sorted(set(row)):
                    members = [p for p in range(t) if row[p] == bucket]      # in position order
                    for rank, p in enumerate(members):
                        chunk_of[p] = rank // chunk_size
                    for i in members:
                        for j in members:
                            ok = -after <= chunk_of[i] - chunk_of[j] <= before
                            ok = ok and (not causal or j <= i)
                            if window is not None:
                                ok = ok and ((i - j < window) if causal else (abs(i - j) < window))
                            ok = ok and (kv is None or kv[bi][j])
                            if ok or i == j:
                                allowed[bi, hi, ri, i, j] = True
                                n_shared = sum(bk[bi][hi][rr][i] == bk[bi][hi][rr][j] for rr in range(r))
                                penalty[bi, hi, ri, i, j] = (SELF_PENALTY if (self_penalty and i == j) else 0.0) \
                                    + (math.log(n_shared) if dedup else 0.0)
    acc = torch.promote_types(q.dtype, torch.float32)
    scores = torch.einsum("bhid,bhjd->bhij", q, k).to(acc)[:, :, None] * scale - penalty.to(acc)
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("bhrij,bhjd->bhrid", torch.softmax(scores, dim=-1).to(v.dtype), v)
    return out, lse

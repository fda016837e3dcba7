"""Reformer LSH attention (Kitaev et al. 2020, "Reformer: The Efficient Transformer")."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rlformer.attention import bucket_fused, lsh_hashing
from rlformer.attention.base import Attention, split_heads
from rlformer.attention.chunked import bucket_attention, combine_rounds, naive_bucket_attention
from rlformer.attention.chunked_softmax import bucket_softmax_attention
from rlformer.attention.flex_bucket import flex_bucket_attention, use_flex_bucket
from rlformer.attention.projection import Projection
from rlformer.config import EncoderConfig
from rlformer.registry import register


def layer_generator(seed: int, layer: int, salt: int) -> torch.Generator:
    """A CPU generator for a layer's fixed random draws (hash rotations, centroids, features)."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(layer) * 7919 + salt)


class Float32Buffers(nn.Module):
    """Keeps the buffers named in ``float32_buffers`` in float32 when the module is cast to half
    precision (``.half()``, ``.to(torch.bfloat16)``): EMA centroids would stop moving in bf16
    (0.999 * x rounds to x) and hash rotations / random features would lose accuracy."""

    float32_buffers: tuple = ()

    def _apply(self, fn, recurse=True):
        saved = {name: getattr(self, name) for name in self.float32_buffers}
        out = super()._apply(fn, recurse)
        for name, old in saved.items():
            new = getattr(self, name)
            if new.dtype in (torch.float16, torch.bfloat16):
                setattr(self, name, old.to(device=new.device, dtype=torch.float32))
        return out


@torch.no_grad()
def lsh_buckets(x: Tensor, rotations: Tensor, max_elements: Optional[int] = None) -> Tensor:
    """Angular LSH (Reformer sec. 2, after Andoni et al. 2015): h(x) = argmax([xR; -xR]).

    x: (B, H, T, dh); rotations: (H, R, dh, n_buckets / 2) -> buckets (B, H, R, T) in [0, n_buckets).
    One bucket (rotations with 0 columns) sends everything to bucket 0. Invariant to scaling x > 0.
    The rotated values (float32: bucket ties must not depend on half-precision rounding) are formed by one
    batched matmul per block of tokens of at most ``max_elements`` (default: a 16th of them, within
    [2^22, 2^24]); argmax over [xR; -xR] is argmax(xR) when max(xR) >= -min(xR), else n_buckets/2 + argmin(xR)
    (first index on ties, as argmax over the concatenation), from one max and one min reduction with indices.
    On CUDA (float32 / 16-bit x) one Triton kernel keeps xR in registers (``lsh_hashing``) unless ``max_elements``
    is given.
    """
    b, h, t, d = x.shape
    n_rounds, half = rotations.shape[1], rotations.shape[-1]
    if half > 0 and max_elements is None and lsh_hashing.available(x):
        return lsh_hashing.hash_buckets(x, rotations)
    out = torch.zeros(b, h, n_rounds, t, dtype=torch.long, device=x.device)
    if half == 0:
        return out
    acc = torch.promote_types(x.dtype, torch.float32)
    rot = rotations.to(device=x.device, dtype=acc).permute(0, 2, 1, 3).reshape(h, d, n_rounds * half)
    per_token = b * h * n_rounds * half
    if max_elements is None:
        max_elements = min(1 << 24, max(1 << 22, per_token * t // 16))
    step = max(1, max_elements // per_token)
    for s in range(0, t, step):
        xs = x[:, :, s:s + step].to(acc)
        rotated = torch.matmul(xs, rot).view(b, h, xs.shape[2], n_rounds, half)     # (B, H, t, R, n/2)
        hi, arg_hi = rotated.max(-1)
        lo, arg_lo = rotated.min(-1)
        out[..., s:s + step] = torch.where(hi >= -lo, arg_hi, arg_lo + half).transpose(2, 3)
    return out


@register("attention", "lsh")
class LSHAttention(Float32Buffers, Attention):
    """Reformer LSH attention (Kitaev et al. 2020): shared-QK, hashed, sorted, chunked.

    - Shared-QK (sec. 2): keys are the unit-normalized queries, k_j = q_j / |q_j|; the key half
      of the usual projection does not exist (``kv_proj`` projects values only).
    - Hashing (sec. 2): h(x) = argmax([xR; -xR]) with a random (dh, n_buckets/2) matrix R per
      round and head, drawn once per layer from ``cfg.lsh.seed`` and kept as a buffer, so the
      forward pass is deterministic.
    - Attention (eq. 3-4 with the chunked P~_i): sort by (bucket, position), cut into chunks of
      ``chunk_size``; each chunk attends to itself and the previous chunk, only to keys of the
      query's bucket, only to j <= i when causal; the own key's score is lowered by SELF_PENALTY (10^3), so a
      token attends to itself only when nothing else is available. Chunks are cut per bucket
      (see rlformer.attention.chunked) so that the causal form is exactly causal.
    - n_hashes rounds (sec. 2, "Multi-round LSH attention"): o_i = sum_r exp(z(i, P_i^r) -
      z(i, P_i)) o_i^r with the per-round logsumexp z, scores lowered by log N_ij (the number of
      rounds in which i and j share a bucket) so duplicates count once.

    Scores use the usual 1/sqrt(dh) scale. Time O(T * n_hashes * chunk_size). CUDA fast paths: with
    ``lsh.fused=True`` (opt-in; Triton, power-of-two head sizes 16..128) ``bucket_fused.shared_qk_bucket_attention``,
    Triton kernels that read q and v in position order through the slot tables (no sorted copies; backward memory
    six (B, T, D) blocks for any number of rounds). By default ``flex_bucket.flex_bucket_attention``, one compiled
    FlexAttention call over the bucket-sorted order of all rounds (``lsh.max_scores`` unused there), or one per
    group of heads recomputed in backward when the sorted rows are many (``lsh.head_groups``: at T = 64k, 8 heads,
    2 rounds, 803 -> 594 MiB per layer step with the automatic 4 groups). Hashing on CUDA: one Triton kernel
    (``lsh_hashing``). Other devices (and CUDA dtypes /
    head sizes flex does not compile): ``chunked_softmax.bucket_softmax_attention`` (fused attention kernels per
    group of chunks, rounds combined online, probabilities recomputed in backward): activation memory
    O(T * (dh + n_hashes))
    plus one group's scratch (``lsh.max_scores``). With dropout in training it falls back to
    ``chunked.bucket_attention``, which materializes the per-chunk probabilities.
    Positions: "input" and "rotary" (scores are only formed inside chunks). No memory prefix.
    """

    supports_memory = False
    position_hooks = frozenset({"input", "rotary"})
    float32_buffers = ("rotations",)

    def __init__(self, cfg: EncoderConfig, layer: int, position=None):
        super().__init__(cfg, layer, position)
        self.kv_proj = Projection(cfg.d_model, cfg.d_model)         # values only (shared-QK)
        c = cfg.lsh
        gen = layer_generator(c.seed, layer, salt=1)
        half = c.n_buckets // 2 if c.n_buckets > 1 else 0
        self.register_buffer("rotations", torch.randn(cfg.n_heads, c.n_hashes, cfg.d_head, half, generator=gen))

    @classmethod
    def validate(cls, cfg: EncoderConfig) -> None:
        c = cfg.lsh
        if c.n_buckets < 1 or (c.n_buckets > 1 and c.n_buckets % 2):
            raise ValueError(f"lsh.n_buckets={c.n_buckets}: angular LSH argmax([xR; -xR]) makes an even number "
                             f"of buckets; use 1 (no hashing) or an even number such as {max(2, c.n_buckets + 1)}")
        if c.n_hashes < 1:
            raise ValueError(f"lsh.n_hashes={c.n_hashes}: need at least one hash round (Reformer uses 1-8)")
        if c.chunk_size < 1:
            raise ValueError(f"lsh.chunk_size={c.chunk_size}: need a positive chunk length, e.g. 64")
        if c.head_groups < 0:
            raise ValueError(f"lsh.head_groups={c.head_groups}: use 0 (automatic), 1 (all heads in one kernel call) "
                             f"or a number of groups up to n_heads={cfg.n_heads}")

    def project(self, x: Tensor, kv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, the shared-QK keys k = q / |q| and v. On the flex path the kernel makes the keys from q itself and k
        serves only for hashing (no gradient), so it is formed from q.detach(): no graph that would keep q alive
        until backward (16 MiB at T = 16k, D = 512 in bf16)."""
        q = split_heads(self.q_proj(x), self.n_heads)
        hash_only = use_flex_bucket(q, self.dropout, self.training)
        return q, F.normalize(q.detach() if hash_only else q, dim=-1), split_heads(self.kv_proj(kv), self.n_heads)

    def buckets(self, k: Tensor) -> Tensor:
        """(B, H, n_hashes, T) bucket of every key (= its query, shared-QK) in every round."""
        return lsh_buckets(k, self.rotations)

    def attend(self, q, k, v, ctx):
        c = self.cfg.lsh
        buckets = self.buckets(k)
        kw = {"causal": ctx.causal, "self_penalty": True, "key_valid": ctx.key_valid}
        if use_flex_bucket(q, self.dropout, self.training):     # CUDA: one FlexAttention call, or the fused kernels
            if c.fused and bucket_fused.available(q, v):
                # the fused kernels read q and v in place (no sorted copies; bucket_fused), k = q / |q| inside
                return bucket_fused.shared_qk_bucket_attention(q, v, buckets, c.chunk_size, self.scale, **kw,
                                                               dedup=True), {}
            # k = q / |q| (shared-QK, ``project``): only q and v are gathered; the kernel uses the gathered q as
            # its keys with 1 / |q| on the scores (``flex_bucket._UnitKeys``; under rotary, equal up to rounding)
            return flex_bucket_attention(q, None, v, buckets, c.n_buckets, c.chunk_size, self.scale, dedup=True,
                                         head_groups=c.head_groups, **kw), {}
        if self.dropout > 0 and self.training:    # dropout needs the probabilities: the materializing path
            out, lse = bucket_attention(q, k, v, buckets, c.n_buckets, c.chunk_size, self.scale, round_buckets=buckets,
                                        dropout=self.dropout, training=self.training, **kw)
            return combine_rounds(out, lse), {}
        out = bucket_softmax_attention(q, k, v, buckets, c.n_buckets, c.chunk_size, self.scale, dedup=True,
                                       max_scores=c.max_scores, **kw)
        return out, {}

    def reference(self, q: Tensor, k: Tensor, v: Tensor, ctx) -> Tensor:
        """Naive version of ``attend`` (explicit loops over rounds, buckets and positions)."""
        c, buckets = self.cfg.lsh, self.buckets(k)
        out, lse = naive_bucket_attention(q, k, v, buckets, c.n_buckets, c.chunk_size, self.scale,
                                          causal=ctx.causal, self_penalty=True, key_valid=ctx.key_valid,
                                          round_buckets=buckets)
        return combine_rounds(out, lse)

"""Routing Transformer attention (Roy et al. 2021, "Efficient Content-Based Sparse Attention
with Routing Transformers", TACL)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rlformer.attention.base import Attention, linear_rows, merge_heads, split_heads
from rlformer.attention.chunked import bucket_attention, naive_bucket_attention
from rlformer.attention.chunked_softmax import bucket_softmax_attention
from rlformer.attention.flex_bucket import flex_bucket_attention, use_flex_bucket
from rlformer.attention.lsh import Float32Buffers, layer_generator
from rlformer.config import EncoderConfig
from rlformer.registry import register


@register("attention", "routing")
class RoutingAttention(Float32Buffers, Attention):
    """Routing Transformer (Roy et al. 2021): online k-means routing plus local attention.

    Heads are split (``routing.local_heads``; 0 = half): the first ``n_local`` heads use local
    attention (key j visible to query i when i - j < window, causal; |i - j| < window otherwise),
    the others are routed:

    - Routing (sec. 4.1): unit-normalized vectors are assigned to the nearest of n_clusters
      centroids mu shared by queries and keys, c(x) = argmax_c mu_c^T x / |mu_c|; query i
      attends to key j only when c(Q_i) = c(K_j) (and j <= i when causal), eq.
      X'_i = sum_{j: K_j in mu(Q_i), j <= i} A_ij V_j.
    - Routing heads share queries and keys, K = Q / |Q| (as Reformer's shared-QK), so a query and
      its own key land in the same cluster and one sort order serves both; the own key's score is
      lowered by SELF_PENALTY (10^3) (attend to self only when alone). Attention within a cluster is computed by
      sorting by (cluster, position) and chunking (``routing.chunk_size``; each chunk sees itself
      and the previous chunk of its cluster), see rlformer.attention.chunked.
    - Online k-means (sec. 4.1): in training, after assignment, each centroid moves by an
      exponential moving average toward the mean of the vectors assigned to it,
      mu <- lambda mu + (1 - lambda) mean{x : c(x) = mu}, lambda = ``routing.ema_decay``;
      centroids are buffers updated under no_grad, never parameters, kept in float32 under
      half-precision casts. Eval leaves them fixed.

    CUDA fast path: ``flex_bucket.flex_bucket_attention`` for each head group (one compiled FlexAttention
    call each; ``routing.max_scores`` unused there). Other devices (and CUDA dtypes / head sizes flex does
    not compile): ``chunked_softmax.bucket_softmax_attention`` for both head groups (fused attention
    kernels per group of chunks, probabilities recomputed in backward; activation memory
    O(T * dh) plus one group's scratch, ``routing.max_scores``). With dropout in training it
    falls back to ``chunked.bucket_attention``, which materializes the per-chunk probabilities.

    Positions: "input" and "rotary". No memory prefix (the state would need the clusters).
    """

    supports_memory = False
    position_hooks = frozenset({"input", "rotary"})
    float32_buffers = ("centroids",)

    def __init__(self, cfg: EncoderConfig, layer: int, position=None):
        super().__init__(cfg, layer, position)
        self.n_local = self.local_head_count(cfg)
        n_routed = cfg.n_heads - self.n_local
        gen = layer_generator(cfg.routing.seed, layer, salt=2)
        centroids = F.normalize(torch.randn(n_routed, cfg.routing.n_clusters, cfg.d_head, generator=gen), dim=-1)
        self.register_buffer("centroids", centroids)

    @staticmethod
    def local_head_count(cfg: EncoderConfig) -> int:
        return cfg.routing.local_heads if cfg.routing.local_heads > 0 else cfg.n_heads // 2

    @classmethod
    def validate(cls, cfg: EncoderConfig) -> None:
        r = cfg.routing
        if not 0 <= r.local_heads <= cfg.n_heads:
            raise ValueError(f"routing.local_heads={r.local_heads} must be in [0, n_heads={cfg.n_heads}] "
                             f"(0 means half of the heads)")
        if r.n_clusters < 1:
            raise ValueError(f"routing.n_clusters={r.n_clusters}: need at least one cluster, e.g. sqrt(T)")
        if r.window < 1 or r.chunk_size < 1:
            raise ValueError(f"routing.window={r.window} and routing.chunk_size={r.chunk_size} must be >= 1")
        if not 0.0 <= r.ema_decay < 1.0:
            raise ValueError(f"routing.ema_decay={r.ema_decay} must be in [0, 1), e.g. 0.999")

    @torch.no_grad()
    def clusters(self, x: Tensor) -> Tensor:
        """(B, Hr, T) index of the nearest centroid to each (normalized) routing-head vector."""
        acc = torch.promote_types(x.dtype, torch.float32)
        mu = F.normalize(self.centroids.to(device=x.device, dtype=acc), dim=-1).transpose(1, 2)   # (Hr, dh, C)
        return torch.matmul(x.to(acc), mu).argmax(-1)

    @torch.no_grad()
    def update_centroids(self, x: Tensor, clusters: Tensor, valid: Tensor | None = None) -> None:
        """One online k-means step: mu_c <- decay mu_c + (1 - decay) mean{x_t : c(x_t) = c} (x: (B, Hr, T, dh)).

        Per-cluster sums by ``index_add_`` over the (head, cluster) pairs: O(T dh) memory and work, no
        (B, Hr, T, n_clusters) one-hot (128 MiB in float32 at T = 64k with 128 clusters). On CUDA the sums
        are atomic adds, deterministic under ``torch.use_deterministic_algorithms(True)``.
        """
        hr, n_c, dh = self.centroids.shape
        acc = self.centroids.dtype
        slot = (clusters + torch.arange(hr, device=clusters.device)[None, :, None] * n_c).reshape(-1)   # (B*Hr*T,)
        vecs = x.to(acc).reshape(-1, dh)
        weight = torch.ones_like(slot, dtype=acc) if valid is None else \
            valid[:, None, :].to(acc).expand(clusters.shape).reshape(-1)
        if valid is not None:
            vecs = vecs * weight[:, None]
        sums = torch.zeros(hr * n_c, dh, dtype=acc, device=x.device).index_add_(0, slot, vecs).view(hr, n_c, dh)
        counts = torch.zeros(hr * n_c, dtype=acc, device=x.device).index_add_(0, slot, weight).view(hr, n_c, 1)
        decay = self.cfg.routing.ema_decay
        moved = decay * self.centroids + (1 - decay) * sums / counts.clamp(min=1)
        self.centroids.copy_(torch.where(counts > 0, moved, self.centroids))

    def _routed(self, q: Tensor, keys_grad: bool = True) -> tuple[Tensor, Tensor]:
        """(k = q / |q|, the nearest centroid of each k). ``keys_grad=False`` when the attention makes its keys from
        q itself (the flex path): k then only routes, and is formed without a graph that would keep q alive."""
        k = F.normalize(q if keys_grad else q.detach(), dim=-1)
        return k, self.clusters(k)

    def forward(self, x: Tensor, kv: Tensor, ctx) -> tuple[Tensor, dict]:
        """``Attention.forward`` with the projections made per head group: q, k, v of the local heads and q, v of the
        routed heads are separate products of the matching rows of ``q_proj`` / ``kv_proj`` (the same parameters).
        The routed heads' keys are their normalized queries, so their key rows are never multiplied; and since the
        local heads' kernel keeps its q, k, v (as views, no gather), one (B, T, H dh) product per projection would
        keep the routed heads' halves alive with them until backward."""
        n, dh, h = self.n_local, self.cfg.d_head, self.n_heads
        d = self.kv_proj.out_features // 2

        def proj(src, layer, a, e):
            return split_heads(linear_rows(src, layer, a, e), (e - a) // dh)

        local = routed = None
        if n:
            local = (proj(x, self.q_proj, 0, n * dh), proj(kv, self.kv_proj, 0, n * dh),
                     proj(kv, self.kv_proj, d, d + n * dh))
        if n < h:
            routed = (proj(x, self.q_proj, n * dh, h * dh), proj(kv, self.kv_proj, d + n * dh, 2 * d))
        if self.position is not None and "rotary" in self.position.hooks:
            if local:
                local = (*self.position.rotate(local[0], local[1], ctx.q_index, ctx.k_index), local[2])
            if routed:
                routed = (self.position.rotate_one(routed[0], ctx.q_index), routed[1])     # shared-QK: once
        out, state = self._attend_fast(local, routed, ctx)
        return self.out_proj(merge_heads(out)), state

    def attend(self, q, k, v, ctx):
        return self._attend_fast(*self._head_groups(q, k, v), ctx)

    def _head_groups(self, q: Tensor, k: Tensor, v: Tensor) -> tuple:
        """(local heads' (q, k, v), routed heads' (q, v)) of all-head tensors, None for a group with no heads."""
        n = self.n_local
        return ((q[:, :n], k[:, :n], v[:, :n]) if n else None,
                (q[:, n:], v[:, n:]) if n < self.n_heads else None)

    def _attend_fast(self, local, routed, ctx):
        """The training / inference path for the head groups (local (q, k, v), routed (q, v); None when absent)."""
        q = (local or routed)[0]
        if use_flex_bucket(q, self.dropout, self.training):     # CUDA: one FlexAttention call per head group
            def flex(q, k, v, buckets, n_buckets, chunk_size, scale, dropout, training, **kw):
                # routed heads (self_penalty): k = q / |q| (``_routed``), from the gathered q (``_UnitKeys``)
                keys = None if kw.get("self_penalty") else k
                return flex_bucket_attention(q, keys, v, buckets, n_buckets, chunk_size, scale, **kw)[:, :, None], None
            return self._attend(local, routed, ctx, flex, keys_grad=False)
        if self.dropout > 0 and self.training:    # dropout needs the probabilities: the materializing path
            return self._attend(local, routed, ctx, bucket_attention)
        return self._attend(local, routed, ctx, self._lean)

    def _lean(self, q, k, v, buckets, n_buckets, chunk_size, scale, **kw):
        """``bucket_softmax_attention`` in the (out (B, H, 1, T, dh), lse) form of ``bucket_attention``."""
        kw.pop("dropout"), kw.pop("training")
        out = bucket_softmax_attention(q, k, v, buckets, n_buckets, chunk_size, scale,
                                       max_scores=self.cfg.routing.max_scores, **kw)
        return out[:, :, None], None

    def reference(self, q: Tensor, k: Tensor, v: Tensor, ctx) -> Tensor:
        """Naive version of ``attend`` (dense masks built with explicit loops); no centroid update."""
        training = self.training
        self.train(False)
        try:
            return self._attend(*self._head_groups(q, k, v), ctx, naive_bucket_attention)[0]
        finally:
            self.train(training)

    def _attend(self, local, routed, ctx, attention, keys_grad: bool = True):
        """Local heads (q, k, v) then routed heads (q, v), each None when there are none, with ``attention`` (the
        interface of ``chunked.bucket_attention``; ``keys_grad=False``: it makes the routed heads' keys itself)."""
        r = self.cfg.routing
        outs = []
        if local is not None:
            q, k, v = local
            zeros = torch.zeros(q.shape[0], q.shape[1], 1, q.shape[2], dtype=torch.long, device=q.device)
            out, _ = attention(q, k, v, zeros, 1, r.window, self.scale, causal=ctx.causal,
                               before=1, after=0 if ctx.causal else 1, key_valid=ctx.key_valid, window=r.window,
                               dropout=self.dropout, training=self.training)
            outs.append(out[:, :, 0])
        if routed is not None:
            qr, vr = routed
            kr, clusters = self._routed(qr, keys_grad)
            out, _ = attention(qr, kr, vr, clusters[:, :, None], r.n_clusters, r.chunk_size, self.scale,
                               causal=ctx.causal, self_penalty=True, key_valid=ctx.key_valid,
                               dropout=self.dropout, training=self.training)
            outs.append(out[:, :, 0])
            if self.training:
                self.update_centroids(kr, clusters, ctx.key_valid)
        # joined in (B, T, H, dh) storage, which merge_heads reshapes without a copy
        return torch.cat([o.transpose(1, 2) for o in outs], dim=2).transpose(1, 2), {}

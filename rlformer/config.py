"""EncoderConfig: one dataclass that names every part of an encoder.

The top-level fields pick a variant of each kind by its registered name; settings that only
one family uses live in a small nested config (``cfg.lsh.n_buckets``), so tyro exposes them as
``--backbone.lsh.n-buckets``. ``build_encoder`` validates the whole combination before any
module is made (``rlformer.validate``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Tuple


@dataclass
class CompressiveConfig:
    """Compressive Transformer (Rae et al. 2020) settings."""

    cmem_len: int = 32
    """compressed memory slots per layer"""
    rate: int = 3
    """compression rate c: c old memories -> 1 compressed memory"""
    fn: Literal["max_pool", "avg_pool", "conv", "dilated_conv", "most_used"] = "conv"
    """compression function f_c"""
    recon_weight: float = 1.0
    """weight of the attention-reconstruction loss in aux_loss"""


@dataclass
class KNNConfig:
    """Memorizing Transformer (Wu et al. 2022) / SPALM (Yogatama et al. 2021) settings."""

    capacity: int = 262_144
    """(key, value) pairs kept per batch row; oldest evicted first"""
    topk: int = 32
    """retrieved neighbours per query"""
    layer: int = -2
    """index of the kNN-augmented layer (negative counts from the top)"""
    mix: Literal["gate", "spalm"] = "gate"
    """gate: learned per-head scalar gate (Memorizing Transformer); spalm: per-token sigmoid gate"""
    use_faiss: bool = False
    """use faiss for retrieval when installed (exact inner-product index)"""
    chunk: int = 32_768
    """store entries scored per batched matmul + top-k step (bounds the (B, H, T, chunk) score tensor)"""


@dataclass
class LocalConfig:
    """Image Transformer 1D/2D local attention (Parmar et al. 2018)."""

    block_size: int = 64
    """query block length"""
    lookback: int = 64
    """preceding positions each query block also attends to"""
    grid: Tuple[int, int] = (0, 0)
    """(H, W) layout for local2d; (0, 0) means a square grid inferred from T"""
    query_shape: Tuple[int, int] = (8, 8)
    """local2d query rectangle (rows, cols)"""
    memory_flange: Tuple[int, int] = (8, 8)
    """local2d memory extension (rows up, cols left/right)"""


@dataclass
class SparseConfig:
    """Sparse Transformer factorized patterns (Child et al. 2019)."""

    stride: int = 64
    """stride l of the strided pattern / block length of the fixed pattern"""
    summary: int = 8
    """c: summary positions per block in the fixed pattern"""
    mode: Literal["interleaved", "merged", "split"] = "split"
    """how the two factorized heads are used: per layer, union in one head, or across heads"""
    n_blocks: int = 4
    """blockwise (Qiu et al. 2020): number of blocks"""
    seed: int = 0
    """blockwise: 0 = head h uses the cyclic shift a -> (a + h) mod n (the paper's); > 0 = seeded random
    permutation per head and layer"""


@dataclass
class GlobalLocalConfig:
    """Longformer / BigBird / ETC settings."""

    window: int = 64
    """sliding-window width (keys each side for bidirectional; preceding keys for causal); ETC: l2l radius"""
    layer_windows: Tuple[int, ...] = ()
    """per-layer windows (Longformer: smaller low, larger high); empty = `window` everywhere"""
    dilation: int = 1
    """dilated sliding window gap (Longformer); heads with dilation use window*dilation reach"""
    dilated_heads: int = 0
    """how many heads use the dilated window"""
    global_positions: Tuple[int, ...] = (0,)
    """positions with global attention (Longformer) / global tokens (BigBird), counted from the segment start"""
    global_projections: bool = True
    """Longformer: separate Q_g, K_g, V_g projections for the global rows (the paper's); False = shared"""
    n_random: int = 3
    """BigBird random key blocks per query block (and head)"""
    block_size: int = 64
    """BigBird block length"""
    window_blocks: int = 1
    """BigBird sliding window in blocks each side (1 = the paper's 3-block window)"""
    n_global_tokens: int = 8
    """ETC: size of the global input (learned tokens per layer)"""
    seed: int = 0
    """BigBird: seed of the random blocks (combined with the layer index)"""


@dataclass
class LSHConfig:
    """Reformer LSH attention (Kitaev et al. 2020)."""

    n_buckets: int = 8
    """buckets per hash round (1, or even: h(x) = argmax([xR; -xR]) over n_buckets/2 rotations)"""
    n_hashes: int = 2
    """hash rounds, combined with the logsumexp weighting"""
    chunk_size: int = 64
    """length of the chunks of the sorted sequence; each attends to itself and the previous chunk"""
    seed: int = 0
    """seed of the fixed random rotations (each layer draws its own from seed and its index)"""
    max_scores: int = 1 << 22
    """scores computed at once (forward, and the recomputing backward): bounds the scratch memory
    (about 15 bytes per score in bf16); fewer, larger groups launch fewer kernels"""
    fused: bool = False
    """CUDA: True runs the fused Triton kernels (``bucket_fused``: q and v read in place, no sorted copies; at
    T = 16k, 8 heads x 64 on an H100 1.42 ms / 101 MiB per layer step vs 1.67-2.06 ms / 200 MiB); False (default):
    the FlexAttention path over bucket-sorted copies (``flex_bucket``, where ``head_groups`` applies). Opt-in until
    the run-to-run variation of the fused backward's bf16 dq seen in session 16 is explained (BENCHMARKS.md)"""
    head_groups: int = 0
    """CUDA (FlexAttention) path: the heads run in this many groups, one kernel call each, recomputed group by
    group in backward, so the sorted copies and their gradients exist for one group at a time and are not kept
    from forward to backward (lower peak memory for one more forward kernel call and more launches); 0 = one
    group up to 2^19 sorted rows (heads x hash rounds x T), else about 2^18 per group
    (``flex_bucket.auto_head_groups``); 1 = one call"""


@dataclass
class RoutingConfig:
    """Routing Transformer (Roy et al. 2021)."""

    n_clusters: int = 4
    window: int = 64
    """local attention window combined with routing (keys at distance < window)"""
    ema_decay: float = 0.999
    """centroid EMA: mu <- decay * mu + (1 - decay) * mean of the vectors assigned to mu"""
    local_heads: int = 0
    """heads that use local attention; 0 = half of the heads (rounded down); the rest are routed"""
    chunk_size: int = 64
    """chunk length of the cluster-sorted sequence; each chunk attends to itself and the previous one"""
    seed: int = 0
    """seed of the initial centroids (each layer draws its own from seed and its index)"""
    max_scores: int = 1 << 22
    """scores computed at once (forward, and the recomputing backward): bounds the scratch memory
    (about 15 bytes per score in bf16); fewer, larger groups launch fewer kernels"""


@dataclass
class LinformerConfig:
    """Linformer (Wang et al. 2020)."""

    k: int = 64
    """projected length"""
    max_len: int = 1024
    """sequence length the projections E, F are built for"""
    sharing: Literal["none", "headwise", "kv", "layerwise"] = "headwise"
    """none: E_i, F_i per head; headwise: E, F shared by the heads; kv: also E = F; layerwise: one E for
    keys, values, heads and all layers of an encoder"""


@dataclass
class RandomFeatureConfig:
    """Performer FAVOR+ (Choromanski et al. 2021) and RFA (Peng et al. 2021)."""

    n_features: int = 64
    """m random features (RFA's trigonometric map has 2m outputs: sin and cos)"""
    gate: bool = False
    """RFA gating (recency bias) in the causal recurrence; rfa with causal=True only"""
    chunk_size: int = 64
    """chunk length of the causal prefix sums (chunk form; the fused CUDA kernels use their own, 64)"""
    redraw: bool = False
    """redraw features every training forward (the recurrent state is then only valid within a call)"""
    seed: int = 0
    """seed of the fixed random features (each layer draws its own from seed and its index)"""
    recompute_group: int = 4096
    """causal, chunk form (CPU, gated RFA; CUDA's fused kernels do not read it): tokens processed per batched pass
    (whole chunks), one group after another. Only inputs are kept for backward either way; a group's features and
    per-chunk tensors (O(group * M)) exist only while it runs, so smaller groups lower the peak memory, larger ones
    launch fewer kernels; 0: the whole sequence in one pass"""


@dataclass
class AdaptiveSpanConfig:
    """Adaptive attention span (Sukhbaatar et al. 2019)."""

    max_span: int = 256
    """S: largest attention distance (keys at distance >= S are never attended)"""
    ramp: int = 32
    """R: length of the soft ramp"""
    init: float = 0.5
    """initial span as a fraction of max_span"""
    penalty: float = 2e-6
    """L1 coefficient on spans in aux_loss (per layer: penalty * mean span over heads)"""
    dynamic: bool = False
    """z = S * sigmoid(v^T x + b) per token"""
    max_scores: int = 1 << 23
    """scores computed at once (forward, and the recomputing backward): bounds the scratch memory
    (about 10 bytes per score in bf16); fewer, larger groups launch fewer kernels"""


@dataclass
class ACTConfig:
    """Universal Transformer / ACT (Dehghani et al. 2019; Graves 2016)."""

    max_steps: int = 6
    threshold: float = 0.99
    """1 - epsilon halting threshold"""
    ponder_cost: float = 1e-2
    """tau: weight of the ponder cost in aux_loss"""
    halting_bias_init: float = 1.0
    """initial bias b of the halting unit sigmoid(w^T s + b) (tensor2tensor's default)"""


@dataclass
class EarlyExitConfig:
    """Depth-adaptive Transformer / CALM (Elbayad et al. 2020; Schuster et al. 2022)."""

    confidence: Literal["softmax_gap", "saturation", "classifier"] = "saturation"
    threshold: float = float("inf")
    """exit once confidence >= threshold; inf = never exit early"""
    n_classes: int = 0
    """output size of the exit heads (0 = no heads: only saturation/classifier work)"""
    shared_head: bool = True
    """one exit head (and exit classifier) for all layers instead of one per layer"""
    loss_weights: Literal["uniform", "linear"] = "uniform"
    """weights of the per-exit losses in exit_losses: 1/L each, or n / sum(n) (Elbayad et al. 2020)"""
    classifier_weight: float = 1.0
    """weight of the exit classifier's training loss in aux_loss (confidence='classifier')"""


@dataclass
class EncoderConfig:
    """Everything that defines an rlformer encoder. Variant names are registry keys."""

    d_model: int = 128
    n_layers: int = 3
    n_heads: int = 4
    d_ff: Optional[int] = None
    """feed-forward width; None = 4 * d_model"""
    activation: Literal["relu", "gelu"] = "relu"
    dropout: float = 0.0
    attention: str = "full"
    """attention mechanism (rlformer.available()['attention'])"""
    position: str = "rope"
    """positional encoding (rlformer.available()['position'])"""
    memory: str = "none"
    """memory across segments (rlformer.available()['memory'])"""
    block: str = "pre_ln"
    """residual block type (rlformer.available()['block'])"""
    depth: str = "fixed"
    """depth scheme (rlformer.available()['depth'])"""
    mem_len: int = 64
    """memory length in tokens per layer (memory='xl'/'compressive'/'knn')"""
    causal: bool = True
    checkpointing: bool = False
    """recompute each block in backward (Sparse Transformer's memory trick)"""
    max_len: int = 4096
    """largest absolute position for learned encodings"""
    shaw_clip: int = 16
    """Shaw et al. relative positions: clipping distance k"""
    rope_base: float = 10_000.0
    ff_chunks: int = 1
    """reversible / chunked feed-forward: process the FF in this many chunks along time"""
    compressive: CompressiveConfig = field(default_factory=CompressiveConfig)
    knn: KNNConfig = field(default_factory=KNNConfig)
    local: LocalConfig = field(default_factory=LocalConfig)
    sparse: SparseConfig = field(default_factory=SparseConfig)
    global_local: GlobalLocalConfig = field(default_factory=GlobalLocalConfig)
    lsh: LSHConfig = field(default_factory=LSHConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    linformer: LinformerConfig = field(default_factory=LinformerConfig)
    random_features: RandomFeatureConfig = field(default_factory=RandomFeatureConfig)
    adaptive_span: AdaptiveSpanConfig = field(default_factory=AdaptiveSpanConfig)
    act: ACTConfig = field(default_factory=ACTConfig)
    early_exit: EarlyExitConfig = field(default_factory=EarlyExitConfig)

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ff_width(self) -> int:
        return self.d_ff if self.d_ff is not None else 4 * self.d_model

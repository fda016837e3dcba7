"""Small, valid encoder configs for every registered variant (used by the registry-wide tests).

Each family's nested config is shrunk to fit short test sequences (T = 16). A family whose
variant needs more than these (a grid, a fixed length) adjusts its own lines in
``small_config`` — nothing else in the tests needs to know about it.
"""
from __future__ import annotations

import dataclasses

import rlformer
from rlformer.registry import lookup

D_MODEL, N_HEADS, T = 32, 4, 16


def base_config(**kw) -> rlformer.EncoderConfig:
    cfg = rlformer.EncoderConfig(d_model=D_MODEL, n_layers=2, n_heads=N_HEADS, position="none", mem_len=8,
                                 dropout=0.0, max_len=256, shaw_clip=4)
    cfg.compressive = rlformer.CompressiveConfig(cmem_len=4, rate=2)
    cfg.knn = rlformer.KNNConfig(capacity=64, topk=4)
    cfg.local = rlformer.LocalConfig(block_size=4, lookback=4, grid=(4, 4), query_shape=(2, 2), memory_flange=(2, 2))
    cfg.sparse = rlformer.SparseConfig(stride=4, summary=2, n_blocks=4)
    cfg.global_local = rlformer.GlobalLocalConfig(window=4, dilation=2, dilated_heads=1, global_positions=(0,),
                                                  n_random=1, block_size=4, n_global_tokens=2)
    cfg.lsh = rlformer.LSHConfig(n_buckets=4, n_hashes=2, chunk_size=4)
    cfg.routing = rlformer.RoutingConfig(n_clusters=2, window=4, chunk_size=4)
    cfg.linformer = rlformer.LinformerConfig(k=8, max_len=T)
    cfg.random_features = rlformer.RandomFeatureConfig(n_features=16, chunk_size=4, recompute_group=8)  # 2+ groups
    cfg.adaptive_span = rlformer.AdaptiveSpanConfig(max_span=16, ramp=4)
    cfg.act = rlformer.ACTConfig(max_steps=3, threshold=0.9, halting_bias_init=-1.0)
    cfg.early_exit = rlformer.EarlyExitConfig(confidence="classifier", threshold=0.5)
    return dataclasses.replace(cfg, **kw)


def small_config(kind: str, name: str, **kw) -> rlformer.EncoderConfig:
    """A small config using variant ``name`` of ``kind``, causal when the variant allows it."""
    cfg = base_config(**{kind: name, **kw})
    if kind == "attention" and "causal" not in kw and name in rlformer.available()["attention"]:
        cfg.causal = lookup("attention", name).supports_causal
    if kind == "memory" and name != "none" and "attention" not in kw:
        cfg.attention = "full"
    return cfg


def all_variants() -> list[tuple[str, str]]:
    return [(kind, name) for kind, names in rlformer.available().items() for name in names]

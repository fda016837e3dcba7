"""Bytes of activations one attention layer keeps for backward (CPU; parameters excluded).

    python scripts/bench_saved_activations.py --variants performer rfa full --length 4096
    python scripts/bench_saved_activations.py --variants etc full --length 4096 --layer

Counts every tensor autograd saves during ``attend`` (B=1, H=8, d_head=64) with
``rlformer.diagnostics.saved_activation_bytes``: the activation memory a training step holds per layer.
``--layer``: the whole layer instead (projections included, input x of shape (1, T, 512)), with the attention
benchmark's settings of each variant (``bench_attention.variant_config``; ETC's global stage needs the layer).
Tensors are counted each time autograd saves them (a tensor saved twice counts twice).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

import rlformer
from rlformer.context import AttentionContext
from rlformer.diagnostics import saved_activation_bytes
from rlformer.registry import lookup


def saved_mib(name: str, length: int, heads: int = 8, d_head: int = 64) -> float:
    cfg = rlformer.EncoderConfig(d_model=heads * d_head, n_heads=heads, attention=name, position="none")
    att = lookup("attention", name)(cfg, 0, None).train()
    q, k, v = (torch.randn(1, heads, length, d_head, requires_grad=True) for _ in range(3))
    idx = torch.arange(length)
    ctx = AttentionContext(causal=True, q_index=idx, k_index=idx, q_pos=idx[None], training=True)
    total = saved_activation_bytes(lambda: att.attend(q, k, v, ctx)[0], exclude=att)
    return total / 2**20


def saved_mib_layer(name: str, length: int, heads: int = 8, d_head: int = 64) -> float:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_attention import variant_config
    cfg = variant_config(name, length, heads, d_head)
    att = lookup("attention", cfg.attention)(cfg, 0, None).train()
    x = torch.randn(1, length, heads * d_head, requires_grad=True)
    idx = torch.arange(length)
    ctx = AttentionContext(causal=cfg.causal, q_index=idx, k_index=idx, q_pos=idx[None], training=True)
    return saved_activation_bytes(lambda: att(x, x, ctx)[0], exclude=att) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=["performer", "rfa", "full"])
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--layer", action="store_true", help="the whole layer with the attention benchmark's settings")
    a = ap.parse_args()
    torch.set_num_threads(1)
    print("| attention | T | saved for backward |\n|---|---|---|")
    for name in a.variants:
        mib = saved_mib_layer(name, a.length) if a.layer else saved_mib(name, a.length)
        print(f"| {name} | {a.length} | {mib:.1f} MiB |")


if __name__ == "__main__":
    main()

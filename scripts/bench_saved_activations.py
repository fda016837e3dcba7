"""Bytes of activations one attention layer keeps for backward (CPU; parameters excluded).

    python scripts/bench_saved_activations.py --variants performer rfa full --length 4096

Counts every tensor autograd saves during ``attend`` (B=1, H=8, d_head=64) with
``rlformer.diagnostics.saved_activation_bytes``: the activation memory a training step holds per layer.
"""
from __future__ import annotations

import argparse

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=["performer", "rfa", "full"])
    ap.add_argument("--length", type=int, default=4096)
    a = ap.parse_args()
    torch.set_num_threads(1)
    print("| attention | T | saved for backward |\n|---|---|---|")
    for name in a.variants:
        print(f"| {name} | {a.length} | {saved_mib(name, a.length):.1f} MiB |")


if __name__ == "__main__":
    main()

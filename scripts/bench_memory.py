"""Benchmark the kNN and compressive memories: retrieval, store writes, and encoder steps vs memory='xl'.

    # the GPU run (one H100, a few minutes): stores of 16k, 64k, 262k entries per row
    python scripts/bench_memory.py --device cuda --out bench_memory.json
    # smoke test on CPU
    python scripts/bench_memory.py --device cpu --capacities 256 1024 --batch 2 --heads 2 --d-head 16 \\
        --seg 16 --layers 2 --reps 2 --warmup 1 --out /tmp/bm.json

Rows:
- ``search``: ``rlformer.memory.knn.topk_search`` (batched matmul + top-k, chunked over the store) for
  (batch, heads, seg) normalized queries over a full store of ``capacity`` entries per row; the first row
  also checks the result against a brute-force top-k (``agree``: fraction of identical index sets).
- ``faiss``: the same search through faiss IndexFlatIP (CPU), when faiss is importable (``--faiss``).
- ``write``: ``write_store`` of one segment into a full ring buffer.
- ``encoder knn`` / ``encoder xl`` / ``encoder compressive``: one training step (forward + backward) of
  an encoder (d_model = heads * d_head, ``--layers`` layers, pre-LN, RoPE, mem_len = seg) on one segment,
  the knn one with a full store in its kNN layer, the compressive one with full FIFO and compressed
  memories (conv, rate 4, cmem_len = seg).
Timing: CUDA events (perf_counter on CPU), ``--warmup`` steps, then the median of ``--reps``. Peak memory:
``torch.cuda.max_memory_allocated`` during the step minus before (CUDA only). The JSON is rewritten after
each row; the table is printed last.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_attention import measure

import rlformer
from rlformer.memory import knn as km


def full_store(b, h, cap, dh, device, dtype, gen) -> dict:
    keys = F.normalize(torch.randn(b, h, cap, dh, device=device, dtype=dtype, generator=gen), dim=-1)
    return {"keys": keys, "values": torch.randn(b, h, cap, dh, device=device, dtype=dtype, generator=gen),
            "valid": torch.ones(b, cap, dtype=torch.bool, device=device),
            "ptr": torch.zeros(b, dtype=torch.long, device=device)}


def encoder_cfg(args, memory: str, cap: int) -> rlformer.EncoderConfig:
    cfg = rlformer.EncoderConfig(d_model=args.heads * args.d_head, n_heads=args.heads, n_layers=args.layers,
                                 position="rope", block="pre_ln", memory=memory, mem_len=args.seg, dropout=0.0)
    cfg.knn = rlformer.KNNConfig(capacity=cap, topk=args.topk, chunk=args.chunk)
    cfg.compressive = rlformer.CompressiveConfig(cmem_len=args.seg, rate=4, fn="conv")
    return cfg


def encoder_step(args, memory: str, cap: int, device, dtype, gen) -> Callable[[], None]:
    enc = rlformer.build_encoder(encoder_cfg(args, memory, cap)).to(device=device, dtype=dtype).train()
    x = torch.randn(args.batch, args.seg, enc.cfg.d_model, device=device, dtype=dtype, generator=gen)
    with torch.no_grad():
        state = None
        for _ in range(4 if memory == "compressive" else 1):   # fill FIFO and compressed memories
            state = enc(x, state=state).state
    if memory == "knn":
        slot = state.slots[enc.memory.knn_layer]["attention"]
        slot["store"] = full_store(args.batch, args.heads, cap, args.d_head, device, dtype, gen)

    def step():
        out = enc(x, state=state)
        (out.output.float().square().mean() + out.aux_loss).backward()

    return step


def ready(step: Callable[[], None]) -> Callable[[], Callable[[], None]]:
    return lambda: step


def agreement(idx: torch.Tensor, q: torch.Tensor, store: dict, k: int) -> float:
    scores = q.float() @ store["keys"].float().transpose(-1, -2)
    want = scores.topk(k, dim=-1).indices.sort(-1).values
    return float((idx.sort(-1).values == want).all(-1).float().mean())


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--capacities", type=int, nargs="+", default=[16_384, 65_536, 262_144])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--d-head", type=int, default=64)
    p.add_argument("--seg", type=int, default=128, help="segment length (queries per row)")
    p.add_argument("--topk", type=int, default=32)
    p.add_argument("--chunk", type=int, default=32_768)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--faiss", action="store_true", help="also time the faiss search (CPU; slow at 262k)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    rows: list[dict] = []
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"

    def record(name: str, cap: int, make: Callable[[], Callable[[], None]], extra: dict | None = None):
        try:
            res = measure(make(), device, args.warmup, args.reps)
        except torch.OutOfMemoryError:
            res = {"ms": None, "peak_mib": None, "error": "OOM"}
        rows.append({"row": name, "capacity": cap, **res, **(extra or {})})
        if device.type == "cuda":
            torch.cuda.empty_cache()
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "device": device_name, "rows": rows}, f, indent=1)

    b, h, dh = args.batch, args.heads, args.d_head
    for i, cap in enumerate(args.capacities):
        store = full_store(b, h, cap, dh, device, dtype, gen)
        q = F.normalize(torch.randn(b, h, args.seg, dh, device=device, dtype=dtype, generator=gen), dim=-1)
        extra = None
        if i == 0:
            idx, _ = km.topk_search(q, store["keys"], store["valid"], args.topk, args.chunk)
            extra = {"agree": agreement(idx, q, store, args.topk)}
        search = partial(km.topk_search, q, store["keys"], store["valid"], args.topk, args.chunk)
        record("search", cap, ready(search), extra)
        if args.faiss and km._faiss() is not None:
            record("faiss", cap, ready(partial(km.faiss_search, q, store["keys"], store["valid"], args.topk)))
        segment = (store["keys"][:, :, :args.seg].clone(), store["values"][:, :, :args.seg].clone(),
                   torch.ones(b, args.seg, dtype=torch.bool, device=device))
        record("write", cap, ready(partial(km.write_store, store, *segment, cap)))
        del store, q, search, segment
        record("encoder knn", cap, partial(encoder_step, args, "knn", cap, device, dtype, gen))
    record("encoder xl", 0, partial(encoder_step, args, "xl", 0, device, dtype, gen))
    record("encoder compressive", 0, partial(encoder_step, args, "compressive", 0, device, dtype, gen))

    print(f"\nbatch {b} x heads {h} x d_head {dh}, segment {args.seg}, top-{args.topk}, {args.dtype}, "
          f"{device_name}")
    print("| row | capacity/row | ms | peak MiB | check |\n|---|---|---|---|---|")
    for r in rows:
        ms = "OOM" if r.get("error") else f"{r['ms']:.2f}"
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        check = f"agree={r['agree']:.3f}" if "agree" in r else ""
        print(f"| {r['row']} | {r['capacity'] or '-'} | {ms} | {peak} | {check} |")
    return rows


if __name__ == "__main__":
    main()

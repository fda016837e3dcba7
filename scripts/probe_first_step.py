"""Where the first step of an attention layer spends its time: BlockMask building vs compiling vs running.

    python scripts/probe_first_step.py --device cuda --variants bigbird fixed --lengths 16384 --out first.json

For each variant and length (the settings of ``bench_attention.variant_config``), one fresh process-level run of
the layer's fwd+bwd step: wall time of the first step (FlexAttention / Inductor compiles here), of the BlockMask
builds inside it (``rlformer.attention.flex.block_mask_for``, timed by wrapping it; synchronized), of the second
step (a second compile shows up here, e.g. a recompile) and the median of ``--reps`` later steps. Prints a table
and writes JSON to ``--out`` after every measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_attention import rlformer_step  # noqa: E402  (same directory)

from rlformer.attention import flex  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def probe(name: str, t: int, args, device, dtype) -> dict:
    spent = {"block_mask_s": 0.0, "block_mask_calls": 0}
    original = flex.block_mask_for

    def timed(*a, **k):
        _sync(device)
        start = time.perf_counter()
        out = original(*a, **k)
        _sync(device)
        spent["block_mask_s"] += time.perf_counter() - start
        spent["block_mask_calls"] += 1
        return out

    flex.block_mask_for = timed
    try:
        step = rlformer_step(name, t, args, device, dtype)
        walls = []
        for _ in range(2 + args.reps):
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            walls.append(time.perf_counter() - start)
            if len(walls) == 1:
                first_mask = dict(spent)
    finally:
        flex.block_mask_for = original
    return {"first_step_s": walls[0], "first_block_mask_s": first_mask["block_mask_s"],
            "block_mask_calls": first_mask["block_mask_calls"], "second_step_s": walls[1],
            "steady_ms": 1e3 * statistics.median(walls[2:])}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--variants", nargs="+", default=["bigbird", "fixed"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[16384])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--d-head", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default="first_step.json")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    result = {"meta": {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                       "torch": torch.__version__, "command": " ".join(sys.argv)}, "rows": []}
    for name in args.variants:
        for t in args.lengths:
            try:
                row = {"variant": name, "length": t, **probe(name, t, args, device, dtype)}
            except Exception as exc:          # noqa: BLE001 - recorded, the next variant still runs
                row = {"variant": name, "length": t, "error": f"{type(exc).__name__}: {exc}"[:300]}
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
    print("| variant | T | first step | of it: BlockMask | second step | steady |")
    print("|---|---|---|---|---|---|")
    for row in result["rows"]:
        if "error" in row:
            print(f"| {row['variant']} | {row['length']} | error: {row['error'][:60]} | | | |")
        else:
            print(f"| {row['variant']} | {row['length']} | {row['first_step_s']:.1f} s | "
                  f"{row['first_block_mask_s']:.1f} s ({row['block_mask_calls']} calls) | "
                  f"{row['second_step_s']:.2f} s | {row['steady_ms']:.2f} ms |")
    return result


if __name__ == "__main__":
    main()

"""Where an attention layer's GPU time goes: torch.profiler over fwd+bwd steps of the benchmark's layer.

    python scripts/profile_attention.py --length 65536 --variants lsh routing adaptive_span performer

Uses the same layer and settings as scripts/bench_attention.py (bf16, batch 1 x 8 heads x d_head 64 by
default), runs ``--warmup`` steps, profiles ``--steps`` steps and prints the top ``--rows`` operators by
CUDA time (totals over the profiled steps: divide by ``--steps`` for per-step figures), after the median host time
to launch one step and its synchronized wall time (unprofiled).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_attention  # noqa: E402  (same directory)


def _host_and_wall_ms(step, device, steps: int) -> tuple[float, float]:
    """Median over ``steps`` of the host time to enqueue one step, and of the synchronized wall time per step."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *_: None)
    host, wall = [], []
    for _ in range(max(steps, 3)):
        sync(device)
        t0 = time.perf_counter()
        step()
        t1 = time.perf_counter()
        sync(device)
        host.append((t1 - t0) * 1e3)
        wall.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(host), statistics.median(wall)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=65536)
    p.add_argument("--variants", nargs="+", required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--d-head", type=int, default=64)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--rows", type=int, default=14)
    p.add_argument("--set", nargs="+", default=None, metavar="SECTION.FIELD=VALUE",
                   help="config overrides, as in bench_attention.py")
    p.add_argument("--sort", default=None,
                   help="profiler column to sort by (default: cuda_time_total on CUDA; self_cpu_time_total shows where "
                        "the host's time goes, synchronizations included)")
    p.add_argument("--shapes", action="store_true",
                   help="one row per (operator, input shapes): which call of an operator costs the time")
    args = p.parse_args(argv)
    from torch.profiler import ProfilerActivity, profile

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = args.sort or ("cuda_time_total" if device.type == "cuda" else "cpu_time_total")
    for name in args.variants:
        step = bench_attention.rlformer_step(name, args.length, args, device, dtype)
        for _ in range(args.warmup):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        with profile(activities=activities, record_shapes=args.shapes) as prof:
            for _ in range(args.steps):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        host, wall = _host_and_wall_ms(step, device, args.steps)
        print(f"==== {name} T={args.length} ({args.steps} steps): host {host:.2f} ms/step to launch, "
              f"wall {wall:.2f} ms/step synchronized (host close to wall: bound by launches, not the GPU)")
        table = prof.key_averages(group_by_input_shape=args.shapes).table(
            sort_by=sort, row_limit=args.rows, max_name_column_width=60,
            **({"max_shapes_column_width": 90} if args.shapes else {}))
        print(table, flush=True)


if __name__ == "__main__":
    main()

"""Time the fused random-feature kernels alone (``rlformer.attention.random_features_fused``) over launch settings.

    python scripts/bench_random_features.py --lengths 16384 --warps 4 8 --programs 256 528 --block-m 32 64 --stages 1 2
    python scripts/bench_random_features.py --variants rfa --lengths 16384 --profile    # GPU time per kernel
    python scripts/bench_random_features.py --variants rfa --lengths 16384 --configs "" SUMS_CHUNK=32,SUMS_BLOCK_M=16

For Performer and RFA (causal, bf16, batch x heads x d_head as in bench_attention): q, k, v laid out as slices
of (B, T, H, dh) projections, one forward + backward of ``fused_random_features`` per step captured as a CUDA
graph, median of ``--reps`` CUDA-event timed replays after ``--warmup``, twice (two rounds), and the peak memory
of the captured step. Each setting of (NUM_WARPS, PROGRAMS, BLOCK_M, NUM_STAGES, --configs) is one compile of the
kernels. ``--configs``: settings of the module's launch constants, each ``NAME=VALUE[,NAME=VALUE...]`` (``""``: the
defaults), e.g. ``CHUNK=32``, ``SUMS_CHUNK=16``, ``SUMS_WARPS=8``; ``BLOCK_M``, ``SUMS_BLOCK_M`` and ``SUMS_CHUNK``
take one size for both kinds.
The layer-level comparison against full attention is ``bench_attention.py``; this script picks the defaults.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, not installed
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_attention  # noqa: E402  (same directory)
import rlformer  # noqa: E402
from rlformer.attention import random_features_fused as fused_rf  # noqa: E402


def _step(name: str, t: int, args):
    cfg = rlformer.EncoderConfig(d_model=args.heads * args.d_head, n_heads=args.heads, n_layers=1, attention=name,
                                 position="none", dropout=0.0, causal=True, max_len=t)
    cfg.random_features = dataclasses.replace(cfg.random_features, n_features=args.features)
    layer = rlformer.validate(cfg)["attention"](cfg, 0, None).cuda()
    b, h, d = args.batch, args.heads, args.d_head
    qkv = torch.randn(b, t, 3, h, d, device="cuda", dtype=torch.bfloat16)
    q, k, v = (qkv[:, :, i].transpose(1, 2).requires_grad_() for i in range(3))
    ms = args.features * layer.feature_multiplier
    s0 = torch.zeros(b, h, ms, d, device="cuda")
    z0 = torch.zeros(b, h, ms, device="cuda")
    grad = torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16)
    floor = layer.den_floor(torch.float32)

    def step():
        w, scale, bq, bk, kcoef, feat = layer.fused_weights()
        out, _, _ = fused_rf.fused_random_features(feat, q, k, v, None, w, scale, bq, bk, s0, z0, kcoef, floor)
        torch.autograd.backward(out, grad)
        q.grad = k.grad = v.grad = None
        layer.zero_grad(set_to_none=True)

    return step


def _time(step, warmup: int, reps: int) -> tuple[float, float]:
    """(median ms of CUDA-graph replays, peak extra MiB of the captured step), as bench_attention --cuda-graph."""
    replay, mib = bench_attention.graphed(step, torch.device("cuda"), warmup)
    return bench_attention.measure(replay, torch.device("cuda"), warmup, reps)["ms"], mib


def _kernel_ms(step, steps: int = 5) -> dict:
    """GPU time per step of each kernel (ms, by name) over ``steps`` eager steps under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile
    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    times = {e.key: e.self_device_time_total / 1000 / steps for e in prof.key_averages()
             if e.self_device_time_total > 0}
    return dict(sorted(times.items(), key=lambda kv: -kv[1]))


def measured(step, args, **settings) -> dict:
    """One table row: ``settings`` plus the graph-replay ms of two rounds, the peak MiB and, with ``--profile``,
    each kernel's GPU ms per step."""
    rounds = [_time(step, args.warmup, args.reps) for _ in range(2)]
    row = dict(settings, ms=[r[0] for r in rounds], mib=max(r[1] for r in rounds))
    if args.profile:
        row["kernel_ms"] = _kernel_ms(step)
    return row


def print_row(cells: list, row: dict) -> None:
    """``| cells | ms | MiB |`` and, when profiled, the kernels' times on the next line."""
    print(f"| {' | '.join(str(c) for c in cells)} | {row['ms'][0]:.3f}/{row['ms'][1]:.3f} | {row['mib']:.0f} |",
          flush=True)
    if "kernel_ms" in row:
        print("  kernels (ms per step): " + ", ".join(f"{k[:40]} {v:.3f}" for k, v in row["kernel_ms"].items()),
              flush=True)


TUNABLE = ("CHUNK", "NUM_WARPS", "NUM_STAGES", "PROGRAMS", "BLOCK_M", "SUMS_CHUNK", "SUMS_WARPS", "SUMS_STAGES",
           "SUMS_BLOCK_M")


def parse_config(text: str) -> dict:
    """``NAME=VALUE,...`` -> {NAME: value} for the module constants in ``TUNABLE`` (block sizes, sums chunk: the value
    for both kinds)."""
    out = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        if name not in TUNABLE or not value.isdigit():
            raise SystemExit(f"--configs item {item!r}: expected NAME=INTEGER with NAME one of {', '.join(TUNABLE)}")
        per_kind = name.endswith("BLOCK_M") or name == "SUMS_CHUNK"
        out[name] = dict.fromkeys(fused_rf.BLOCK_M, int(value)) if per_kind else int(value)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["performer", "rfa"])
    p.add_argument("--lengths", type=int, nargs="+", default=[16384, 65536])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--d-head", type=int, default=64)
    p.add_argument("--features", type=int, default=256)
    p.add_argument("--warps", type=int, nargs="+", default=[fused_rf.NUM_WARPS])
    p.add_argument("--programs", type=int, nargs="+", default=[fused_rf.PROGRAMS])
    p.add_argument("--block-m", type=int, nargs="+", default=[0], help="0: the module default of each kind")
    p.add_argument("--stages", type=int, nargs="+", default=[fused_rf.NUM_STAGES])
    p.add_argument("--sums-stages", type=int, nargs="+", default=[fused_rf.SUMS_STAGES],
                   help="pipelining stages of the segment-sums kernel")
    p.add_argument("--configs", nargs="+", default=[""], help="launch-constant settings, NAME=VALUE[,...] each "
                   "(\"\": the defaults); crossed with the options above")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--profile", action="store_true", help="also print each kernel's GPU time per step "
                   "(torch.profiler over 5 eager steps)")
    p.add_argument("--out", default="bench_random_features.json")
    args = p.parse_args()
    rows = []
    configs = [(c, parse_config(c)) for c in args.configs]
    defaults = {name: getattr(fused_rf, name) for name in TUNABLE}
    print(f"{torch.cuda.get_device_name()}, bfloat16, batch {args.batch} x {args.heads} heads x d_head "
          f"{args.d_head}, m = {args.features}; fused fwd+bwd median ms (round 1 / round 2), peak extra MiB")
    print("| attention | T | warps | programs | block_m | stages | sums stages | config | ms | MiB |\n"
          "|---|---|---|---|---|---|---|---|---|---|")
    for name, t in itertools.product(args.variants, args.lengths):
        step = _step(name, t, args)
        for warps, programs, bm, stages, sums_stages, (text, config) in itertools.product(
                args.warps, args.programs, args.block_m, args.stages, args.sums_stages, configs):
            for key, value in defaults.items():
                setattr(fused_rf, key, value)
            fused_rf.NUM_WARPS, fused_rf.PROGRAMS, fused_rf.NUM_STAGES = warps, programs, stages
            fused_rf.SUMS_STAGES = sums_stages
            if bm:
                fused_rf.BLOCK_M = dict.fromkeys(defaults["BLOCK_M"], bm)
            for key, value in config.items():
                setattr(fused_rf, key, value)
            row = measured(step, args, attention=name, t=t, warps=warps, programs=programs, block_m=bm,
                           stages=stages, sums_stages=sums_stages, config=text)
            rows.append(row)
            print_row([name, t, warps, programs, bm, stages, sums_stages, text or "-"], row)
    with open(args.out, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()

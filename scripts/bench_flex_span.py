"""What the adaptive-span FlexAttention call costs, and which part of its rule costs it.

    python scripts/bench_flex_span.py --length 16384 65536

On random bf16 q, k, v of shape (1, heads, T, d_head) (8 heads, d_head 64) with static spans z = ``--span`` per head,
ramp R = ``--ramp``, S = ``--max-span`` (the attention benchmark's layer: S = 1024, z = S / 2, R = 32), times the
forward and forward+backward of one compiled ``flex_attention`` call over the span band (``band_block_mask``,
0 <= x < W) with, in turn: the span mask_mod and a score_mod that computes log m per score or reads it from the
(H, S) table (the layer's call for static spans), the mask_mod only, the score_mod only, neither (the block band
alone); then ``flex_adaptive_span`` itself with spans that require grad (main call plus the analytic span-gradient
pass), and bare causal SDPA for scale. CUDA events, medians of ``--reps`` after ``--warmup``, two rounds.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_attention  # noqa: E402  (same directory)
from rlformer.attention.flex import _flex, flex_with_lse, with_mask_mod  # noqa: E402
from rlformer.attention.flex_span import (band_block_mask, flex_adaptive_span, span_bounds,  # noqa: E402
                                          span_log_table, span_mask_mod, span_score_mod, span_table_score_mod)



def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, nargs="+", default=[16384, 65536])
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--d-head", type=int, default=64)
    p.add_argument("--span", type=float, default=512.0)
    p.add_argument("--ramp", type=int, default=32)
    p.add_argument("--max-span", type=int, default=1024)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--table-options", type=json.loads, nargs="*", default=[],
                   help='kernel_options (JSON) to try with the table score_mod, e.g. \'{"num_stages": 2}\'')
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    dev, dt = torch.device("cuda"), torch.bfloat16
    flex, _ = _flex()
    scale = args.d_head ** -0.5
    results = {}
    for t in args.length:
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, args.heads, t, args.d_head, device=dev, dtype=dt, requires_grad=True)
                   for _ in range(3))
        z = torch.full((args.heads,), args.span, device=dev)
        _, w = span_bounds(z, args.ramp, args.max_span)
        band = band_block_mask(t, t, 0, 0, w, dev)
        mm, sm = span_mask_mod(z, None, 0, args.ramp, args.max_span), span_score_mod(z, 0, args.ramp)
        table = span_table_score_mod(span_log_table(z, args.ramp, args.max_span), 0)
        cases = {"mask_mod + score_mod computing log m": (mm, sm),
                 "mask_mod + score_mod reading the log m table (the layer's call)": (mm, table),
                 "mask_mod only": (mm, None),
                 "score_mod only": (None, sm), "block band alone": (None, None)}
        row = {}

        def report(name, r):
            row[name] = r
            print(f"T={t} {name}: " + ", ".join(f"{key} {'/'.join(f'{x:.3f}' for x in val)} ms"
                                                for key, val in r.items()), flush=True)

        runs = [(name, mods, None) for name, mods in cases.items()]
        runs += [(f"mask_mod + table score_mod, kernel_options {o}", (mm, table), o) for o in args.table_options]
        for name, (mask_mod, score_mod), options in runs:
            bm = band if mask_mod is None else with_mask_mod(band, mask_mod)
            extra = {} if options is None else {"kernel_options": options}

            def fwd(bm=bm, score_mod=score_mod, extra=extra):
                with torch.no_grad():
                    flex_with_lse(flex, q, k, v, score_mod=score_mod, block_mask=bm, scale=scale, **extra)

            def fwd_bwd(bm=bm, score_mod=score_mod, extra=extra):
                out, lse = flex_with_lse(flex, q, k, v, score_mod=score_mod, block_mask=bm, scale=scale, **extra)
                out.float().sum().backward()

            try:
                report(name, {"fwd": bench_attention.cuda_ms_rounds(fwd, args.warmup, args.reps),
                              "fwd_bwd": bench_attention.cuda_ms_rounds(fwd_bwd, args.warmup, args.reps)})
            except Exception as exc:                       # a config that does not compile: say so, go on
                row[name] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
                print(f"T={t} {name}: error {row[name]['error']}", flush=True)
        zg = z.clone().requires_grad_()

        def layer_call():
            flex_adaptive_span(q, k, v, None, scale, zg, args.ramp, args.max_span).float().sum().backward()

        report("flex_adaptive_span, spans with grad (+ ramp pass)",
               {"fwd_bwd": bench_attention.cuda_ms_rounds(layer_call, args.warmup, args.reps)})

        def sdpa():
            torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).float().sum().backward()

        report("sdpa causal", {"fwd_bwd": bench_attention.cuda_ms_rounds(sdpa, args.warmup, args.reps)})
        results[t] = row
    if args.out:
        bench_attention.write_cuda_results(args.out, args, results)
    return results


if __name__ == "__main__":
    main()

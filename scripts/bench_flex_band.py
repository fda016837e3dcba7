"""What the bucket-band FlexAttention kernel of lsh / routing costs, and which part of its rule costs it.

    python scripts/bench_flex_band.py --length 16384 65536

On random bf16 q, k, v of shape (1, heads * rounds, L, d_head) (the gathered, bucket-sorted tensors of
``flex_bucket_attention``: 8 heads x 2 rounds, d_head 64, chunk 64, causal, one chunk back, LSH's self penalty and
round dedup), times forward and forward+backward of one compiled ``flex_attention`` call with the band BlockMask
and, in turn: the full lsh mask_mod and score_mod, the mask_mod only, a mask_mod of the band alone (sorted index
distance, no table reads), and no mask_mod at all (the block band alone); and bare causal SDPA over the
unsorted (1, heads, L, d_head) for scale. CUDA events, medians of ``--reps`` after ``--warmup``, two rounds.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from rlformer.attention import flex_bucket
from rlformer.attention.flex import _flex, flex_with_lse, with_mask_mod

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_attention  # noqa: E402  (same directory)



def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, nargs="+", default=[16384, 65536])
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--buckets", type=int, default=8)
    p.add_argument("--d-head", type=int, default=64)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    dev, dt = torch.device("cuda"), torch.bfloat16
    flex, _ = _flex()
    results = {}
    for t in args.length:
        torch.manual_seed(0)
        buckets = torch.randint(0, args.buckets, (1, args.heads, args.rounds, t), device=dev)
        tables = flex_bucket.bucket_slots(buckets, args.chunk, None, True, reach=1)
        length = tables["length"]
        hr = args.heads * args.rounds
        q, k, v = (torch.randn(1, hr, length, args.d_head, device=dev, dtype=dt, requires_grad=True)
                   for _ in range(3))
        band = flex_bucket.band_block_mask(length, args.chunk, 1, 0, True, None, dev)
        mask_mod, score_mod = flex_bucket._mods(tables, 1, 0, True, None, True)
        reach = 2 * args.chunk - 1

        def band_only(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (q_idx - kv_idx <= reach)

        cases = {"lsh mask_mod + score_mod": (mask_mod, score_mod), "lsh mask_mod only": (mask_mod, None),
                 "band mask_mod (no tables)": (band_only, None), "block band, no mask_mod": (None, None)}
        row = {}
        for name, (mm, sm) in cases.items():
            bm = band if mm is None else with_mask_mod(band, mm)

            def fwd(bm=bm, sm=sm):
                with torch.no_grad():
                    flex_with_lse(flex, q, k, v, score_mod=sm, block_mask=bm, scale=args.d_head ** -0.5)

            def fwd_bwd(bm=bm, sm=sm):
                out, lse = flex_with_lse(flex, q, k, v, score_mod=sm, block_mask=bm, scale=args.d_head ** -0.5)
                (out.float().sum() + lse.sum()).backward()

            row[name] = {"fwd_ms": bench_attention.cuda_ms_rounds(fwd, args.warmup, args.reps),
                         "fwd_bwd_ms": bench_attention.cuda_ms_rounds(fwd_bwd, args.warmup, args.reps)}
            print(f"T={t} {name}: fwd {row[name]['fwd_ms'][0]:.3f}/{row[name]['fwd_ms'][1]:.3f} ms, fwd+bwd "
                  f"{row[name]['fwd_bwd_ms'][0]:.3f}/{row[name]['fwd_bwd_ms'][1]:.3f} ms", flush=True)
        qs, ks, vs = (torch.randn(1, args.heads, t, args.d_head, device=dev, dtype=dt, requires_grad=True)
                      for _ in range(3))

        def sdpa():
            torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True).float().sum().backward()

        row["sdpa causal (unsorted, heads only)"] = {
            "fwd_bwd_ms": bench_attention.cuda_ms_rounds(sdpa, args.warmup, args.reps)}
        print(f"T={t} sdpa causal: fwd+bwd {row['sdpa causal (unsorted, heads only)']['fwd_bwd_ms']}", flush=True)
        results[t] = row
    if args.out:
        bench_attention.write_cuda_results(args.out, args, results)
    return results


if __name__ == "__main__":
    main()

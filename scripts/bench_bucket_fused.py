"""Time lsh's attention kernels alone: the fused kernels (``rlformer.attention.bucket_fused``) over launch settings,
against the FlexAttention path (``flex_bucket``) on the same inputs.

    python scripts/bench_bucket_fused.py --lengths 16384 65536 --blocks 64 128 --warps 4 8 --profile

The benchmark's lsh settings (bench_attention: causal, bf16, batch 1 x 8 heads x d_head 64, two hash rounds,
chunk 64, 2 T / 128 buckets, random buckets): q and v laid out as slices of a (B, T, 2, H, dh) projection, one
forward + backward of the shared-QK bucket attention per step (bucket tables included) captured as a CUDA graph,
median of ``--reps`` CUDA-event timed replays after ``--warmup``, twice (two rounds), and the peak memory of the
captured step above its inputs. Each (BLOCK, WARPS) is one compile of the fused kernels. The layer-level
comparison against full attention and reformer-pytorch is ``bench_attention.py``; this script picks the defaults.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, not installed
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_random_features  # noqa: E402  (same directory: the graph timing and the per-kernel profile)
from rlformer.attention import bucket_fused, flex_bucket  # noqa: E402


def _step(path: str, t: int, args):
    b, h, d = args.batch, args.heads, args.d_head
    n_buckets = 2 * (t // 128)
    g = torch.Generator(device="cuda").manual_seed(0)
    qv = torch.randn(b, t, 2, h, d, device="cuda", dtype=torch.bfloat16, generator=g)
    q, v = (qv[:, :, i].transpose(1, 2).requires_grad_() for i in range(2))
    buckets = torch.randint(0, n_buckets, (b, h, 2, t), device="cuda", generator=g)
    grad = torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16, generator=g)
    kw = {"causal": True, "self_penalty": True, "dedup": True}

    def step():
        if path == "fused":
            out = bucket_fused.shared_qk_bucket_attention(q, v, buckets, 64, d ** -0.5, **kw)
        else:
            out = flex_bucket.flex_bucket_attention(q, None, v, buckets, n_buckets, 64, d ** -0.5, **kw)
        torch.autograd.backward(out, grad)
        q.grad = v.grad = None

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[16384, 65536])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--d-head", type=int, default=64)
    p.add_argument("--blocks", type=int, nargs="+", default=[bucket_fused.BLOCK])
    p.add_argument("--warps", type=int, nargs="+", default=[bucket_fused.WARPS])
    p.add_argument("--no-flex", action="store_true", help="skip the FlexAttention path")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--profile", action="store_true", help="also print each kernel's GPU time per step")
    p.add_argument("--out", default="bench_bucket_fused.json")
    args = p.parse_args()
    rows = []
    print(f"{torch.cuda.get_device_name()}, bfloat16, batch {args.batch} x {args.heads} heads x d_head {args.d_head}, "
          "2 rounds, chunk 64, causal; fwd+bwd median ms (round 1 / round 2), peak extra MiB")
    print("| path | T | block | warps | ms | MiB |\n|---|---|---|---|---|---|")
    for t in args.lengths:
        settings = [("fused", blk, w) for blk, w in itertools.product(args.blocks, args.warps)]
        for path, blk, warps in settings + ([] if args.no_flex else [("flex", 0, 0)]):
            bucket_fused.BLOCK, bucket_fused.WARPS = blk or bucket_fused.BLOCK, warps or bucket_fused.WARPS
            step = _step(path, t, args)
            row = bench_random_features.measured(step, args, path=path, t=t, block=blk, warps=warps)
            rows.append(row)
            bench_random_features.print_row([path, t, blk or "-", warps or "-"], row)
    with open(args.out, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()

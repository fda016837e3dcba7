"""What the Triton kernels of causal linear attention cost, against the aten chunk form they replace.

    python scripts/bench_linear_kernels.py --length 16384 65536 --features 64 256 512 --segments 0 1024

On random bf16 features phi_q, phi_k (1, heads, T, M) (positive, as Performer's) and values (1, heads, T, d_head),
times forward and forward+backward of ``linear_kernels`` (``--segments``: tokens per segment; 0 = the default
``segment_length``) and of ``random_features``' compiled aten chunk form (``_group_forward`` / ``_group_backward``
under ``compiled.fused``, the whole sequence as one group) for feature widths ``--features``, and bare causal SDPA
on (1, heads, T, d_head) for scale. CUDA events, medians of ``--reps`` after ``--warmup``, two rounds; peak extra
memory of one forward+backward. M = 256 / 512 are the attention benchmark's Performer / RFA settings (256
features; RFA's sin and cos), with its chunk 128 for the aten form.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_attention  # noqa: E402  (same directory)
from rlformer.attention import linear_kernels as lk  # noqa: E402
from rlformer.attention import random_features as rf  # noqa: E402
from rlformer.attention.compiled import fused  # noqa: E402


def _measure(fn, warmup: int, reps: int) -> list:
    return [bench_attention.measure(fn, torch.device("cuda"), warmup, reps) for _ in range(2)]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, nargs="+", default=[16384, 65536])
    p.add_argument("--features", type=int, nargs="+", default=[64, 256, 512])
    p.add_argument("--segments", type=int, nargs="+", default=[0])
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--d-head", type=int, default=64)
    p.add_argument("--chunk", type=int, default=128, help="the aten chunk form's chunk (the kernels use theirs)")
    p.add_argument("--block-m", type=int, nargs="+", default=[lk.BLOCK_M],
                   help="features per program (linear_kernels.BLOCK_M) to try")
    p.add_argument("--no-aten", action="store_true", help="skip the aten chunk form")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    dev, dt = torch.device("cuda"), torch.bfloat16
    h, dh, c = args.heads, args.d_head, args.chunk
    floor = torch.finfo(torch.float32).tiny
    results = []

    def record(row):
        results.append(row)
        ms = "/".join(f"{r['ms']:.3f}" for r in row["fwd"])
        ms2 = "/".join(f"{r['ms']:.3f}" for r in row["fwd_bwd"])
        print(f"T={row['T']} M={row['M']} {row['case']}: fwd {ms} ms, fwd+bwd {ms2} ms, "
              f"{row['fwd_bwd'][0]['peak_mib']:.0f} MiB", flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"args": vars(args), "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                           "results": results}, f, indent=1)

    for t in args.length:
        for m in args.features:
            torch.manual_seed(0)
            phi_q = (torch.rand(1, h, t, m, device=dev) * 0.1).to(dt).requires_grad_()
            phi_k = (torch.rand(1, h, t, m, device=dev) * 0.1).to(dt).requires_grad_()
            v = torch.randn(1, h, t, dh, device=dev, dtype=dt).requires_grad_()
            s0 = torch.zeros(1, h, m, dh + 1, device=dev)
            dout = torch.randn(1, h, t, dh, device=dev, dtype=dt)
            for seg, bm in [(s, b) for s in args.segments for b in args.block_m]:
                lk.BLOCK_M = bm

                def fwd(seg=seg):
                    lk.forward(phi_q, phi_k, v, s0[..., :dh], s0[..., dh], floor, dt, segment=seg or None)

                def fwd_bwd(seg=seg):
                    fwd(seg)
                    lk.backward(phi_q, phi_k, v, s0[..., :dh], s0[..., dh], floor, dout, None, None,
                                segment=seg or None)

                nm = lk._blocks(m)[1]
                name = f"kernels, BLOCK_M {bm}, segment {seg or lk.segment_length(t, h * nm, lk.CHUNK, dev)}"
                record({"T": t, "M": m, "case": name, "fwd": _measure(fwd, args.warmup, args.reps),
                        "fwd_bwd": _measure(fwd_bwd, args.warmup, args.reps)})
            if not args.no_aten:
                v1 = F.pad(v.detach(), (0, 1), value=1.0)
                step_f, step_b = fused(rf._group_forward, v), fused(rf._group_backward, v)

                def aten_fwd():
                    step_f(phi_q, phi_k, v1, None, s0, c, floor)

                def aten_fwd_bwd():
                    step_f(phi_q, phi_k, v1, None, s0, c, floor)
                    step_b(phi_q, phi_k, v1, None, s0, c, floor, dout.float(), None)

                record({"T": t, "M": m, "case": "aten chunk form (compiled)",
                        "fwd": _measure(aten_fwd, args.warmup, args.reps),
                        "fwd_bwd": _measure(aten_fwd_bwd, args.warmup, args.reps)})
        qs, ks, vs = (torch.randn(1, h, t, dh, device=dev, dtype=dt, requires_grad=True) for _ in range(3))

        def sdpa_fwd():
            with torch.no_grad():
                F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)

        def sdpa():
            F.scaled_dot_product_attention(qs, ks, vs, is_causal=True).backward(dout)

        record({"T": t, "M": dh, "case": "sdpa causal (q, k, v)", "fwd": _measure(sdpa_fwd, args.warmup, args.reps),
                "fwd_bwd": _measure(sdpa, args.warmup, args.reps)})
    return {"results": results}


if __name__ == "__main__":
    main()

"""Benchmark every registered attention: forward+backward time and peak memory vs bare SDPA and PyPI peers.

    # the GPU run (H100, bf16): T = 1k, 4k, 16k, 64k, batch 1 x 8 heads x d_head 64
    python scripts/bench_attention.py --device cuda --dtype bfloat16 --out bench_attention.json
    # a subset, e.g. to stay within a time limit per command
    python scripts/bench_attention.py --variants local longformer --no-peers --out part.json
    # merge the results of several such runs into one table
    python scripts/bench_attention.py --merge a.json b.json c.json --out bench_attention.json
    # smoke test on CPU
    python scripts/bench_attention.py --device cpu --lengths 128 256 --dtype float32 --out /tmp/b.json
    # Sparse Transformer modes other than the default split: name:mode (interleaved runs the A^(2) layer)
    python scripts/bench_attention.py --variants full strided strided:merged fixed fixed:merged --out sparse.json

Each rlformer variant is one attention layer (projections + mechanism, ``Attention.forward``) built with
``rlformer.validate`` from the settings in ``variant_config`` (causal when the variant supports it,
bidirectional otherwise), on x of shape (batch, T, heads * d_head) that requires grad; a step is
``out = layer(x, x, ctx); out.backward(g)``. Baselines: bare ``F.scaled_dot_product_attention`` on
(batch, heads, T, d_head) q, k, v (causal and bidirectional rows; no projections) and, where a PyPI peer
is importable (x-transformers, local-attention, reformer-pytorch, routing-transformer, linformer,
performer-pytorch), the peer's self-attention layer at matching settings (missing ones are noted and
skipped). Timing: CUDA events, ``--warmup`` steps (FlexAttention compiles here), then the median of
``--reps`` steps; every measurement is taken twice (two rounds) and both medians are reported. Peak
memory: ``torch.cuda.max_memory_allocated`` during one step minus what was allocated before it (inputs
and parameters excluded). Out-of-memory is recorded as OOM, other failures as ``error``. The JSON is
rewritten after every measurement, so a run cut short keeps what it measured; the markdown table is
printed last. On CPU times come from ``time.perf_counter`` and memory is not measured.
"""
from __future__ import annotations

import argparse
import ast
import gc
import importlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import rlformer  # noqa: E402
from rlformer.context import AttentionContext  # noqa: E402
from rlformer.registry import lookup  # noqa: E402


# ------------------------------------------------------------------ settings per variant

def variant_config(name: str, t: int, heads: int, d_head: int) -> rlformer.EncoderConfig:
    """The benchmark settings of attention ``name`` (``strided:merged`` etc.: a sparse.mode) at length ``t``."""
    name, _, mode = name.partition(":")
    cls = lookup("attention", name)
    cfg = rlformer.EncoderConfig(d_model=heads * d_head, n_heads=heads, n_layers=2 if mode else 1, attention=name,
                                 position="none", dropout=0.0, causal=cls.supports_causal, max_len=t)
    if name in ("local", "local2d"):
        rows = max(r for r in range(1, math.isqrt(t) + 1) if t % r == 0)     # squarest grid of t cells
        grid = (rows, t // rows)
        cfg.local = replace(cfg.local, block_size=256, lookback=256, grid=grid, query_shape=(16, 16),
                            memory_flange=(16, 16))
    elif name in ("strided", "fixed", "blockwise"):
        cfg.sparse = replace(cfg.sparse, stride=128, summary=8, mode=mode or "split", n_blocks=8)
    elif name in ("longformer", "bigbird", "etc"):
        cfg.global_local = replace(cfg.global_local, window=256 if name == "longformer" else 128, dilation=2,
                                   dilated_heads=2, global_positions=tuple(range(64)) if name == "bigbird" else (0,),
                                   n_random=3, block_size=64, window_blocks=1, n_global_tokens=64)
    elif name == "lsh":
        cfg.lsh = replace(cfg.lsh, n_buckets=max(2, 2 * (t // 128)), n_hashes=2, chunk_size=64)
    elif name == "routing":
        cfg.routing = replace(cfg.routing, n_clusters=max(2, t // 512), window=256, chunk_size=256)
    elif name == "linformer":
        cfg.linformer = replace(cfg.linformer, k=256, max_len=t)
    elif name in ("performer", "rfa"):
        cfg.random_features = replace(cfg.random_features, n_features=256, chunk_size=128)
    elif name == "adaptive_span":
        cfg.adaptive_span = replace(cfg.adaptive_span, max_span=1024)
    return cfg


def apply_overrides(cfg: rlformer.EncoderConfig, overrides: list[str] | None) -> rlformer.EncoderConfig:
    """``--set section.field=value`` (e.g. ``random_features.recompute_group=16384``) on the benchmark config."""
    for item in overrides or []:
        path, sep, text = item.partition("=")
        section, _, field = path.rpartition(".")
        owner = getattr(cfg, section) if section else cfg
        if not sep or not hasattr(owner, field):
            raise ValueError(f"--set {item!r}: expected section.field=value naming a field of EncoderConfig "
                             f"(e.g. random_features.recompute_group=16384)")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        if section:
            setattr(cfg, section, replace(owner, **{field: value}))
        else:
            setattr(cfg, field, value)
    return cfg


def rlformer_step(name: str, t: int, args, device, dtype) -> Callable[[], None]:
    cfg = apply_overrides(variant_config(name, t, args.heads, args.d_head), getattr(args, "set", None))
    cls = rlformer.validate(cfg)["attention"]
    torch.manual_seed(0)
    layer_index = 1 if name.endswith(":interleaved") else 0          # interleaved: the A^(2) layer
    layer = cls(cfg, layer_index, None).to(device=device, dtype=dtype).train()
    x = torch.randn(args.batch, t, cfg.d_model, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)
    index = torch.arange(t, device=device)
    q_pos = index[None].expand(args.batch, -1)

    run = torch.compile(layer) if getattr(args, "compile", False) else layer

    def step():
        x.grad = None
        layer.zero_grad(set_to_none=True)
        ctx = AttentionContext(causal=cfg.causal, q_index=index, k_index=index, q_pos=q_pos, layer=layer_index,
                               training=True)
        out, _ = run(x, x, ctx)
        out.backward(grad)

    return step


def sdpa_step(causal: bool, t: int, args, device, dtype) -> Callable[[], None]:
    shape = (args.batch, args.heads, t, args.d_head)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, device=device, dtype=dtype)

    def step():
        q.grad = k.grad = v.grad = None
        F.scaled_dot_product_attention(q, k, v, is_causal=causal).backward(grad)

    return step


# ------------------------------------------------------------------ PyPI peers (imported lazily)

class _Projected(nn.Module):
    """q/k/v/out projections around a peer kernel that takes (B, H, T, dh) tensors."""

    def __init__(self, dim: int, heads: int, kernel: nn.Module):
        super().__init__()
        self.heads, self.kernel = heads, kernel
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return self.out(self.kernel(q, k, v).transpose(1, 2).reshape(b, t, d))


def _peer_x_transformers(t, dim, heads, d_head, causal):
    from x_transformers.x_transformers import Attention
    return Attention(dim, dim_head=d_head, heads=heads, causal=causal, flash=True)


def _peer_local_attention(t, dim, heads, d_head, causal):
    from local_attention import LocalAttention
    kernel = LocalAttention(window_size=256, causal=causal, look_backward=1, look_forward=0 if causal else 1,
                            autopad=True, use_rotary_pos_emb=False)
    return _Projected(dim, heads, kernel)


def _peer_reformer(t, dim, heads, d_head, causal):
    from reformer_pytorch import LSHSelfAttention
    return LSHSelfAttention(dim, heads=heads, dim_head=d_head, bucket_size=64, n_hashes=2, causal=causal)


def _peer_routing(t, dim, heads, d_head, causal):
    from routing_transformer.routing_transformer import SelfAttention
    n_clusters = max(2, t // 512)
    return SelfAttention(dim, depth=1, max_seq_len=t, heads=heads, local_attn_heads=heads // 2,
                         window_size=t // n_clusters, dim_head=d_head, local_attn_window_size=min(256, t),
                         causal=causal)


def _peer_linformer(t, dim, heads, d_head, causal):
    from linformer import LinformerSelfAttention
    return LinformerSelfAttention(dim, seq_len=t, k=256, heads=heads, dim_head=d_head)


def _peer_performer(t, dim, heads, d_head, causal):
    from performer_pytorch import SelfAttention
    return SelfAttention(dim, causal=causal, heads=heads, dim_head=d_head, nb_features=256)


PEERS = {  # rlformer variant -> (peer label, PyPI package, builder)
    "full": ("x-transformers Attention(flash)", "x-transformers", _peer_x_transformers),
    "local": ("local-attention LocalAttention", "local-attention", _peer_local_attention),
    "lsh": ("reformer-pytorch LSHSelfAttention", "reformer-pytorch", _peer_reformer),
    "routing": ("routing-transformer SelfAttention", "routing-transformer", _peer_routing),
    "linformer": ("linformer LinformerSelfAttention", "linformer", _peer_linformer),
    "performer": ("performer-pytorch SelfAttention", "performer-pytorch", _peer_performer),
}


PEER_AUTOCAST = {"routing"}
"""Peers that fail with half-precision weights (routing-transformer's local attention multiplies its float32
softmax with half values): run with float32 weights under ``torch.autocast`` at the benchmark dtype instead."""


def peer_mixed(variant: str, dtype: torch.dtype) -> bool:
    """Whether the peer of ``variant`` runs with float32 weights under autocast at ``dtype`` (``PEER_AUTOCAST``)."""
    return variant in PEER_AUTOCAST and dtype != torch.float32


def peer_step(variant: str, t: int, args, device, dtype) -> Callable[[], None]:
    _, _, build = PEERS[variant]
    causal = lookup("attention", variant).supports_causal
    torch.manual_seed(0)
    mixed = peer_mixed(variant, dtype)
    layer = build(t, args.heads * args.d_head, args.heads, args.d_head, causal)
    layer = layer.to(device=device, dtype=torch.float32 if mixed else dtype).train()
    x = torch.randn(args.batch, t, args.heads * args.d_head, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)

    def step():
        x.grad = None
        layer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=mixed):
            out = layer(x)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(grad.to(out.dtype))

    return step


def peer_missing(variant: str) -> Optional[str]:
    label, package, _ = PEERS[variant]
    module = package.replace("-", "_")
    try:
        importlib.import_module(module)
    except Exception as exc:  # ImportError, or a broken dependency chain
        return f"{package} not importable ({type(exc).__name__}: {exc})"
    return None


# ------------------------------------------------------------------ measuring

def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def measure(step: Callable[[], None], device: torch.device, warmup: int, reps: int) -> dict:
    """Median fwd+bwd milliseconds over ``reps`` steps after ``warmup``, and the peak extra memory."""
    cuda = device.type == "cuda"
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    peak = None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    return {"ms": statistics.median(times), "peak_mib": peak}


def cuda_ms_rounds(step: Callable[[], None], warmup: int, reps: int, rounds: int = 2) -> list[float]:
    """``measure``'s median ms of ``step`` on CUDA, once per round (the kernel benchmarks' two-round figures)."""
    return [measure(step, torch.device("cuda"), warmup, reps)["ms"] for _ in range(rounds)]


def write_cuda_results(path: str, args, results) -> None:
    """The kernel benchmarks' JSON: their arguments, the GPU, torch's version and the results."""
    with open(path, "w") as f:
        json.dump({"args": vars(args), "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "results": results}, f, indent=1)


def prepare_capture(step: Callable[[], None], device: torch.device, warmup: int, warm_capture: bool) -> None:
    """What a capture of ``step`` needs first: ``warmup`` steps on a side stream (compiles, cached BlockMasks and
    autograd's streams), then, with ``warm_capture``, one capture that is discarded (the capture stream's one-off
    library workspaces are made there, see ``graphed``)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(max(1, warmup)):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    if warm_capture:
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            step()
        torch.cuda.synchronize(device)
        gc.collect()
        torch.cuda.empty_cache()


def graphed(step: Callable[[], None], device: torch.device, warmup: int,
            warm_capture: bool = True) -> tuple[Callable[[], None], float]:
    """``step`` captured once as a CUDA graph, and the peak extra memory of the captured step (MiB).

    Memory is that of a second capture (``warm_capture``): the first capture on the graph capture stream makes that
    stream's library workspaces (cuBLAS 32 MiB, cuDNN's for SDPA), once per process, in its own pool. Counting them
    charged the first variant measured in a process (every variant at the first length, and none at later ones)
    with a one-off cost that depends on which libraries it calls, not with what its step holds.

    Replays skip Python and kernel-launch overhead, so their time is the GPU's own time: what a training
    loop that captures its step (as rlformer's DT and PPO do) pays. Variants whose step synchronizes
    with the host cannot be captured; the error is recorded.
    """
    prepare_capture(step, device, warmup, warm_capture)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    torch.cuda.synchronize(device)
    return graph.replay, (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20


def run_one(make: Callable[[], Callable[[], None]], device, args) -> dict:
    """Two rounds of ``measure`` on one freshly built step; OOM / errors are recorded, not raised."""
    result: dict = {"status": "ok", "rounds": []}
    step = None
    try:
        step = make()
        peak = None
        if getattr(args, "cuda_graph", False) and device.type == "cuda":
            step, peak = graphed(step, device, args.warmup, not getattr(args, "first_capture", False))
        for _ in range(2):
            result["rounds"].append(measure(step, device, args.warmup, args.reps))
            if peak is not None:           # replays reuse the graph's pool: its capture-time peak is the cost
                result["rounds"][-1]["peak_mib"] = peak
    except Exception as exc:  # noqa: BLE001 - every failure becomes a table cell
        result["status"] = "OOM" if is_oom(exc) else "error"
        if result["status"] == "error":
            result["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    finally:
        del step
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def cell(res: Optional[dict]) -> str:
    if res is None:
        return "-"
    if res["status"] != "ok":
        return res["status"] if res["status"] != "skipped" else "skipped"
    ms = "/".join(f"{r['ms']:.2f}" for r in res["rounds"])
    peaks = [r["peak_mib"] for r in res["rounds"] if r["peak_mib"] is not None]
    return f"{ms} ms" + (f", {max(peaks):.0f} MiB" if peaks else "")


def table(rows: list[dict], lengths: list[int]) -> str:
    head = "| attention | causal | " + " | ".join(f"T={t}" for t in lengths) + " |"
    sep = "|" + "---|" * (2 + len(lengths))
    lines = [head, sep]
    for row in rows:
        cells = [cell(row["results"].get(str(t))) for t in lengths]
        lines.append(f"| {row['name']} | {'yes' if row['causal'] else 'no'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def merge(paths: list[str], out: str) -> dict:
    """One report (and table) from several runs, e.g. variant groups run as separate commands."""
    reports = [json.load(open(path)) for path in paths]
    lengths = sorted({int(t) for r in reports for t in r["meta"]["lengths"]})
    merged = {"meta": {**reports[0]["meta"], "lengths": lengths, "merged_from": paths,
                       "commands": [r["meta"].get("command") for r in reports]},
              "notes": [n for r in reports for n in r["notes"]], "rows": [row for r in reports for row in r["rows"]]}
    with open(out, "w") as f:
        json.dump(merged, f, indent=1)
    meta = merged["meta"]
    print(f"{meta['device']}, {meta['dtype']}, batch {meta['batch']} x {meta['heads']} heads x d_head "
          f"{meta['d_head']}; fwd+bwd median ms (round 1/round 2), peak extra memory\n")
    print(table(merged["rows"], lengths))
    return merged


def isolated(argv: list[str], names: list[str], args) -> dict:
    """Run this script once per variant in its own process (SDPA baselines with the first), then merge."""
    base, i = [], 0
    while i < len(argv):                               # the same flags minus --variants/--out/--isolate
        a = argv[i]
        if a == "--variants":
            i += 1
            while i < len(argv) and not argv[i].startswith("--"):
                i += 1
            continue
        if a == "--out":
            i += 2
            continue
        if a != "--isolate" and not a.startswith(("--variants=", "--out=")):
            base.append(a)
        i += 1
    stem = os.path.splitext(args.out)[0]
    parts = []
    for i, name in enumerate(names):
        part = f"{stem}.{name.replace(':', '_')}.json"
        cmd = [sys.executable, os.path.abspath(__file__), *base, "--variants", name, "--out", part]
        if i > 0 and "--no-sdpa" not in cmd:
            cmd.append("--no-sdpa")
        print(f"[isolated] {name}", flush=True)
        if subprocess.run(cmd).returncode == 0 and os.path.exists(part):
            parts.append(part)
        else:
            print(f"[isolated] {name}: the process failed; its row is missing", flush=True)
    return merge(parts, args.out) if parts else {}


def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--d-head", type=int, default=64)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--variants", nargs="*", default=None, help="rlformer attentions to run (default: all)")
    p.add_argument("--no-sdpa", action="store_true", help="skip the bare SDPA baselines")
    p.add_argument("--no-peers", action="store_true", help="skip the PyPI peers")
    p.add_argument("--max-seconds", type=float, default=float("inf"),
                   help="stop starting new measurements after this many seconds (the rest: 'skipped')")
    p.add_argument("--cuda-graph", action="store_true",
                   help="time CUDA-graph replays of each step (GPU time without launch overhead)")
    p.add_argument("--first-capture", action="store_true",
                   help="with --cuda-graph: measure memory on the process's first capture (includes the capture "
                        "stream's one-off library workspaces; sessions 4-8 measured this way)")
    p.add_argument("--isolate", action="store_true",
                   help="one process per variant (implied by --cuda-graph on CUDA: a failed graph capture leaves the "
                        "CUDA context unusable for later captures), results merged into --out")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each rlformer layer (whole fwd, as a user compiling the model would; graph "
                        "breaks allowed) before timing")
    p.add_argument("--set", nargs="+", default=None, metavar="SECTION.FIELD=VALUE",
                   help="override the benchmark config of the rlformer variants, "
                        "e.g. random_features.recompute_group=0")
    p.add_argument("--out", default="bench_attention.json")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="measure nothing: merge these result files into --out and print one table")
    args = p.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out)
    names = rlformer.available()["attention"] if args.variants is None else args.variants
    if (args.isolate or (args.cuda_graph and args.device.startswith("cuda"))) and len(names) > 1:
        return isolated(argv if argv is not None else sys.argv[1:], names, args)

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    t_start = time.perf_counter()
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "dtype": args.dtype, "batch": args.batch, "heads": args.heads,
            "d_head": args.d_head, "warmup": args.warmup, "reps": args.reps, "lengths": args.lengths,
            "cuda_graph": bool(args.cuda_graph and device.type == "cuda"), "overrides": args.set or [],
            "compile": bool(args.compile),
            "command": "python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:]) if argv is None else argv}
    plan: list[tuple[str, bool, Callable]] = []
    notes: list[str] = []
    if not args.no_sdpa:
        for causal in (True, False):
            plan.append((f"sdpa ({'causal' if causal else 'bidirectional'})", causal,
                         lambda t, c=causal: sdpa_step(c, t, args, device, dtype)))
    for name in names:
        cls = lookup("attention", name.partition(":")[0])
        plan.append((name, cls.supports_causal, lambda t, n=name: rlformer_step(n, t, args, device, dtype)))
        if not args.no_peers and name in PEERS:
            missing = peer_missing(name)
            if missing:
                notes.append(f"peer of {name}: {missing}; skipped")
            else:
                label = PEERS[name][0] + (" (fp32 weights, autocast)" if peer_mixed(name, dtype) else "")
                plan.append((f"peer: {label}", cls.supports_causal,
                             lambda t, n=name: peer_step(n, t, args, device, dtype)))
    rows = [{"name": label, "causal": causal, "results": {}} for label, causal, _ in plan]
    report = {"meta": meta, "notes": notes, "rows": rows}
    for t in args.lengths:
        for row, (label, _, make) in zip(rows, plan):
            if time.perf_counter() - t_start > args.max_seconds:
                row["results"][str(t)] = {"status": "skipped", "reason": "time budget"}
                continue
            res = run_one(lambda: make(t), device, args)
            row["results"][str(t)] = res
            print(f"[T={t}] {label}: {cell(res)}" + (f"  ({res['error']})" if "error" in res else ""), flush=True)
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1)
    report["seconds"] = time.perf_counter() - t_start
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    for note in notes:
        print("note:", note)
    print(f"\n{meta['device']}, {args.dtype}, batch {args.batch} x {args.heads} heads x d_head {args.d_head}; "
          f"fwd+bwd median ms (round 1/round 2){' of CUDA-graph replays' if meta['cuda_graph'] else ''}, "
          "peak extra memory\n")
    print(table(rows, args.lengths))
    return report


if __name__ == "__main__":
    main()

"""Where one attention layer's peak memory goes, on CUDA: the allocations alive at the step's peak and the
tensors autograd saves for backward, grouped by the line of rlformer code that made them.

    python scripts/probe_layer_memory.py --variants full longformer lsh --lengths 16384 --out probe.json
    python scripts/probe_layer_memory.py --variants full etc --graph --out probe_graph.json   # as --cuda-graph

The layer and its step are the attention benchmark's (``bench_attention.rlformer_step``: one layer, forward +
backward, batch 1 x 8 heads x d_head 64, bf16). After ``--warmup`` steps (compiles), one step runs under
``torch.cuda.memory._record_memory_history`` (Python frames); its allocation trace is replayed to find the
moment of the peak (allocated bytes above what was allocated before the step, the benchmark's peak memory)
and the blocks alive then. Blocks made inside autograd's engine (backward of aten ops) have no Python frame and
are listed as ``backward (no Python frame)`` with their size. A second step runs under
``saved_tensors_hooks``: every tensor saved for backward, counted once per storage, labelled with the
innermost rlformer frame that saved it. ``--cpp`` records C++ frames too, so the backward's blocks are named by
their autograd node, and prints the C++ frames of every block of 8 MiB or more that has no Python frame (the
engine's own work between nodes: gradient accumulation, or ``validate_outputs`` reducing a broadcast gradient, which
is how session 12 found the 64 MiB bias-gradient reduce; see rlformer/attention/projection.py). ``--graph``: the
allocations of capturing the step in a CUDA graph instead (after a discarded first capture, as ``bench_attention
--cuda-graph``).
CUDA only.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import traceback
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention import prepare_capture, rlformer_step  # noqa: E402

MIB = 2 ** 20


def _label(frames) -> str:
    """The innermost frame in rlformer/ or scripts/ ('file:line function'), else the innermost Python frame; for a
    block with C++ frames only (``--cpp``), the autograd node in them ('XBackward0'), else the innermost C++ name."""
    py = [f for f in frames if f["filename"].endswith(".py")]
    ours = [f for f in py if "/rlformer/" in f["filename"] or "/scripts/" in f["filename"]]
    pick = ours[0] if ours else (py[0] if py else None)
    if pick is not None:
        return f"{os.path.basename(pick['filename'])}:{pick['line']} {pick['name']}"
    for f in frames:
        node = re.search(r"(\w+Backward\w*)", f.get("name", ""))
        if node:
            return f"backward {node.group(1)}"
    if frames:
        return f"backward (C++: {frames[0].get('name', '?')[:80]})"
    return "backward (no Python frame)"


def live_at_peak(trace: list[dict]) -> tuple[int, dict]:
    """(peak bytes above the start, {label: [bytes, blocks, largest block sizes]}) from a device trace of one step."""
    live: dict[int, tuple[int, list]] = {}
    cur = peak = 0
    at_peak: dict[int, tuple[int, list]] = {}
    for ev in trace:
        action, addr, size = ev["action"], ev["addr"], ev["size"]
        if action == "alloc":
            live[addr] = (size, ev.get("frames", []))
            cur += size
            if cur > peak:
                peak, at_peak = cur, dict(live)
        elif action == "free_requested":
            cur -= size                       # a block allocated before the step counts as a negative change
            live.pop(addr, None)
    groups: dict[str, list] = defaultdict(lambda: [0, 0, []])
    for size, frames in at_peak.values():
        g = groups[_label(frames)]
        g[0] += size
        g[1] += 1
        g[2].append(size)
    return peak, {k: [v[0], v[1], sorted(v[2], reverse=True)[:8]] for k, v in groups.items()}


def unnamed_stacks(trace: list[dict], min_bytes: int, depth: int = 40) -> list[dict]:
    """The frames of every block of at least ``min_bytes`` allocated with no Python frame (made inside autograd's
    engine; with ``--cpp`` these are C++ frames), to name what ``_label`` could only call 'backward (C++: ...)'."""
    out = []
    for ev in trace:
        frames = ev.get("frames", [])
        if ev["action"] == "alloc" and ev["size"] >= min_bytes and not any(f["filename"].endswith(".py")
                                                                             for f in frames):
            out.append({"mib": round(ev["size"] / MIB, 2),
                        "frames": [f"{f.get('name', '?')[:160]} ({os.path.basename(f.get('filename', ''))})"
                                   for f in frames[:depth]]})
    return out


def saved_tensors(step) -> tuple[int, dict]:
    """(bytes, {label: [bytes, count, shapes]}) of the tensors saved for backward during one step."""
    seen: set[int] = set()
    groups: dict[str, list] = defaultdict(lambda: [0, 0, set()])

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if t.is_cuda and ptr not in seen and not isinstance(t, torch.nn.Parameter):
            seen.add(ptr)
            stack = [{"filename": f.filename, "line": f.lineno, "name": f.name}
                     for f in reversed(traceback.extract_stack()[:-1])]
            g = groups[_label(stack)]
            g[0] += t.untyped_storage().nbytes()
            g[1] += 1
            g[2].add(f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}")
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    torch.cuda.synchronize()
    total = sum(g[0] for g in groups.values())
    return total, {k: [v[0], v[1], sorted(v[2])[:4]] for k, v in groups.items()}


def probe(name: str, t: int, args) -> dict:
    device, dtype = torch.device("cuda"), getattr(torch, args.dtype)
    step = rlformer_step(name, t, args, device, dtype)
    prepare_capture(step, device, args.warmup, warm_capture=args.graph)     # as bench_attention.graphed
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=1_000_000, context="all",
                                             stacks="all" if args.cpp else "python")
    if args.graph:                                    # the allocations of capturing the step, as the benchmark
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
    else:
        step()
    torch.cuda.synchronize()
    measured = (torch.cuda.max_memory_allocated() - base) / MIB
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    trace = [ev for ev in snap["device_traces"][torch.cuda.current_device()]
             if ev["action"] in ("alloc", "free_requested")]
    peak, groups = live_at_peak(trace)
    unnamed = unnamed_stacks(trace, 8 * MIB) if args.cpp else []
    res = {"variant": name, "T": t, "graph": args.graph, "peak_mib": round(measured, 1),
           "trace_peak_mib": round(peak / MIB, 1),
           "live_at_peak": {k: [round(v[0] / MIB, 2), v[1], [round(x / MIB, 2) for x in v[2]]]
                            for k, v in sorted(groups.items(), key=lambda kv: -kv[1][0])},
           "unnamed_blocks": unnamed}
    if args.graph:
        return res
    saved, saved_groups = saved_tensors(step)
    res["saved_mib"] = round(saved / MIB, 1)
    res["saved"] = {k: [round(v[0] / MIB, 2), v[1], v[2]]
                    for k, v in sorted(saved_groups.items(), key=lambda kv: -kv[1][0])}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=["full", "longformer"])
    ap.add_argument("--lengths", nargs="+", type=int, default=[16384])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--d-head", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--set", nargs="*", default=None, help="section.field=value overrides of the benchmark config")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--cpp", action="store_true", help="record C++ frames too (slower): backward blocks are then "
                    "labelled with their autograd node")
    ap.add_argument("--graph", action="store_true", help="the allocations of capturing the step in a CUDA graph (the "
                    "benchmark's --cuda-graph memory); no saved-tensor or op listing then")
    ap.add_argument("--out", default="probe_layer_memory.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("probe_layer_memory.py measures CUDA allocations; run it on a machine with a GPU")
    results = []
    for t in args.lengths:
        for name in args.variants:
            try:
                res = probe(name, t, args)
            except Exception as exc:  # noqa: BLE001 - report and go on with the next variant
                res = {"variant": name, "T": t, "error": f"{type(exc).__name__}: {exc}"[:300]}
            results.append(res)
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)
            if "error" in res:
                print(f"## {name} T={t}: {res['error']}", flush=True)
                continue
            print(f"## {name} T={t}{' graph' if args.graph else ''}: peak {res['peak_mib']} MiB "
                  f"(trace {res['trace_peak_mib']}), saved {res.get('saved_mib', '-')} MiB", flush=True)
            print("  live at peak (MiB, blocks):")
            for k, v in list(res["live_at_peak"].items())[:args.top]:
                print(f"    {v[0]:9.2f} {v[1]:4d}  {k}  (largest: {', '.join(f'{x:g}' for x in v[2])})")
            print("  saved for backward (MiB, tensors, shapes):")
            for k, v in list(res.get("saved", {}).items())[:args.top]:
                print(f"    {v[0]:9.2f} {v[1]:4d}  {k}  {'; '.join(v[2])}")
            for block in res.get("unnamed_blocks", []):
                print(f"  block of {block['mib']} MiB with no Python frame, made in:")
                for frame in block["frames"]:
                    print(f"      {frame}")
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

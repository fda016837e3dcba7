"""Decision Transformer training speed: updates/s of the paper preset, rlformer DT vs Hugging Face DT.

    python scripts/bench_dt.py --dataset-root /tmp/minari --out bench_dt.json             # on the GPU
    python scripts/bench_dt.py --dataset-root /tmp/minari --full-run --out bench_dt.json  # + 100k updates & eval

For every (model, data, mode) it builds a fresh model/optimizer, runs ``--warmup`` updates
(compilation, CUDA-graph capture), then times ``--windows`` windows of ``--window`` updates
with CUDA events (perf_counter on CPU) and reports the median updates/s; the whole
measurement is done ``--repeats`` times (default twice) to show it is stable. The update is
exactly the training loop's (``agents.dt.train.Updater``): device-side window sampling,
forward + masked MSE, backward, grad clip 0.25, AdamW, warm-up schedule; batch 64, K=20.

data: ``synthetic`` = the same sampler over 1,000 random episodes of length 1,000;
``real`` = the Minari dataset (``--env``). modes: ``eager``; ``compile`` (torch.compile);
``graph`` (torch.compile + the whole update in one CUDA graph: the training default on
CUDA); ``graph-eager`` (CUDA graph of the eager model). CPU: only eager is meaningful.

``--full-run``: also time ``train_dt.py --preset paper`` end to end (100k updates + a
100-episode-per-target evaluation), the issue's <= 5 minute target. Prints a table last and
writes everything to ``--out`` (JSON).
"""
from __future__ import annotations

import json
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, not installed

import numpy as np
import torch
import tyro

from agents.dt.config import DTConfig, default_backbone
from rlformer import EncoderConfig

Mode = Literal["eager", "compile", "graph", "graph-eager"]


@dataclass
class BenchConfig:
    env: str = "hopper-medium"
    dataset_root: Optional[str] = None
    """Minari store holding the real dataset (sets MINARI_DATASETS_PATH)"""
    models: Tuple[Literal["dt", "bc", "hf"], ...] = ("dt", "hf")
    data: Tuple[Literal["synthetic", "real"], ...] = ("synthetic", "real")
    dt_modes: Tuple[Mode, ...] = ("graph", "compile", "eager")
    """modes for the rlformer models (dt, bc)"""
    hf_modes: Tuple[Mode, ...] = ("eager", "graph")
    """modes for Hugging Face DT (eager is the 69.7 updates/s reference)"""
    batch_size: int = 64
    context_len: int = 20
    warmup: int = 30
    window: int = 100
    """updates per timed window"""
    windows: int = 5
    repeats: int = 2
    device: str = "auto"
    amp: bool = True
    """bf16 autocast on CUDA"""
    full_run: bool = False
    """also time the paper preset end to end (train + evaluation)"""
    full_run_steps: int = 100_000
    full_run_episodes: int = 100
    full_run_dir: str = "runs/bench_full"
    out: str = "bench_dt.json"
    backbone: EncoderConfig = field(default_factory=default_backbone)


def synthetic_data(state_dim: int = 11, act_dim: int = 3, episodes: int = 1000, length: int = 1000):
    from agents.dt.data import OfflineData

    rng = np.random.default_rng(0)
    n = episodes * length
    return OfflineData(rng.standard_normal((n, state_dim)).astype(np.float32),
                       rng.uniform(-1, 1, (n, act_dim)).astype(np.float32), rng.uniform(0, 3, n),
                       np.full(episodes, length, dtype=np.int64), dataset_id="synthetic")


def measure(cfg: BenchConfig, model_name: str, data, mode: Mode, device: torch.device) -> dict:
    from agents.common import seed_everything
    from agents.dt.data import WindowSampler
    from agents.dt.train import Updater, build_model, make_optimizer

    cuda = device.type == "cuda"
    dcfg = DTConfig(env=cfg.env, model=model_name, preset="paper", batch_size=cfg.batch_size,
                    context_len=cfg.context_len, backbone=cfg.backbone).resolved()
    seed_everything(0)
    sampler = WindowSampler(data, cfg.context_len, dcfg.return_scale, dcfg.max_ep_len, device)
    model = build_model(dcfg, data.state_dim, data.act_dim).to(device).train()
    graph = mode in ("graph", "graph-eager") and cuda
    opt, sched = make_optimizer(model, dcfg, device, capturable=graph)
    up = Updater(model, sampler, opt, sched, cfg.batch_size, dcfg.grad_clip, device,
                 compile=mode in ("compile", "graph") and cuda, amp=cfg.amp and cuda, graph=graph)
    t0 = time.perf_counter()
    for _ in range(cfg.warmup):
        up.step()
    if cuda:
        torch.cuda.synchronize(device)
    warm_s = time.perf_counter() - t0
    rates = []
    for _ in range(cfg.windows):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(cfg.window):
                up.step()
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            t = time.perf_counter()
            for _ in range(cfg.window):
                up.step()
            seconds = time.perf_counter() - t
        rates.append(cfg.window / seconds)
    loss = up.pop_means(up.n)[0].item()
    out = {"updates_per_s": statistics.median(rates), "window_rates": rates, "warmup_s": warm_s,
           "cuda_graph": up.graph is not None, "compiled": up.fwd is not model, "mean_loss": loss,
           "n_params": sum(p.numel() for p in model.parameters())}
    del up, model, opt, sched, sampler
    if cuda:
        torch.cuda.empty_cache()
    return out


def full_run(cfg: BenchConfig) -> dict:
    from agents.dt.train import train

    t0 = time.perf_counter()
    s = train(DTConfig(env=cfg.env, preset="paper", train_steps=cfg.full_run_steps,
                       eval_episodes=cfg.full_run_episodes, device=cfg.device, out_dir=cfg.full_run_dir,
                       dataset_root=cfg.dataset_root, backbone=cfg.backbone, download=False))
    keys = ("updates_per_s", "train_wall_s", "eval_wall_s", "wall_s", "normalized_score", "final_return",
            "cuda_graph", "compiled")
    return {**{k: s[k] for k in keys}, "process_wall_s": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> dict:
    cfg = tyro.cli(BenchConfig, args=argv, description=__doc__)
    import os

    from agents.common import resolve_device, write_json

    if cfg.dataset_root:
        os.environ["MINARI_DATASETS_PATH"] = str(Path(cfg.dataset_root).resolve())
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    results: dict = {"device": str(device), "torch": torch.__version__, "config": cfg, "runs": []}
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(device)
    datasets = {}
    for d in cfg.data:
        if d == "synthetic":
            datasets[d] = synthetic_data()
        else:
            from agents.dt.data import load_offline_data
            from envs.datasets import DatasetError

            try:
                datasets[d] = load_offline_data(cfg.env, download=False)
            except DatasetError as e:
                print(f"skipping real data: {e}", file=sys.stderr)
    for rep in range(cfg.repeats):
        for d, data in datasets.items():
            for m in cfg.models:
                for mode in (cfg.hf_modes if m == "hf" else cfg.dt_modes):
                    row = {"repeat": rep, "model": m, "data": d, "mode": mode}
                    try:
                        row.update(measure(cfg, m, data, mode, device))
                    except Exception as e:  # a broken mode (e.g. HF not installed) must not hide the others
                        row["error"] = f"{type(e).__name__}: {e}"
                        traceback.print_exc()
                    print(json.dumps({k: v for k, v in row.items() if k != "window_rates"}), flush=True)
                    results["runs"].append(row)
                    write_json(cfg.out, results)
    if cfg.full_run:
        try:
            results["full_run"] = full_run(cfg)
        except Exception as e:
            results["full_run"] = {"error": f"{type(e).__name__}: {e}"}
            traceback.print_exc()
    write_json(cfg.out, results)
    print_table(results)
    return results


def print_table(results: dict) -> None:
    rows = results["runs"]
    ref = {}
    for r in rows:  # HF eager on the same data and repeat = the 69.7 updates/s reference
        if r["model"] == "hf" and r["mode"] == "eager" and "updates_per_s" in r:
            ref[(r["repeat"], r["data"])] = r["updates_per_s"]
    c = results["config"]
    print(f"\nDT training speed on {results['device']} {results.get('gpu', '')} (batch {c.batch_size}, "
          f"K={c.context_len}, d={c.backbone.d_model}, {c.backbone.n_layers} layers), median of timed windows")
    print("| repeat | data | model | mode | updates/s | x HF eager | CUDA graph | compiled |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['repeat']} | {r['data']} | {r['model']} | {r['mode']} | error: {r['error'][:60]} | | | |")
            continue
        x = ref.get((r["repeat"], r["data"]))
        ratio = f"{r['updates_per_s'] / x:.2f}" if x else "-"
        print(f"| {r['repeat']} | {r['data']} | {r['model']} | {r['mode']} | {r['updates_per_s']:.1f} | {ratio} | "
              f"{r['cuda_graph']} | {r['compiled']} |")
    if "full_run" in results:
        f = results["full_run"]
        if "error" in f:
            print(f"full run: error {f['error']}")
        else:
            print(f"full run (paper preset): {f['train_wall_s']:.1f} s training ({f['updates_per_s']:.1f} updates/s) "
                  f"+ {f['eval_wall_s']:.1f} s evaluation = {f['wall_s']:.1f} s in train(); normalized "
                  f"{f['normalized_score']}")


if __name__ == "__main__":
    main()

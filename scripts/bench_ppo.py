"""GTrXL-PPO speed benchmark: environment steps/s and GPU memory of whole PPO updates.

Target configuration (issue 7): MiniGrid-MemoryS9-v0 rendered as 84x84 RGB (3x3 view, 28-px tiles,
96-step limit), 16 envs x 256 steps per update, GTrXL 2 layers, d=256, 4 heads, memory 64.
SPS counts everything of an update: rollout (async env workers, model on the GPU) + PPO epochs.

``--variants`` runs several settings in turn, each with its own trainer (fresh env workers), and
writes all rows to ``--out``. A variant is ``+``-joined tokens:

    eager | graph      per-step policy inference eagerly or as a CUDA graph (PPOConfig.cuda_graph)
    bf16 | tf32        precision of the update's forward/backward (PPOConfig.update_precision; default fp32)
    compile            torch.compile the policy's features (PPOConfig.compile)
    nofused            plain (foreach) Adam instead of the fused kernel
    sync               gymnasium SyncVectorEnv (envs stepped in the main process) instead of async workers
    split              two env groups of num_envs / 2, pipelined: the policy runs for one group while the
                       other's workers step (PPOConfig.env_groups = 2)

    python scripts/bench_ppo.py --device cuda --variants eager graph graph+bf16 graph+split+bf16 --out bench_ppo.json
    python scripts/bench_ppo.py --device cpu --num-envs 2 --num-steps 8 --updates 1 --warmup 0   # smoke

Per variant: SPS, the rollout split into env wait (step_async + step_wait), policy (step + sampling
+ buffer writes + the action copy back, the step's one sync) and host (the rest: records, the next
observation's copy, GAE), update seconds, peak GPU memory and the replay check. A table is printed last.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch
import tyro

TOKENS = ("eager", "graph", "bf16", "tf32", "compile", "nofused", "sync", "split")


def minigrid_rgb(size: int = 9, view: int = 3, tile: int = 28, max_steps: int = 96, random_length: bool = False):
    """MiniGrid-MemoryS{size}[Random]-v0 with a view x view egocentric RGB render (view * tile pixels)."""
    import gymnasium as gym
    import minigrid  # noqa: F401  (registers MiniGrid ids)
    from minigrid.wrappers import ImgObsWrapper, RGBImgPartialObsWrapper

    env_id = f"MiniGrid-MemoryS{size}{'Random' if random_length else ''}-v0"
    env = gym.make(env_id, agent_view_size=view, max_steps=max_steps)
    return ImgObsWrapper(RGBImgPartialObsWrapper(env, tile_size=tile))


@dataclass
class BenchConfig:
    device: str = "auto"
    updates: int = 5
    """timed PPO updates"""
    warmup: int = 1
    """untimed updates first (allocator, cuDNN autotune, compile)"""
    num_envs: int = 16
    num_steps: int = 256
    num_minibatches: int = 8
    update_epochs: int = 4
    d_model: int = 256
    n_layers: int = 2
    n_heads: int = 4
    mem_len: int = 64
    size: int = 9
    """MiniGrid-MemoryS{size}"""
    vector: Literal["async", "sync"] = "async"
    env_groups: int = 1
    compile: bool = False
    tf32: bool = False
    """TF32 everywhere, rollout included (the replay is then exact only to ~1e-3)"""
    cuda_graph: bool = True
    update_precision: Literal["fp32", "tf32", "bf16"] = "fp32"
    variants: list[str] = field(default_factory=list)
    """run each of these in turn ('+'-joined tokens, see the module docstring); empty = the flags above"""
    seed: int = 0
    out: Optional[str] = None
    """write the results here as JSON"""


def apply_variant(bc: BenchConfig, variant: str) -> BenchConfig:
    """``bc`` with a variant's tokens applied (unknown tokens raise ValueError)."""
    tokens = [t for t in variant.split("+") if t]
    bad = [t for t in tokens if t not in TOKENS]
    if bad:
        raise ValueError(f"unknown variant token(s) {bad} in {variant!r}; use '+'-joined tokens from {TOKENS}")
    changes: dict = {}
    if "eager" in tokens:
        changes["cuda_graph"] = False
    if "graph" in tokens:
        changes["cuda_graph"] = True
    if "bf16" in tokens:
        changes["update_precision"] = "bf16"
    if "tf32" in tokens:
        changes["update_precision"] = "tf32"
    if "compile" in tokens:
        changes["compile"] = True
    if "sync" in tokens:
        changes["vector"] = "sync"
    if "split" in tokens:
        changes["env_groups"] = 2
    return dataclasses.replace(bc, variants=[], **changes)


def run(bc: BenchConfig, fused_adam: Optional[bool] = None) -> dict:
    from agents.ppo import PPOConfig, PPOTrainer, gtrxl_backbone
    from agents.ppo.rollout import EnvFactory

    cfg = PPOConfig(env=f"MiniGrid-MemoryS{bc.size}-rgb84", num_envs=bc.num_envs, num_steps=bc.num_steps,
                    num_minibatches=bc.num_minibatches, update_epochs=bc.update_epochs, device=bc.device,
                    seed=bc.seed, vector=bc.vector, env_groups=bc.env_groups, compile=bc.compile, tf32=bc.tf32,
                    obs_hidden=bc.d_model,
                    cuda_graph=bc.cuda_graph, update_precision=bc.update_precision, fused_adam=fused_adam,
                    backbone=gtrxl_backbone(d_model=bc.d_model, n_layers=bc.n_layers, n_heads=bc.n_heads,
                                            mem_len=bc.mem_len),
                    total_steps=(bc.warmup + bc.updates) * bc.num_envs * bc.num_steps, tensorboard=False,
                    eval_episodes=0, checkpoint_every=0)
    t_build = time.perf_counter()
    trainer = PPOTrainer(cfg, env_fn=EnvFactory("minigrid", {"size": bc.size}, make=minigrid_rgb),
                         run_dir=tempfile.mkdtemp(prefix="bench_ppo_"))
    build_s = time.perf_counter() - t_build
    dev = trainer.device
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    try:
        for _ in range(bc.warmup):
            trainer.collect()
            trainer.update()
        sync()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        timers = trainer.collector.timers
        for k in timers:
            timers[k] = 0
        t_roll = t_upd = 0.0
        replay = 0.0
        for _ in range(bc.updates):
            t0 = time.perf_counter()
            trainer.collect()
            sync()
            t1 = time.perf_counter()
            metrics = trainer.update()
            sync()
            t_upd += time.perf_counter() - t1
            t_roll += t1 - t0
            replay = max(replay, float(metrics["replay_max_abs_diff"]))
        steps = bc.updates * cfg.batch_size
        n = bc.updates
        stepper = trainer.collector.stepper
        res = {
            "config": dataclasses.asdict(bc), "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda"
            else platform.processor() or "cpu",
            "env_steps": steps, "sps": steps / (t_roll + t_upd), "rollout_sps": steps / t_roll,
            "rollout_s_per_update": t_roll / n, "update_s_per_update": t_upd / n,
            "env_s_per_update": timers["env"] / n, "policy_s_per_update": timers["policy"] / n,
            "host_s_per_update": (t_roll - timers["env"] - timers["policy"]) / n,
            "ms_per_vector_step": 1e3 * t_roll / (n * bc.num_steps),
            "replay_max_abs_diff": replay, "build_s": build_s,
            "cuda_graph_active": stepper.graphed, "cuda_graph_error": stepper.graph_error,
            "cuda_graph_check_max_diff": stepper.graph_check_max_diff,
            "fused_adam": bool(trainer.optimizer.defaults.get("fused")),
            "params": sum(p.numel() for p in trainer.policy.parameters()),
        }
        if dev.type == "cuda":
            res["gpu_max_allocated_gb"] = torch.cuda.max_memory_allocated(dev) / 1e9
            res["gpu_max_reserved_gb"] = torch.cuda.max_memory_reserved(dev) / 1e9
        return res
    finally:
        trainer.close()
        del trainer
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def main(argv: Optional[list[str]] = None) -> list[dict]:
    bc = tyro.cli(BenchConfig, args=argv, description=__doc__)
    variants = bc.variants or [""]
    rows = []
    for variant in variants:
        vbc = apply_variant(bc, variant)
        fused = False if "nofused" in variant.split("+") else None
        try:
            res = run(vbc, fused_adam=fused)
        except Exception as err:  # one failing variant must not lose the others' rows
            res = {"config": dataclasses.asdict(vbc), "error": f"{type(err).__name__}: {err}"}
        res["variant"] = variant or "flags"
        rows.append(res)
        print(json.dumps({k: v for k, v in res.items() if k != "config"}), flush=True)
        if bc.out:  # rewritten after each variant: a later timeout keeps the finished rows
            Path(bc.out).parent.mkdir(parents=True, exist_ok=True)
            Path(bc.out).write_text(json.dumps(rows, indent=2) + "\n")
    nan = float("nan")
    print(f"\n{rows[0].get('device_name', '?')[:40]}, {bc.num_envs} envs x {bc.num_steps} steps, "
          f"{bc.num_minibatches} minibatches x {bc.update_epochs} epochs (seconds per update)")
    print(f"{'variant':<22}{'SPS':>7}{'rollout':>9}{'env':>7}{'policy':>8}{'host':>7}{'ms/step':>9}{'update':>8}"
          f"{'GB alloc':>10}{'GB resv':>9}{'replay':>9}{'graph':>7}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:<22} ERROR {r['error'][:100]}")
            continue
        print(f"{r['variant']:<22}{r['sps']:>7.0f}{r['rollout_s_per_update']:>9.3f}{r['env_s_per_update']:>7.3f}"
              f"{r['policy_s_per_update']:>8.3f}{r['host_s_per_update']:>7.3f}{r['ms_per_vector_step']:>9.2f}"
              f"{r['update_s_per_update']:>8.3f}{r.get('gpu_max_allocated_gb', nan):>10.2f}"
              f"{r.get('gpu_max_reserved_gb', nan):>9.2f}{r['replay_max_abs_diff']:>9.1e}"
              f"{'on' if r['cuda_graph_active'] else 'off':>7}")
    for r in rows:
        if r.get("cuda_graph_error") and r["config"]["cuda_graph"]:
            print(f"{r['variant']}: CUDA graph not used ({r['cuda_graph_error'][:160]})")
    print("target (H100): SPS >= 3400 at <= 2.5 GB")
    return rows


if __name__ == "__main__":
    main()

"""GTrXL-PPO speed benchmark: environment steps/s and GPU memory of whole PPO updates.

Target configuration (issue 7): MiniGrid-MemoryS9-v0 rendered as 84x84 RGB (3x3 view, 28-px tiles,
96-step limit), 16 envs x 256 steps per update, GTrXL 2 layers, d=256, 4 heads, memory 64.
SPS counts everything of an update: rollout (async env workers, model on the GPU) + PPO epochs.

    python scripts/bench_ppo.py --device cuda --out bench_ppo.json                # the target run
    python scripts/bench_ppo.py --device cpu --num-envs 2 --num-steps 8 --updates 1 --warmup 0   # smoke

Prints a short table last and writes JSON to --out.
"""
from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
import tyro


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
    compile: bool = False
    tf32: bool = False
    seed: int = 0
    out: Optional[str] = None
    """write the results here as JSON"""


def run(bc: BenchConfig) -> dict:
    from agents.ppo import PPOConfig, PPOTrainer, gtrxl_backbone
    from agents.ppo.rollout import EnvFactory

    cfg = PPOConfig(env=f"MiniGrid-MemoryS{bc.size}-rgb84", num_envs=bc.num_envs, num_steps=bc.num_steps,
                    num_minibatches=bc.num_minibatches, update_epochs=bc.update_epochs, device=bc.device,
                    seed=bc.seed, vector=bc.vector, compile=bc.compile, tf32=bc.tf32, obs_hidden=bc.d_model,
                    backbone=gtrxl_backbone(d_model=bc.d_model, n_layers=bc.n_layers, n_heads=bc.n_heads,
                                            mem_len=bc.mem_len),
                    total_steps=(bc.warmup + bc.updates) * bc.num_envs * bc.num_steps, tensorboard=False,
                    eval_episodes=0, checkpoint_every=0)
    import tempfile

    trainer = PPOTrainer(cfg, env_fn=EnvFactory("minigrid", {"size": bc.size}, make=minigrid_rgb),
                         run_dir=tempfile.mkdtemp(prefix="bench_ppo_"))
    dev = trainer.device
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    try:
        for _ in range(bc.warmup):
            trainer.collect()
            trainer.update()
        sync()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
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
        res = {
            "config": bc.__dict__, "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
            "env_steps": steps, "sps": steps / (t_roll + t_upd), "rollout_sps": steps / t_roll,
            "rollout_s_per_update": t_roll / bc.updates, "update_s_per_update": t_upd / bc.updates,
            "replay_max_abs_diff": replay,
            "params": sum(p.numel() for p in trainer.policy.parameters()),
        }
        if dev.type == "cuda":
            res["gpu_max_allocated_gb"] = torch.cuda.max_memory_allocated(dev) / 1e9
            res["gpu_max_reserved_gb"] = torch.cuda.max_memory_reserved(dev) / 1e9
        return res
    finally:
        trainer.close()


def main(argv: Optional[list[str]] = None) -> dict:
    bc = tyro.cli(BenchConfig, args=argv, description=__doc__)
    res = run(bc)
    if bc.out:
        Path(bc.out).parent.mkdir(parents=True, exist_ok=True)
        Path(bc.out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"\n{'device':<28}{'envs x steps':>14}{'SPS':>10}{'rollout SPS':>13}{'update s':>10}{'GPU alloc GB':>14}"
          f"{'GPU resv GB':>13}")
    print(f"{res['device_name'][:27]:<28}{f'{bc.num_envs} x {bc.num_steps}':>14}{res['sps']:>10.0f}"
          f"{res['rollout_sps']:>13.0f}{res['update_s_per_update']:>10.2f}"
          f"{res.get('gpu_max_allocated_gb', float('nan')):>14.2f}{res.get('gpu_max_reserved_gb', float('nan')):>13.2f}")
    print("target (H100): SPS >= 3400 at <= 2.5 GB")
    return res


if __name__ == "__main__":
    main()

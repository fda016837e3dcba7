"""GPU results for GTrXL-PPO vs sb3-contrib RecurrentPPO (LSTM) at equal step budgets.

Each (task, agent) run is one command that fits a 10-minute slot (``--time-limit`` is a safety
net); ``--agent plot`` (CPU, needs matplotlib) turns the runs under ``--out`` into learning-curve
PNGs, ``results.json`` and a markdown table, printed last.

    python scripts/ppo_gpu_results.py --task tmaze200 --agent gtrxl --out results/ppo
    python scripts/ppo_gpu_results.py --task tmaze200 --agent recurrent_ppo --out results/ppo
    python scripts/ppo_gpu_results.py --task repeat_previous_medium --agent gtrxl --out results/ppo
    python scripts/ppo_gpu_results.py --task minigrid_s13_random --agent gtrxl --out results/ppo
    python scripts/ppo_gpu_results.py --agent plot --out results/ppo

GTrXL stops early once its training success over 100 episodes reaches 0.97 (T-maze); RecurrentPPO
always gets the full budget, so it never has fewer steps than GTrXL. ``--total-steps`` overrides
the task budget (both agents must use the same value for an equal-steps comparison).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import tyro

from agents.ppo.config import EnvOptions, PPOConfig, gtrxl_backbone, preset_for, tmaze_long

TASKS = ("tmaze200", "repeat_previous_medium", "minigrid_s13_random")


def task_config(task: str, total_steps: Optional[int]) -> PPOConfig:
    if task == "tmaze200":
        cfg = tmaze_long(200, total_steps=2_000_000)
    elif task == "repeat_previous_medium":
        cfg = preset_for("rlformer/POPGym-RepeatPreviousMedium-v0")
        cfg = dataclasses.replace(cfg, total_steps=1_500_000, vector="sync")
    elif task == "minigrid_s13_random":
        cfg = preset_for("rlformer/MiniGrid-MemoryS13Random-v0")
        cfg = dataclasses.replace(cfg, total_steps=1_000_000, env_kwargs=EnvOptions(view="symbolic"),
                                  backbone=gtrxl_backbone(d_model=256, n_layers=2, n_heads=4, mem_len=64))
    else:
        raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
    if total_steps is not None:
        cfg = dataclasses.replace(cfg, total_steps=total_steps)
    return cfg


@dataclass
class Args:
    out: str = "results/ppo"
    task: Literal["tmaze200", "repeat_previous_medium", "minigrid_s13_random"] = "tmaze200"
    agent: Literal["gtrxl", "mlp", "recurrent_ppo", "plot"] = "gtrxl"
    total_steps: Optional[int] = None
    """override the task's step budget (use the same for every agent of a task)"""
    seed: int = 1
    device: str = "auto"
    time_limit: float = 540.0
    """seconds of training before a run stops (the summary records the steps reached)"""
    compile: bool = False


def run_one(args: Args) -> dict:
    cfg = task_config(args.task, args.total_steps)
    run_dir = Path(args.out) / f"{args.task}-{args.agent}-seed{args.seed}"
    if args.agent == "recurrent_ppo":
        from agents.baselines.recurrent_ppo import from_ppo_config, train_recurrent_ppo

        # same step budget as GTrXL; the time limit is a safety net (summary.json records the steps reached)
        rcfg = from_ppo_config(cfg, seed=args.seed, device=args.device, out_dir=str(run_dir),
                               time_limit_s=args.time_limit)
        return train_recurrent_ppo(rcfg)
    from agents.ppo.train import train

    cfg = dataclasses.replace(cfg, seed=args.seed, device=args.device, out_dir=str(run_dir),
                              policy="mlp" if args.agent == "mlp" else "transformer",
                              time_limit_s=args.time_limit, compile=args.compile, checkpoint_every=0)
    return train(cfg)


def read_curve(tb_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tb_dir))
    ea.Reload()
    if tag not in ea.Tags().get("scalars", []):
        return []
    return [(e.step, e.value) for e in ea.Scalars(tag)]


def plot(out: Path) -> list[dict]:
    """Rows of every run's summary; learning-curve PNGs when matplotlib is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        plt = None
    rows = []
    for task in TASKS:
        runs = sorted(p for p in out.glob(f"{task}-*") if (p / "summary.json").exists())
        if not runs:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(11, 4)) if plt is not None else (None, ())
        for run in runs:
            summary = json.loads((run / "summary.json").read_text())
            label = run.name[len(task) + 1:]
            rows.append({"task": task, "run": label, **{k: summary.get(k) for k in (
                "global_step", "success_rate", "train_success_rate", "final_return", "eval_return", "sps", "wall_s",
                "gpu_max_mem_allocated_mb")}})
            for ax, tag in zip(axes, ("charts/success_rate", "charts/episodic_return")):
                curve = read_curve(run / "tb", tag)
                if curve:
                    ax.plot([s for s, _ in curve], [v for _, v in curve], label=label)
                    ax.set_title(f"{task}: {tag.split('/')[1]}")
                    ax.set_xlabel("env steps")
        if fig is None:
            continue
        for ax in axes:
            if ax.lines:
                ax.legend()
            else:  # e.g. no success rate on POPGym tasks: no empty panel
                ax.set_visible(False)
        fig.tight_layout()
        fig.savefig(out / f"{task}.png", dpi=120)
        plt.close(fig)
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def table(rows: list[dict]) -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    lines = ["| task | run | steps | success (eval) | success (train) | return | SPS | wall s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['run']} | {f(r['global_step'], 'd')} | {f(r['success_rate'], '.2f')} | "
                     f"{f(r['train_success_rate'], '.2f')} | {f(r['final_return'], '.3f')} | {f(r['sps'], '.0f')} | "
                     f"{f(r['wall_s'], '.0f')} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    args = tyro.cli(Args, args=argv, description=__doc__)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.agent != "plot":
        result = run_one(args)
        print(json.dumps({k: v for k, v in result.items() if k != "config"}, indent=2))
    rows = plot(out)
    (out / "results.md").write_text(table(rows) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()

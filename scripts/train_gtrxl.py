"""Train PPO with a GTrXL memory (or any causal rlformer encoder, or a memoryless MLP).

    python scripts/train_gtrxl.py --env rlformer/TMaze-v0 --device cpu          # preset: corridor 10
    python scripts/train_gtrxl.py --env rlformer/TMaze-v0 --env-kwargs.corridor-length 8 --policy mlp
    python scripts/train_gtrxl.py --env rlformer/RepeatFirst-v0 --backbone.n-layers 3 --backbone.position xl
    python scripts/train_gtrxl.py --out-dir runs/x --resume                     # continue a run

``--env`` picks the preset (agents/ppo/config.py: PRESETS) that every other flag overrides;
``--preset tmaze-long`` (with ``--env-kwargs.corridor-length``) is the GPU long-corridor preset.
Writes TensorBoard scalars, checkpoints and summary.json to --out-dir (default runs/<name>/).
"""
from __future__ import annotations

import argparse
import json
import sys

import tyro

from agents.ppo.config import PPOConfig, preset_for, tmaze_long
from agents.ppo.train import train


def default_config(argv: list[str]) -> tuple[PPOConfig, list[str]]:
    """The preset selected by ``--env`` (and ``--preset``); returns it and the remaining argv."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--env", default=PPOConfig.env)
    pre.add_argument("--preset", default=None, choices=["tmaze-long"])
    pre.add_argument("--env-kwargs.corridor-length", dest="corridor", type=int, default=None)
    known, _ = pre.parse_known_args(argv)
    rest = [a for a in argv if a not in ("--preset", known.preset) and not a.startswith("--preset=")]
    if known.preset == "tmaze-long":
        return tmaze_long(known.corridor or 200), rest
    return preset_for(known.env), rest


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    default, rest = default_config(argv)
    cfg = tyro.cli(PPOConfig, default=default, args=rest, description=__doc__)
    summary = train(cfg)
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2))
    return summary


if __name__ == "__main__":
    main()

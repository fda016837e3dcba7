"""Train a Decision Transformer on a Minari dataset and evaluate it (the README's quick start).

    python scripts/train_dt.py --env hopper-medium                       # quick preset (minutes on CPU)
    python scripts/train_dt.py --env hopper-medium --preset paper        # Chen et al.: 100k updates
    python scripts/train_dt.py --env hopper-medium --model bc            # baselines: bc, hf
    python scripts/train_dt.py --env hopper-medium --backbone.memory xl --backbone.position rope
    python scripts/train_dt.py --out-dir runs/x --resume                 # continue from the latest checkpoint

Writes runs/<model>-<env>-<preset>-seed<seed>/ (or --out-dir): TensorBoard scalars (tb/),
checkpoints (checkpoints/), summary.json.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, not installed

import tyro

from agents.dt.config import DTConfig


def main(argv: list[str] | None = None) -> dict:
    """Parse ``argv`` (default: sys.argv[1:]), train, evaluate; returns the summary dict."""
    from envs.datasets import DatasetError, exit_with_message

    cfg = tyro.cli(DTConfig, args=argv, description=__doc__)
    try:
        from agents.dt.train import train

        return train(cfg)
    except DatasetError as e:
        exit_with_message(e)
    except (ValueError, ImportError) as e:  # bad flag combinations, missing optional extras: no traceback
        exit_with_message(e)


if __name__ == "__main__":
    main()

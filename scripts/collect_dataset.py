"""Build a Minari dataset locally (offline) with the recipe of Minari's MuJoCo datasets.

    python scripts/collect_dataset.py --env hopper-medium               # shipped SAC policy
    python scripts/collect_dataset.py --env hopper-medium --steps 20000 --root /tmp/minari
    python scripts/collect_dataset.py --env walker2d-medium --target-return 3000   # trains SAC first
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, not installed

import tyro

from envs.collect import CollectConfig, CollectResult, collect
from envs.datasets import DatasetError, exit_with_message


def main(argv: list[str] | None = None) -> CollectResult:
    """Parse ``argv`` (default: sys.argv[1:]), build the dataset, print a summary."""
    cfg = tyro.cli(CollectConfig, args=argv, description=__doc__)
    try:
        return collect(cfg)
    except DatasetError as e:
        exit_with_message(e)


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    main()

"""Shared pytest fixtures. torch gets one thread: CI machines have 2 cores and OpenMP spins."""
from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"  # in CI the repo is a fresh clone with shared/ beside it


# ---------------------------------------------------------------- datasets


@pytest.fixture(scope="session")
def hopper_medium_small(tmp_path_factory):
    """A real 20k-step prefix of ``mujoco/hopper/medium-v0``, built once per session.

    Built with ``envs.collect`` (shipped SAC policy, episode i seeded 123+i, 2 workers)
    into a temporary Minari store; ``MINARI_DATASETS_PATH`` points there for the rest of
    the session and is restored afterwards. Yields ``.root``, ``.dataset_id``, ``.name``,
    ``.steps``, ``.episodes``, ``.seconds`` (build time).
    """
    from envs.collect import CollectConfig, collect, default_policy

    policy = default_policy("hopper-medium")
    if policy is None:
        pytest.skip(
            "no hopper-medium behaviour policy: neither policies/hopper_medium_sac.zip nor "
            f"{SHARED_DIR / 'datasets' / 'hopper_medium_sac.zip'} exists"
        )
    root = tmp_path_factory.mktemp("minari")
    t0 = time.perf_counter()
    built = collect(CollectConfig(env="hopper-medium", policy=str(policy), steps=20_000, workers=2, root=str(root)))
    seconds = time.perf_counter() - t0
    print(f"\n[hopper_medium_small] built {built.steps} steps / {built.episodes} episodes in {seconds:.1f} s")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINARI_DATASETS_PATH", str(root))
        yield SimpleNamespace(
            root=root, dataset_id=built.dataset_id, name="hopper-medium",
            steps=built.steps, episodes=built.episodes, seconds=seconds,
        )

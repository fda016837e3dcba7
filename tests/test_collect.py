"""The local dataset builder: CLI, overwrite guard, parity with the shared rebuild, SAC training."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import minari
import numpy as np
import pytest

import envs.datasets as ds
from envs.collect import CollectConfig, collect, default_policy

REPO_ROOT = Path(__file__).resolve().parents[1]
REBUILD = REPO_ROOT.parent / "shared" / "datasets" / "rebuild_hopper_medium.py"
HOPPER_ID = "mujoco/hopper/medium-v0"


def _cli():
    spec = importlib.util.spec_from_file_location("collect_dataset_cli", REPO_ROOT / "scripts" / "collect_dataset.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def _load(root: Path, did: str = HOPPER_ID) -> minari.MinariDataset:
    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(root)
    try:
        return minari.load_dataset(did)
    finally:
        if old is None:
            os.environ.pop("MINARI_DATASETS_PATH")
        else:
            os.environ["MINARI_DATASETS_PATH"] = old


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    """``collect_dataset.py --env hopper-medium --steps 2000 --workers 1`` into a temporary store."""
    if default_policy("hopper-medium") is None:
        pytest.skip("no hopper-medium behaviour policy (policies/ or ../shared/datasets/)")
    root = tmp_path_factory.mktemp("cli_store")
    result = _cli()(["--env", "hopper-medium", "--steps", "2000", "--workers", "1", "--root", str(root)])
    return root, result


def test_cli_builds_a_small_dataset(tiny_build, capsys):
    root, result = tiny_build
    assert result.dataset_id == HOPPER_ID and result.root == root.resolve()
    assert 2000 <= result.steps < 3000 and result.episodes == len(result.returns)
    data = _load(root)
    assert data.total_steps == result.steps and data.total_episodes == result.episodes
    assert data.observation_space.shape == (11,) and data.action_space.shape == (3,)
    returns = np.array([e.rewards.sum() for e in data.iterate_episodes()])
    np.testing.assert_allclose(returns, result.returns)
    meta = data.storage.metadata
    assert meta["ref_min_score"] == -20.272305 and meta["ref_max_score"] == 3234.3
    assert meta["requirements"] and "NOT the official" in meta["description"]
    assert "MINARI_DATASETS_PATH" not in os.environ or os.environ["MINARI_DATASETS_PATH"] != str(root.resolve())


def test_cli_refuses_to_overwrite_unless_asked(tiny_build, tmp_path, capsys):
    _, big = tiny_build
    main = _cli()
    args = ["--env", "hopper-medium", "--workers", "1", "--root", str(tmp_path)]
    first = main(args + ["--steps", "600"])
    with pytest.raises(SystemExit) as stop:
        main(args + ["--steps", "300"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err and "Traceback" not in err
    assert _load(tmp_path).total_steps == first.steps  # untouched

    again = main(args + ["--steps", "300", "--overwrite"])
    assert 300 <= again.steps < first.steps and _load(tmp_path).total_steps == again.steps
    # smaller builds are prefixes of larger ones: episodes are seeded one by one
    np.testing.assert_array_equal(again.returns, big.returns[: again.episodes])
    np.testing.assert_array_equal(first.returns, big.returns[: first.episodes])


def test_cli_bad_policy_path_is_a_clean_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _cli()(["--env", "hopper-medium", "--policy", str(tmp_path / "nope.zip"), "--root", str(tmp_path)])
    assert "no such file" in capsys.readouterr().err


@pytest.mark.skipif(not REBUILD.is_file(), reason=f"{REBUILD} is absent")
def test_matches_the_shared_rebuild_script(tiny_build, tmp_path):
    root, _ = tiny_build
    policy = default_policy("hopper-medium")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(REBUILD), "--policy", str(policy), "--root", str(tmp_path),
                    "--steps", "2000", "--workers", "1"], check=True, capture_output=True, env=env, timeout=300)
    ours, theirs = _load(root), _load(tmp_path)
    assert ours.total_steps == theirs.total_steps and ours.total_episodes == theirs.total_episodes
    for a, b in zip(ours.iterate_episodes(), theirs.iterate_episodes()):
        np.testing.assert_array_equal(a.observations, b.observations)
        np.testing.assert_array_equal(a.actions, b.actions)
        np.testing.assert_array_equal(a.rewards, b.rewards)
        np.testing.assert_array_equal(a.terminations, b.terminations)


def test_trains_sac_to_a_target_then_builds(tmp_path):
    """No shipped policy: SB3 SAC trains, stops at the first evaluation that reaches the target."""
    cfg = CollectConfig(env="invertedpendulum-medium", steps=300, workers=1, root=str(tmp_path / "store"),
                        train_steps=2000, eval_every=200, eval_episodes=2, target_return=1.0,
                        save_policy=str(tmp_path / "pi"))
    result = collect(cfg)
    assert result.policy == tmp_path / "pi.zip" and result.policy.is_file()
    from stable_baselines3 import SAC

    assert SAC.load(result.policy, device="cpu").num_timesteps == 200  # stopped early, at the target
    data = _load(tmp_path / "store", "mujoco/invertedpendulum/medium-v0")
    assert data.total_steps == result.steps >= 300 and data.observation_space.shape == (4,)
    assert "ref_min_score" not in data.storage.metadata  # none known for this task: none invented
    with pytest.raises(ds.DatasetError, match="no reference scores"):
        ds.reference_scores(data)


def test_default_policy_lookup():
    assert default_policy("walker2d-medium") is None
    p = default_policy("hopper-medium")
    assert p is None or p.name == "hopper_medium_sac.zip"
    with pytest.raises(ValueError, match="steps and workers must be positive"):
        collect(CollectConfig(steps=0))


def test_behaviour_policy_probe_modes():
    """scripts/behaviour_policy_probe.py: deterministic = SB3's deterministic action, the conditional mean = the
    average of many stochastic actions (what an MSE imitator converges to), and a short rollout reports all modes."""
    import torch
    from stable_baselines3 import SAC

    policy = default_policy("hopper-medium")
    if policy is None:
        pytest.skip("no shipped hopper-medium behaviour policy")
    spec = importlib.util.spec_from_file_location("behaviour_policy_probe",
                                                  Path(__file__).resolve().parents[1] / "scripts" / "behaviour_policy_probe.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    torch.set_num_threads(1)
    model = SAC.load(str(policy), device="cpu")
    obs = torch.as_tensor(np.random.default_rng(0).normal(size=(4, 11)), dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        det = mod.policy_actions(model.policy.actor, obs, "deterministic", 1, gen)
        np.testing.assert_allclose(det.numpy(), model.predict(obs.numpy(), deterministic=True)[0], atol=1e-6)
        draws = torch.stack([mod.policy_actions(model.policy.actor, obs, "stochastic", 1, gen) for _ in range(4000)])
        cond = mod.policy_actions(model.policy.actor, obs, "conditional_mean", 4000, gen)
    assert draws.abs().max() <= 1 and torch.allclose(cond, draws.mean(0), atol=0.03)
    assert (cond - det).abs().max() > 1e-3               # the squash makes the mean action differ from tanh(mu)
    with pytest.raises(ValueError, match="mode"):
        mod.policy_actions(model.policy.actor, obs, "median", 1, gen)
    rows = mod.main(mod.Args(policy=str(policy), episodes=2, samples=8))
    assert [r["mode"] for r in rows] == ["deterministic", "conditional_mean", "stochastic"]
    assert all(0 < r["length_mean"] <= 1000 and 0 <= r["fell_share"] <= 1 for r in rows)

"""Dataset names, local-first resolution, offline errors, and reference scores."""
from __future__ import annotations

import re
import socket
import time

import gymnasium as gym
import minari
import numpy as np
import pytest
from minari.data_collector import EpisodeBuffer

import envs.datasets as ds

HOPPER_ID = "mujoco/hopper/medium-v0"
D4RL_HOPPER = (-20.272305, 3234.3)


@pytest.fixture
def empty_store(tmp_path, monkeypatch):
    """An empty Minari store, and a hub that must never be contacted."""
    store = tmp_path / "store"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(store))

    def no_network(*a, **k):
        raise AssertionError("the test tried to reach Minari's hub")

    monkeypatch.setattr(ds, "_hub_reachable", lambda *a, **k: False)
    monkeypatch.setattr(ds, "_download", no_network)
    monkeypatch.setattr(minari, "download_dataset", no_network)
    return store


def _tiny_dataset(did: str, episodes: int = 2, length: int = 5, **kwargs) -> minari.MinariDataset:
    """A small real Hopper-v5 dataset (random actions) in the current store."""
    env = gym.make("Hopper-v5")
    buffers = []
    for i in range(episodes):
        obs, _ = env.reset(seed=i)
        env.action_space.seed(i)
        O, A, R = [obs], [], []
        for _ in range(length):
            a = env.action_space.sample()
            obs, r, *_ = env.step(a)
            O.append(obs); A.append(a); R.append(r)
        buffers.append(EpisodeBuffer(id=i, seed=i, observations=np.array(O), actions=np.array(A), rewards=R,
                                     terminations=[False] * length, truncations=[False] * (length - 1) + [True]))
    return minari.create_dataset_from_buffers(
        dataset_id=did, buffer=buffers, env="Hopper-v5", eval_env="Hopper-v5", algorithm_name="random",
        author="tests", author_email="tests@localhost", code_permalink="tests/test_datasets.py",
        description="tiny random-action test data", data_format="hdf5", **kwargs)


# ---------------------------------------------------------------- names


def test_every_short_name_maps_to_a_well_formed_minari_id():
    assert ds.dataset_id("hopper-medium") == HOPPER_ID
    assert len(ds.SHORT_NAMES) >= 20
    for name, did in ds.SHORT_NAMES.items():
        env, level = name.rsplit("-", 1)
        assert did == f"mujoco/{env}/{level}-v0", name
        assert re.fullmatch(r"mujoco/[a-z0-9]+/(simple|medium|expert)-v0", did)
        assert ds.dataset_id(name) == did and ds.short_name(did) == name
        assert ds.gym_env_id(name).endswith("-v5") and ds.gym_env_id(name).lower().startswith(env[:4])
        assert ds.build_command(did) == f"python scripts/collect_dataset.py --env {name}"
    for family in ("ant", "halfcheetah", "hopper", "walker2d", "pusher", "reacher", "swimmer"):
        assert f"{family}-medium" in ds.SHORT_NAMES and f"{family}-expert" in ds.SHORT_NAMES


def test_full_minari_ids_pass_through():
    assert ds.dataset_id(HOPPER_ID) == HOPPER_ID
    assert ds.dataset_id("D4RL/door/human-v2") == "D4RL/door/human-v2"
    assert ds.short_name("D4RL/door/human-v2") is None
    assert ds.build_command("D4RL/door/human-v2").endswith("--env D4RL/door/human-v2")


def test_unknown_name_lists_close_matches():
    with pytest.raises(ds.UnknownDatasetError) as err:
        ds.dataset_id("hoper-medium")
    assert isinstance(err.value, ValueError) and isinstance(err.value, ds.DatasetError)
    msg = str(err.value)
    assert "'hoper-medium'" in msg and "Did you mean 'hopper-medium'" in msg
    with pytest.raises(ds.UnknownDatasetError, match="halfcheetah-medium"):
        ds.resolve_dataset("half-cheetah-medium")
    with pytest.raises(ds.UnknownDatasetError, match="full Minari id"):
        ds.load_dataset("zzz", download=False)


# ---------------------------------------------------------------- resolution


@pytest.mark.parametrize("download", [True, False])
def test_missing_dataset_fails_fast_with_an_actionable_message(empty_store, download):
    t0 = time.perf_counter()
    with pytest.raises(ds.DatasetNotFoundError) as err:
        ds.load_dataset("hopper-medium", download=download)
    assert time.perf_counter() - t0 < 2.0
    msg = str(err.value)
    assert HOPPER_ID in msg
    assert str(empty_store / "mujoco" / "hopper" / "medium-v0") in msg
    assert "python scripts/collect_dataset.py --env hopper-medium" in msg
    assert ("cannot be reached" in msg) if download else ("downloading is off" in msg)
    assert isinstance(err.value, FileNotFoundError)


def test_failed_download_is_reported_with_its_reason(empty_store, monkeypatch):
    calls = []

    def failing_download(did):
        calls.append(did)
        raise ValueError("Couldn't find any version for dataset")

    monkeypatch.setattr(ds, "_hub_reachable", lambda *a, **k: True)
    monkeypatch.setattr(ds, "_download", failing_download)
    with pytest.raises(ds.DatasetNotFoundError, match="download failed .*Couldn't find") as err:
        ds.resolve_dataset("walker2d-medium")
    assert calls == ["mujoco/walker2d/medium-v0"]
    assert "--env walker2d-medium" in str(err.value)


def test_hub_probe_is_a_bounded_local_connect():
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        port = srv.getsockname()[1]
        assert ds._hub_reachable(timeout=1.0, host="127.0.0.1", port=port)
    t0 = time.perf_counter()
    assert not ds._hub_reachable(timeout=1.0, host="127.0.0.1", port=port)  # closed now
    assert time.perf_counter() - t0 < 1.5


def test_local_copy_is_found_first(empty_store):
    built = _tiny_dataset(HOPPER_ID)
    assert ds.is_local("hopper-medium") and ds.local_root() == empty_store
    assert ds.resolve_dataset("hopper-medium") == HOPPER_ID  # download=True, but never reaches the hub
    for name in ("hopper-medium", HOPPER_ID):
        data = ds.load_dataset(name, download=True)
        assert isinstance(data, minari.MinariDataset)
        assert data.total_steps == built.total_steps == 10 and data.spec.dataset_id == HOPPER_ID


# ---------------------------------------------------------------- reference scores


def test_reference_scores_fall_back_to_d4rl_and_prefer_metadata(empty_store):
    no_refs = _tiny_dataset(HOPPER_ID)
    assert ds.reference_scores(no_refs) == (*D4RL_HOPPER, "D4RL")
    assert ds.reference_scores("hopper-medium").source == "D4RL"
    assert ds.reference_scores("halfcheetah-medium") == (-280.178953, 12135.0, "D4RL")  # no local copy needed
    assert ds.reference_scores("walker2d-expert")[:2] == (1.629008, 4592.3)

    with_refs = _tiny_dataset("mujoco/hopper/expert-v0", ref_min_score=10.0, ref_max_score=110.0)
    assert ds.reference_scores(with_refs) == (10.0, 110.0, "minari metadata")
    assert ds.reference_scores("hopper-expert") == (10.0, 110.0, "minari metadata")
    assert ds.normalized_score(60.0, with_refs) == pytest.approx(50.0)

    with pytest.raises(ds.DatasetError, match="no reference scores .*pusher"):
        ds.reference_scores("pusher-expert")


def test_normalized_score_on_known_values():
    assert ds.normalized_score(D4RL_HOPPER[1], D4RL_HOPPER) == pytest.approx(100.0)
    assert ds.normalized_score(D4RL_HOPPER[0], D4RL_HOPPER) == pytest.approx(0.0)
    assert ds.normalized_score(1721.1, D4RL_HOPPER) == pytest.approx(53.5, abs=0.05)  # the shared README's mean
    assert ds.normalized_score(0.0, (-100.0, 100.0)) == 50.0
    out = ds.normalized_score([-100.0, 300.0], (-100.0, 100.0))
    np.testing.assert_allclose(out, [0.0, 200.0])
    assert isinstance(ds.normalized_score(1.0, (0.0, 2.0)), float)
    with pytest.raises(ValueError, match="must differ"):
        ds.normalized_score(1.0, (5.0, 5.0))


# ---------------------------------------------------------------- the built prefix


def test_hopper_medium_prefix_loads_with_minari(hopper_medium_small):
    data = ds.load_dataset(hopper_medium_small.name, download=False)
    assert data.spec.dataset_id == HOPPER_ID == hopper_medium_small.dataset_id
    assert 20_000 <= data.total_steps < 21_000 and data.total_steps == hopper_medium_small.steps
    assert data.observation_space.shape == (11,) and data.action_space.shape == (3,)
    ep = data[0]
    assert ep.observations.shape == (len(ep.actions) + 1, 11) and ep.actions.shape[1:] == (3,)
    assert [e.id for e in data.iterate_episodes()] == list(range(data.total_episodes))
    seeds = [m["seed"] for m in data.storage.get_episode_metadata(range(data.total_episodes))]
    assert seeds == [123 + i for i in range(data.total_episodes)]  # episode i seeded 123 + i
    meta = data.storage.metadata
    assert meta["ref_min_score"] == D4RL_HOPPER[0] and meta["ref_max_score"] == D4RL_HOPPER[1]
    assert "Local rebuild" in meta["description"] and meta["algorithm_name"] == "sb3/SAC"
    assert data.spec.env_spec.id == "Hopper-v5" and data.recover_environment(eval_env=True).spec.id == "Hopper-v5"
    assert ds.reference_scores(data) == (*D4RL_HOPPER, "minari metadata")

    returns = np.array([e.rewards.sum() for e in data.iterate_episodes()])
    assert 800 < returns.mean() < 3300  # the medium mixture of ~1,000 and ~3,200 episodes
    np.testing.assert_allclose(ds.normalized_score(returns, data), 100 * minari.get_normalized_score(data, returns))

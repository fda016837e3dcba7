"""Tests for the memory tasks, POMDP wrappers, adapters and id registration (envs/)."""

from __future__ import annotations

import importlib
import itertools
import math
import sys
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

from envs import registration
from envs.tasks import RepeatFirstEnv, TMazeEnv
from envs.wrappers import MaskVelocity, make_pomdp, position_indices

torch.set_num_threads(1)

OPTIONAL_MODULE = {"POPGym": "popgym", "MiniGrid": "minigrid"}


def _skip_if_optional_missing(env_id: str) -> None:
    for key, module in OPTIONAL_MODULE.items():
        if key in env_id:
            pytest.importorskip(module)


def _binomial_tol(p: float, n: int, z: float = 4.0) -> float:
    return z * math.sqrt(p * (1 - p) / n)


def _strip_make_wrappers(env: gym.Env) -> gym.Env:
    """Remove the wrappers gymnasium.make adds (time limit, order enforcing, checker)."""
    make_wrappers = (gym.wrappers.TimeLimit, gym.wrappers.OrderEnforcing, gym.wrappers.PassiveEnvChecker)
    while isinstance(env, make_wrappers):
        env = env.env
    return env


# --------------------------------------------------------------------------- registry
@pytest.mark.parametrize("env_id", registration.all_ids())
def test_registered_id_passes_env_checker_and_make(env_id):
    _skip_if_optional_missing(env_id)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        env = gym.make(env_id)
        check_env(env.unwrapped, skip_render_check=True)
        inner = _strip_make_wrappers(env)
        if inner is not env.unwrapped:  # an rlformer wrapper (MaskVelocity, ...): check it too
            check_env(inner, skip_render_check=True)
    obs, _ = env.reset(seed=0)
    env.action_space.seed(0)
    assert env.observation_space.contains(obs)
    reports_success = any(k in env_id for k in ("TMaze", "RepeatFirst", "MiniGrid"))
    for _ in range(30):
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        assert env.observation_space.contains(obs)
        assert isinstance(reward, (float, np.floating, int))
        if terminated or truncated:
            if reports_success:
                assert isinstance(info["success"], bool)
            obs, _ = env.reset()
    env.close()


@pytest.mark.parametrize("env_id", registration.all_ids())
def test_registered_id_vectorizes(env_id):
    _skip_if_optional_missing(env_id)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        envs_ = [
            gym.make_vec(env_id, num_envs=2, vectorization_mode="sync"),
            gym.vector.SyncVectorEnv([lambda: gym.make(env_id) for _ in range(2)]),
        ]
    for venv in envs_:
        obs, _ = venv.reset(seed=1)
        assert obs.shape == (2, *venv.single_observation_space.shape)
        venv.action_space.seed(1)
        for _ in range(15):
            obs, reward, _, _, _ = venv.step(venv.action_space.sample())
            assert obs.shape[0] == reward.shape[0] == 2
        venv.close()


def test_registration_is_idempotent_and_kwargs_pass_through():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an "Overriding environment" warning would fail
        importlib.reload(registration)
        registration.register_all()
    tmaze = gym.make("rlformer/TMaze-v0", corridor_length=200)
    assert tmaze.unwrapped.corridor_length == 200
    assert tmaze.unwrapped.max_steps == 402
    rf = gym.make("rlformer/RepeatFirst-v0", delay=7, num_symbols=3)
    assert (rf.unwrapped.delay, rf.unwrapped.num_symbols) == (7, 3)
    assert rf.action_space == gym.spaces.Discrete(3)
    cp = gym.make("rlformer/CartPole-P-v0", max_episode_steps=50)
    assert cp.spec.max_episode_steps == 50
    assert gym.make("rlformer/CartPole-P-v0").spec.max_episode_steps == 500


# --------------------------------------------------------------------------- T-maze
def _run_tmaze(env: gym.Env, policy, seed: int):
    """policy(obs, memory) -> (action, memory); returns (success, length, terminated, truncated)."""
    obs, _ = env.reset(seed=seed)
    memory, steps = None, 0
    while True:
        action, memory = policy(obs, memory)
        obs, _, terminated, truncated, info = env.step(action)
        steps += 1
        if terminated or truncated:
            return info["success"], steps, terminated, truncated


def tmaze_memory_policy(obs, memory):
    if memory is None:  # t = 0: store the cue
        memory = "up" if obs[0] == 1.0 else "down"
    if obs[2] == 1.0:
        return (TMazeEnv.UP if memory == "up" else TMazeEnv.DOWN), memory
    return TMazeEnv.FORWARD, memory


def tmaze_best_memoryless(obs, memory):
    return (TMazeEnv.UP if obs[2] == 1.0 else TMazeEnv.FORWARD), None


def tmaze_cue_stalling(obs, memory):
    """Memoryless, but tries to store the cue in the position (stall one step on 'down')."""
    if obs[1] == 1.0:
        return TMazeEnv.BACK, None
    return tmaze_best_memoryless(obs, None)


def test_tmaze_memory_policy_always_succeeds_in_optimal_time():
    for L in (1, 10, 50):
        env = gym.make("rlformer/TMaze-v0", corridor_length=L)
        results = [_run_tmaze(env, tmaze_memory_policy, seed) for seed in range(100)]
        assert all(r[0] for r in results)
        assert all(r[1] == L + 1 and r[2] and not r[3] for r in results)


@pytest.mark.parametrize("policy", [tmaze_best_memoryless, tmaze_cue_stalling])
def test_tmaze_memoryless_policies_are_at_chance(policy):
    env = gym.make("rlformer/TMaze-v0", corridor_length=10)
    n = 400
    rate = np.mean([_run_tmaze(env, policy, seed)[0] for seed in range(n)])
    assert abs(rate - 0.5) < _binomial_tol(0.5, n), rate


def test_tmaze_no_deterministic_memoryless_policy_beats_chance():
    """Exhaustive over all 4^5 reactive policies of a corridor of length 2."""
    env = TMazeEnv(corridor_length=2)
    seeds = {}
    for seed in range(20):
        env.reset(seed=seed)
        seeds.setdefault(env.goal_up, seed)
    assert set(seeds) == {True, False}
    obs_keys = set()
    best = 0.0
    for table in itertools.product(range(4), repeat=5):
        lookup: dict[tuple, int] = {}
        successes = 0
        for seed in seeds.values():
            obs, _ = env.reset(seed=seed)
            while True:
                key = tuple(obs.tolist())
                if key not in lookup:
                    lookup[key] = table[len(lookup)]
                obs, _, terminated, truncated, info = env.step(lookup[key])
                if terminated or truncated:
                    successes += info["success"]
                    break
        obs_keys |= set(lookup)
        best = max(best, successes / 2)
    assert len(obs_keys) <= 5  # the table covered every distinct observation
    assert best == 0.5


def test_tmaze_cue_only_visible_at_t0():
    env = TMazeEnv(corridor_length=6)
    rng = np.random.default_rng(0)
    for seed in range(50):
        actions = rng.integers(4, size=env.max_steps)
        traces = {}
        for goal_up_wanted in (True, False):
            s = seed
            while True:  # find a seed with the wanted cue
                obs0, _ = env.reset(seed=s)
                if env.goal_up == goal_up_wanted:
                    break
                s += 1000
            assert obs0[0] == float(goal_up_wanted) and obs0[1] == float(not goal_up_wanted)
            trace = []
            for a in actions:
                obs, _, terminated, truncated, _ = env.step(int(a))
                trace.append(obs.copy())
                if terminated or truncated:
                    break
            traces[goal_up_wanted] = np.array(trace)
        up, down = traces[True], traces[False]
        assert np.all(up[:, :2] == 0) and np.all(down[:, :2] == 0)
        np.testing.assert_array_equal(up, down)  # same actions -> same observations


def test_tmaze_corridor_length_and_truncation():
    for L in (1, 3, 200):
        env = gym.make("rlformer/TMaze-v0", corridor_length=L)
        success, steps, terminated, truncated = _run_tmaze(env, lambda o, m: (TMazeEnv.BACK, None), 0)
        assert (success, steps, terminated, truncated) == (False, 2 * (L + 1), False, True)
    # choosing on the very last allowed step is a termination, not a truncation
    env = gym.make("rlformer/TMaze-v0", corridor_length=4, max_steps=5)
    success, steps, terminated, truncated = _run_tmaze(env, tmaze_memory_policy, 3)
    assert (success, steps, terminated, truncated) == (True, 5, True, False)
    env = gym.make("rlformer/TMaze-v0", corridor_length=4, max_steps=7)
    assert _run_tmaze(env, lambda o, m: (TMazeEnv.BACK, None), 0)[1:] == (7, False, True)


def test_tmaze_rewards_and_lag_penalty():
    env = TMazeEnv(corridor_length=3, wrong_reward=-0.5, lag_penalty=-0.1)
    env.reset(seed=0)
    wrong = TMazeEnv.DOWN if env.goal_up else TMazeEnv.UP
    rewards = [env.step(a)[1] for a in (TMazeEnv.BACK, 0, 0, 0)]
    assert rewards == pytest.approx([-0.1] * 4)  # x < t on every step after stalling once
    _, r, terminated, _, info = env.step(wrong)
    assert terminated and info["success"] is False and r == pytest.approx(-0.6)


def test_tmaze_invalid_arguments_have_clear_errors():
    with pytest.raises(ValueError, match="corridor_length must be an integer >= 1"):
        TMazeEnv(corridor_length=0)
    with pytest.raises(ValueError, match="shortest successful episode"):
        TMazeEnv(corridor_length=10, max_steps=5)
    with pytest.raises(ValueError, match="lag_penalty must be <= 0"):
        TMazeEnv(lag_penalty=0.5)
    env = TMazeEnv()
    env.reset(seed=0)
    with pytest.raises(ValueError, match="0=forward"):
        env.step(7)


def test_tmaze_ansi_render():
    env = TMazeEnv(corridor_length=3, render_mode="ansi")
    env.reset(seed=0)
    assert "A..." in env.render()


# --------------------------------------------------------------------------- RepeatFirst
def _run_repeat_first(env: gym.Env, answer, seed: int):
    """answer(first_obs, obs) -> action; returns (success, steps, query_step)."""
    first, _ = env.reset(seed=seed)
    obs, steps, query_step = first, 0, None
    while True:
        if obs[-1] == 1.0:
            query_step = steps
        obs, reward, terminated, truncated, info = env.step(answer(first, obs))
        steps += 1
        assert not truncated
        if terminated:
            assert reward == float(info["success"])
            return info["success"], steps, query_step


@pytest.mark.parametrize("distractors", [False, True])
def test_repeat_first_memory_policy_always_succeeds(distractors):
    env = gym.make("rlformer/RepeatFirst-v0", delay=5, num_symbols=4, distractors=distractors)
    results = [_run_repeat_first(env, lambda first, obs: int(np.argmax(first[:-1])), s) for s in range(200)]
    assert all(r[0] for r in results)


@pytest.mark.parametrize("num_symbols", [2, 4])
def test_repeat_first_memoryless_is_at_chance(num_symbols):
    env = gym.make("rlformer/RepeatFirst-v0", delay=3, num_symbols=num_symbols)
    n, p = 400, 1.0 / num_symbols
    constant = np.mean([_run_repeat_first(env, lambda f, o: 0, s)[0] for s in range(n)])
    rng = np.random.default_rng(0)
    random_ = np.mean(
        [_run_repeat_first(env, lambda f, o: int(rng.integers(num_symbols)), s)[0] for s in range(n)]
    )
    for rate in (constant, random_):
        assert abs(rate - p) < _binomial_tol(p, n), rate


def test_repeat_first_delay_sets_episode_length_and_hides_symbol():
    for delay in (0, 1, 10, 100):
        env = gym.make("rlformer/RepeatFirst-v0", delay=delay, num_symbols=3)
        _, steps, query_step = _run_repeat_first(env, lambda f, o: 0, seed=delay)
        assert steps == delay + 2 == env.unwrapped.episode_steps
        assert query_step == delay + 1
    env = RepeatFirstEnv(delay=4, num_symbols=3)
    traces = {}
    for seed in range(30):
        first, _ = env.reset(seed=seed)
        assert first.sum() == 1.0 and first[-1] == 0.0
        trace = [env.step(0)[0] for _ in range(env.episode_steps)]
        traces[int(np.argmax(first))] = np.array(trace)
    assert len(traces) == 3
    blanks_and_query = np.zeros((4 + 2, 4), dtype=np.float32)
    blanks_and_query[4, -1] = 1.0  # the query observation
    for trace in traces.values():
        np.testing.assert_array_equal(trace, blanks_and_query)


def test_repeat_first_errors():
    with pytest.raises(ValueError, match="num_symbols must be an integer >= 2"):
        RepeatFirstEnv(num_symbols=1)
    with pytest.raises(ValueError, match="delay must be an integer >= 0"):
        RepeatFirstEnv(delay=-1)
    env = RepeatFirstEnv(delay=0, num_symbols=2)
    env.reset(seed=0)
    env.step(0)
    env.step(0)
    with pytest.raises(RuntimeError, match="call reset"):
        env.step(0)


# --------------------------------------------------------------------------- MaskVelocity
def test_mask_velocity_cartpole_keeps_position_and_angle():
    env = gym.make("rlformer/CartPole-P-v0")
    assert env.observation_space.shape == (2,)
    obs, _ = env.reset(seed=0)
    for _ in range(30):
        state = np.asarray(env.unwrapped.state, dtype=np.float32)
        np.testing.assert_array_equal(obs, state[[0, 2]])
        obs, _, terminated, truncated, _ = env.step(env.action_space.sample())
        if terminated or truncated:
            obs, _ = env.reset()


def test_mask_velocity_pendulum_keeps_cos_sin():
    env = gym.make("rlformer/Pendulum-P-v0")
    obs, _ = env.reset(seed=0)
    for _ in range(10):
        theta = env.unwrapped.state[0]
        np.testing.assert_allclose(obs, [np.cos(theta), np.sin(theta)], rtol=1e-6)
        obs, *_ = env.step(env.action_space.sample())


@pytest.mark.parametrize(
    "env_id,skipped,nq",
    [
        ("rlformer/Hopper-P-v0", 1, 6),
        ("rlformer/HalfCheetah-P-v0", 1, 9),
        ("rlformer/Walker2d-P-v0", 1, 9),
        ("rlformer/Ant-P-v0", 2, 15),
        ("Hopper-v4", 1, 6),
        ("Swimmer-v4", 2, 5),
    ],
)
def test_mask_velocity_mujoco_keeps_qpos(env_id, skipped, nq):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # v4 deprecation
        env = gym.make(env_id) if env_id.startswith("rlformer/") else make_pomdp(env_id)
    assert env.observation_space.shape == (nq - skipped,)
    obs, _ = env.reset(seed=0)
    for _ in range(5):
        np.testing.assert_array_equal(obs, env.unwrapped.data.qpos[skipped:])
        obs, *_ = env.step(env.action_space.sample())


def test_mask_velocity_mujoco_with_current_positions_included():
    env = make_pomdp("Hopper-v5", exclude_current_positions_from_observation=False)
    obs, _ = env.reset(seed=0)
    np.testing.assert_array_equal(obs, env.unwrapped.data.qpos)


def test_mask_velocity_explicit_keep_and_errors():
    env = MaskVelocity(gym.make("CartPole-v1"), keep=[2])
    obs, _ = env.reset(seed=0)
    assert obs.shape == (1,) and obs[0] == np.float32(env.unwrapped.state[2])
    with pytest.raises(ValueError, match="does not know which observation entries"):
        make_pomdp("Reacher-v5")
    with pytest.raises(ValueError, match="flat Box observation space"):
        make_pomdp("FrozenLake-v1")
    with pytest.raises(ValueError, match="another wrapper already changed the observation"):
        MaskVelocity(MaskVelocity(gym.make("CartPole-v1")))
    with pytest.raises(ValueError, match="must be a non-empty list of indices"):
        MaskVelocity(gym.make("CartPole-v1"), keep=[4])
    assert position_indices(gym.make("Acrobot-v1")) == [0, 1, 2, 3]


# --------------------------------------------------------------------------- adapters
def test_adapters_name_the_pip_command_when_packages_are_missing(monkeypatch):
    from envs import adapters

    monkeypatch.setitem(sys.modules, "popgym", None)
    monkeypatch.setitem(sys.modules, "popgym.envs", None)
    monkeypatch.setitem(sys.modules, "minigrid", None)
    with pytest.raises(ImportError, match="pip install popgym"):
        adapters.make_popgym("RepeatPreviousEasy")
    with pytest.raises(ImportError, match="pip install minigrid"):
        adapters.make_minigrid_memory(11)


def test_popgym_adapter_one_hot_observation():
    pytest.importorskip("popgym")
    from envs.adapters import make_popgym

    env = make_popgym("RepeatPreviousMedium")
    obs, _ = env.reset(seed=0)
    assert obs.dtype == np.float32 and obs.sum() == 1.0
    with pytest.raises(ValueError, match="Unknown POPGym env"):
        make_popgym("NotAnEnv")


def test_minigrid_adapter_views_and_success_info():
    pytest.importorskip("minigrid")
    from envs.adapters import make_minigrid_memory

    env = make_minigrid_memory(11, view="rgb")
    obs, _ = env.reset(seed=0)
    assert obs.shape == (56, 56, 3) and obs.dtype == np.uint8
    env = gym.make("rlformer/MiniGrid-MemoryS13Random-v0")
    env.reset(seed=0)
    for _ in range(2000):
        _, reward, terminated, truncated, info = env.step(env.action_space.sample())
        if terminated or truncated:
            assert info["success"] == (terminated and reward > 0)
            break
    else:
        pytest.fail("MiniGrid Memory episode did not end")

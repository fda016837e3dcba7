"""POMDP wrappers: drop velocities so that a policy has to infer them from history.

Source: the "position-only" POMDP benchmarks of Heess et al. 2015 ("Memory-based
control with recurrent neural networks"), Meng et al. 2021, Ni et al. 2022
("Recurrent Model-Free RL Can Be a Strong Baseline for Many POMDPs",
``pomdp-baselines``: ``*-P`` = position only) and POPGym's
PositionOnlyCartPole / PositionOnlyPendulum (Morad et al. 2023).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

__all__ = ["MaskVelocity", "make_pomdp", "masked_env", "position_indices"]

_SUPPORTED = (
    "CartPole, Pendulum, MountainCar, MountainCarContinuous, Acrobot, and MuJoCo "
    "envs whose observation starts with qpos: every v5 env with "
    "`observation_structure` whose first block is qpos (Hopper, HalfCheetah, "
    "Walker2d, Ant, Humanoid, HumanoidStandup, Swimmer, InvertedPendulum) and "
    "the v4 versions of the locomotion envs"
)


def _classic_control_indices(unwrapped: gym.Env) -> list[int] | None:
    """Position entries of the classic-control observations (from their docs)."""
    from gymnasium.envs.classic_control import (
        AcrobotEnv,
        CartPoleEnv,
        Continuous_MountainCarEnv,
        MountainCarEnv,
        PendulumEnv,
    )

    table: list[tuple[type, list[int]]] = [
        (CartPoleEnv, [0, 2]),  # [x, x_dot, theta, theta_dot] -> x, theta
        (PendulumEnv, [0, 1]),  # [cos th, sin th, th_dot] -> cos, sin
        (MountainCarEnv, [0]),  # [position, velocity]
        (Continuous_MountainCarEnv, [0]),
        (AcrobotEnv, [0, 1, 2, 3]),  # [cos1, sin1, cos2, sin2, dth1, dth2]
    ]
    for cls, keep in table:
        if isinstance(unwrapped, cls):
            return keep
    return None


def _horizontal_root_coords(model: Any) -> int:
    """Number of leading qpos entries that are the root's horizontal (x, y) position.

    A free root joint stores ``x, y, z, quat`` -> 2; planar robots use slide joints,
    of which we count the leading ones with a horizontal axis (Hopper: rootx -> 1,
    Swimmer: slider x and y -> 2).
    """
    mjFREE, mjSLIDE = 0, 2
    if model.njnt == 0:
        return 0
    if int(model.jnt_type[0]) == mjFREE:
        return 2
    count = 0
    for j in range(model.njnt):
        if int(model.jnt_type[j]) != mjSLIDE or abs(float(model.jnt_axis[j][2])) > 1e-6:
            break
        count += 1
    return count


def _mujoco_indices(unwrapped: gym.Env) -> list[int] | None:
    """Position entries of a MuJoCo observation, derived from the model, or None."""
    model = getattr(unwrapped, "model", None)
    if model is None or not hasattr(model, "nq"):
        return None
    obs_dim = int(np.prod(unwrapped.observation_space.shape))
    structure = getattr(unwrapped, "observation_structure", None)
    if isinstance(structure, dict):
        blocks = [(k, int(v)) for k, v in structure.items() if k != "skipped_qpos"]
        if (
            len(blocks) >= 2
            and blocks[0][0] == "qpos"
            and blocks[1][0] == "qvel"
            and sum(v for _, v in blocks) == obs_dim
        ):
            return list(range(blocks[0][1]))
        return None
    if hasattr(unwrapped, "_exclude_current_positions_from_observation"):  # v4 envs
        skipped = (
            _horizontal_root_coords(model) if unwrapped._exclude_current_positions_from_observation else 0
        )
        n_pos = int(model.nq) - skipped
        if n_pos + int(model.nv) <= obs_dim:
            return list(range(n_pos))
    return None


def position_indices(env: gym.Env) -> list[int]:
    """Indices of the position entries of ``env``'s (unwrapped) observation vector.

    Raises ``ValueError`` naming the supported envs when it cannot tell.
    """
    unwrapped = env.unwrapped
    keep = _classic_control_indices(unwrapped)
    if keep is None:
        keep = _mujoco_indices(unwrapped)
    if keep is None:
        name = unwrapped.spec.id if unwrapped.spec is not None else type(unwrapped).__name__
        raise ValueError(
            f"MaskVelocity does not know which observation entries of {name!r} are "
            f"positions. Supported: {_SUPPORTED}. For another env pass the indices "
            f"to keep explicitly, e.g. MaskVelocity(env, keep=[0, 2])."
        )
    return keep


class MaskVelocity(gym.ObservationWrapper, gym.utils.RecordConstructorArgs):
    """Keep only the position components of a flat Box observation (drop velocities).

    CartPole keeps ``[x, theta]``, Pendulum ``[cos th, sin th]``, MuJoCo envs the
    qpos block (e.g. Hopper-v5: ``qpos[1:]``, 5 of 11 entries; Ant-v5: ``qpos[2:]``,
    13 of 105, which also drops the contact forces).  For MuJoCo the split is
    read from ``env.unwrapped.observation_structure`` (v5) or derived from the
    model (``nq`` and the root joint) plus ``exclude_current_positions_from_observation``
    (v4).  ``keep`` overrides the automatic choice.

    Wrap the env *before* any wrapper that changes the observation: the indices
    refer to the unwrapped env's observation vector.
    """

    def __init__(self, env: gym.Env, keep: Sequence[int] | None = None):
        gym.utils.RecordConstructorArgs.__init__(self, keep=None if keep is None else list(keep))
        gym.ObservationWrapper.__init__(self, env)
        space = env.observation_space
        if not isinstance(space, spaces.Box) or len(space.shape) != 1:
            raise ValueError(
                f"MaskVelocity needs a flat Box observation space, got {space}; wrap the "
                f"state-based env itself (not a pixel or dict wrapper)."
            )
        if keep is None:
            if env.unwrapped.observation_space.shape != space.shape:
                raise ValueError(
                    f"The observation space of this env {space.shape} differs from the "
                    f"unwrapped env's {env.unwrapped.observation_space.shape}, so another "
                    f"wrapper already changed the observation. Apply MaskVelocity to the "
                    f"base env first, or pass keep=[...] explicitly."
                )
            keep = position_indices(env)
        keep_arr = np.asarray(keep, dtype=np.int64)
        if keep_arr.ndim != 1 or keep_arr.size == 0 or keep_arr.min() < 0 or keep_arr.max() >= space.shape[0]:
            raise ValueError(
                f"keep={list(keep)} must be a non-empty list of indices in [0, {space.shape[0]})."
            )
        self.keep = keep_arr
        self.observation_space = spaces.Box(
            low=space.low[keep_arr], high=space.high[keep_arr], dtype=space.dtype
        )

    def observation(self, observation: np.ndarray) -> np.ndarray:
        return np.asarray(observation)[self.keep].astype(self.observation_space.dtype, copy=True)


def _raw_env(env_id: str, **kwargs: Any) -> gym.Env:
    """The registered env of ``env_id`` without make()'s TimeLimit/checker wrappers."""
    spec = gym.spec(env_id)
    entry = spec.entry_point
    creator = entry if callable(entry) else gym.envs.registration.load_env_creator(entry)
    return creator(**{**spec.kwargs, **kwargs})


def masked_env(base_id: str, keep: Sequence[int] | None = None, **kwargs: Any) -> MaskVelocity:
    """Registry entry point for the ``rlformer/*-P-v0`` ids.

    Builds ``base_id`` without wrappers and applies :class:`MaskVelocity`;
    ``gymnasium.make`` then adds the checker, order enforcing and the time limit
    (registered with the base env's ``max_episode_steps``, overridable with
    ``gymnasium.make(id, max_episode_steps=...)``).
    """
    return MaskVelocity(_raw_env(base_id, **kwargs), keep=keep)


def make_pomdp(env_id: str, keep: Sequence[int] | None = None, **kwargs: Any) -> gym.Env:
    """``MaskVelocity(gymnasium.make(env_id, **kwargs))`` for any supported env id.

    Example: ``make_pomdp("Hopper-v5", max_episode_steps=500)``.
    """
    env = gym.make(env_id, **kwargs)
    return MaskVelocity(env, keep=keep)

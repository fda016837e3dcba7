"""Optional adapters for third-party memory benchmarks (imported lazily).

* POPGym (Morad et al., "POPGym: Benchmarking Partially Observable RL", ICLR
  2023): ``pip install popgym``.
* MiniGrid Memory (Chevalier-Boisvert et al., "Minigrid & Miniworld", NeurIPS
  2023 D&B; the Memory task follows Oh et al. 2016): ``pip install minigrid``.

Neither package is a dependency of rlformer: the error raised when one is
missing names the pip command.
"""

from __future__ import annotations

import importlib
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

__all__ = ["FloatObservation", "SuccessInfo", "make_minigrid_memory", "make_popgym"]


def _require(module: str, pip_name: str, what: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{what} needs the optional package {pip_name!r}, which is not installed. "
            f"Install it with `pip install {pip_name}`."
        ) from exc


class FloatObservation(gym.ObservationWrapper):
    """Flatten any observation space to a float32 vector (Discrete -> one-hot)."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        flat = spaces.flatten_space(env.observation_space)
        self.observation_space = spaces.Box(
            low=flat.low.astype(np.float32), high=flat.high.astype(np.float32), dtype=np.float32
        )

    def observation(self, observation: Any) -> np.ndarray:
        return spaces.flatten(self.env.observation_space, observation).astype(np.float32)


class SuccessInfo(gym.Wrapper):
    """Set ``info["success"]`` at episode end: True iff the episode terminated with reward > 0.

    Matches MiniGrid Memory, whose only positive reward is for reaching the
    matching object (the wrong object terminates with reward 0, time-out truncates).
    """

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        if terminated or truncated:
            info = dict(info)
            info["success"] = bool(terminated and reward > 0)
        return obs, reward, terminated, truncated, info


def make_popgym(name: str = "RepeatPreviousEasy", **kwargs: Any) -> gym.Env:
    """A POPGym env by class name (e.g. ``RepeatPreviousEasy``, ``RepeatPreviousMedium``).

    The observation is flattened to a float32 vector (one-hot for POPGym's
    Discrete card observations); the action space is POPGym's own.
    """
    popgym_envs = _require("popgym.envs", "popgym", f"POPGym env {name!r}")
    cls = getattr(popgym_envs, name, None)
    if not (isinstance(cls, type) and issubclass(cls, gym.Env)):
        raise ValueError(  # noqa: TRY004  (a bad name, not a bad type)
            f"Unknown POPGym env {name!r}; expected a class name from popgym.envs such as "
            f"'RepeatPreviousEasy', 'RepeatPreviousMedium' or 'RepeatFirstEasy'."
        )
    return FloatObservation(cls(**kwargs))


def make_minigrid_memory(
    size: int = 11,
    random_length: bool = False,
    view: str = "symbolic",
    **kwargs: Any,
) -> gym.Env:
    """MiniGrid ``MiniGrid-MemoryS{size}[Random]-v0`` with an image-only observation.

    ``view="symbolic"``: the 7x7x3 uint8 (object, colour, state) egocentric grid
    (``ImgObsWrapper``); ``view="rgb"``: the 56x56x3 uint8 egocentric RGB view
    (``RGBImgPartialObsWrapper`` + ``ImgObsWrapper``).  Actions: MiniGrid's
    ``Discrete(7)``.  ``info["success"]`` is set at the end of each episode.
    """
    _require("minigrid", "minigrid", f"MiniGrid Memory (size {size})")
    from minigrid.wrappers import ImgObsWrapper, RGBImgPartialObsWrapper

    env_id = f"MiniGrid-MemoryS{size}{'Random' if random_length else ''}-v0"
    if env_id not in gym.registry:
        available = sorted(k for k in gym.registry if k.startswith("MiniGrid-Memory"))
        raise ValueError(f"{env_id} is not a MiniGrid env; available: {available}.")
    if view not in ("symbolic", "rgb"):
        raise ValueError(f"view must be 'symbolic' or 'rgb', got {view!r}.")
    env = gym.make(env_id, **kwargs).unwrapped  # make() re-adds its wrappers outside
    if view == "rgb":
        env = RGBImgPartialObsWrapper(env)
    return SuccessInfo(ImgObsWrapper(env))

"""Register the rlformer gymnasium ids (idempotent: importing twice is harmless).

Task kwargs pass through ``gymnasium.make``, e.g.
``gymnasium.make("rlformer/TMaze-v0", corridor_length=200)`` or
``gymnasium.make("rlformer/RepeatFirst-v0", delay=50, num_symbols=8)``.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym

NAMESPACE = "rlformer"

#: Memory tasks (envs/tasks.py). They truncate internally, so no TimeLimit here.
TASK_IDS: dict[str, str] = {
    "rlformer/TMaze-v0": "envs.tasks:TMazeEnv",
    "rlformer/RepeatFirst-v0": "envs.tasks:RepeatFirstEnv",
}

#: Position-only POMDPs (envs/wrappers.py): id -> base gymnasium id.
POMDP_IDS: dict[str, str] = {
    "rlformer/CartPole-P-v0": "CartPole-v1",
    "rlformer/Pendulum-P-v0": "Pendulum-v1",
    "rlformer/Hopper-P-v0": "Hopper-v5",
    "rlformer/HalfCheetah-P-v0": "HalfCheetah-v5",
    "rlformer/Walker2d-P-v0": "Walker2d-v5",
    "rlformer/Ant-P-v0": "Ant-v5",
}

#: Optional third-party memory tasks (envs/adapters.py); need `pip install popgym` / `minigrid`.
ADAPTER_IDS: dict[str, tuple[str, dict[str, Any]]] = {
    "rlformer/POPGym-RepeatPreviousEasy-v0": (
        "envs.adapters:make_popgym",
        {"name": "RepeatPreviousEasy"},
    ),
    "rlformer/POPGym-RepeatPreviousMedium-v0": (
        "envs.adapters:make_popgym",
        {"name": "RepeatPreviousMedium"},
    ),
    "rlformer/MiniGrid-MemoryS11-v0": (
        "envs.adapters:make_minigrid_memory",
        {"size": 11, "random_length": False},
    ),
    "rlformer/MiniGrid-MemoryS13Random-v0": (
        "envs.adapters:make_minigrid_memory",
        {"size": 13, "random_length": True},
    ),
}


def _register(env_id: str, entry_point: str, **kwargs: Any) -> None:
    if env_id in gym.registry:
        return
    gym.register(id=env_id, entry_point=entry_point, **kwargs)


def register_all() -> list[str]:
    """Register every rlformer id (skips ids already registered); returns the ids."""
    for env_id, entry in TASK_IDS.items():
        _register(env_id, entry)
    for env_id, base_id in POMDP_IDS.items():
        base = gym.spec(base_id)
        _register(
            env_id,
            "envs.wrappers:masked_env",
            kwargs={"base_id": base_id},
            max_episode_steps=base.max_episode_steps,
            reward_threshold=base.reward_threshold,
        )
    for env_id, (entry, kwargs) in ADAPTER_IDS.items():
        _register(env_id, entry, kwargs=kwargs)
    return all_ids()


def all_ids() -> list[str]:
    """Every id this module registers."""
    return [*TASK_IDS, *POMDP_IDS, *ADAPTER_IDS]


register_all()

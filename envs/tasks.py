"""Memory tasks: the passive T-maze and RepeatFirst (gymnasium >= 1.0 API).

Both tasks are built so that *only* memory of the first observation solves
them: the information needed at the last step is shown once, at ``t = 0``, and
never again.  Each episode ends with ``info["success"]`` (``True``/``False``)
so trainers can report a success rate.
"""

from __future__ import annotations

from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
from gymnasium import spaces

__all__ = ["RepeatFirstEnv", "TMazeEnv"]


def _check_int(name: str, value: Any, minimum: int, hint: str = "") -> int:
    """Validate an integer kwarg and return it as ``int`` (clear error otherwise)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(
            f"{name} must be an integer >= {minimum}, got {value!r}." + (f" {hint}" if hint else "")
        )
    return int(value)


class TMazeEnv(gym.Env[np.ndarray, np.int64]):
    """Passive T-maze (Bakker 2001), in the form used by Ni et al. 2023.

    Source: B. Bakker, "Reinforcement Learning with Long Short-Term Memory",
    NeurIPS 2001; T. Ni et al., "When Do Transformers Shine in RL? Decoupling
    Memory from Credit Assignment", NeurIPS 2023 (``TMazeClassicPassive`` in
    github.com/twni2016/Memory-RL).  "Passive" means the cue is shown at the
    start cell, so the agent needs memory but no exploration to see it.

    Layout, with ``L = corridor_length``::

                                 (L, +1)  "up" goal
        x = 0 ---- 1 ---- ... ---- L      junction
                                 (L, -1)  "down" goal

    * Start: ``(0, 0)``. The goal side (up/down) is drawn uniformly per episode.
    * Actions ``Discrete(4)`` (Ni et al.'s action set): 0 = forward (x+1),
      1 = up (y+1), 2 = back (x-1), 3 = down (y-1).  A move into a wall is a
      no-op; up/down are only possible at the junction.
    * Observation ``Box(0, 1, (4,), float32)``:
      ``[cue_up, cue_down, at_junction, x / L]``.  The cue is one-hot at
      ``t = 0`` only and ``[0, 0]`` at every later step (also if the agent stays
      at ``x = 0``); ``at_junction`` is 1 at ``x = L``.
    * The episode *terminates* when the agent steps into a goal arm (the
      choice): reward ``goal_reward`` (default 1) on the cued side, else
      ``wrong_reward`` (default 0).  Optionally, ``lag_penalty`` (<= 0) is
      added on every step on which the agent is behind the optimal schedule
      (``x < t``), like Ni et al.'s ``penalty``.
    * It is *truncated* after ``max_steps`` steps without a choice (default
      ``2 * (L + 1)``; the optimal episode takes ``L + 1`` steps).  On the step
      where a choice happens, ``terminated=True`` and ``truncated=False``
      even if it is also the last allowed step.
    * Difference to Ni et al.: they use a fixed horizon ``T = L + 1`` and score
      the arm the agent stands in at ``T``; here the choice ends the episode and
      a separate time limit ends wandering episodes.

    Memory is required: after ``t = 0`` the observation is a function of the
    position only, identical for both cues, so every memoryless policy
    (reactive, even stochastic) succeeds with probability at most 1/2, and
    "walk forward, then always go up" reaches exactly 1/2.  A policy that
    remembers the cue succeeds with probability 1 in ``L + 1`` steps.
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": ["ansi"], "render_fps": 4}

    FORWARD, UP, BACK, DOWN = 0, 1, 2, 3
    _MOVES = ((1, 0), (0, 1), (-1, 0), (0, -1))

    def __init__(
        self,
        corridor_length: int = 10,
        max_steps: int | None = None,
        goal_reward: float = 1.0,
        wrong_reward: float = 0.0,
        lag_penalty: float = 0.0,
        render_mode: str | None = None,
    ):
        self.corridor_length = _check_int("corridor_length", corridor_length, 1)
        if max_steps is None:
            max_steps = 2 * (self.corridor_length + 1)
        self.max_steps = _check_int(
            "max_steps",
            max_steps,
            self.corridor_length + 1,
            hint=(
                f"The shortest successful episode takes corridor_length + 1 = "
                f"{self.corridor_length + 1} steps; pass max_steps=None for the "
                f"default 2 * (corridor_length + 1)."
            ),
        )
        if lag_penalty > 0:
            raise ValueError(
                f"lag_penalty must be <= 0 (it is added when the agent falls "
                f"behind), got {lag_penalty}; pass a negative value such as "
                f"-1 / corridor_length, or 0 to disable it."
            )
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(
                f"render_mode={render_mode!r} is not supported; use one of "
                f"{self.metadata['render_modes']} or None."
            )
        self.goal_reward = float(goal_reward)
        self.wrong_reward = float(wrong_reward)
        self.lag_penalty = float(lag_penalty)
        self.render_mode = render_mode

        self.action_space = spaces.Discrete(4)
        self.observation_space = spaces.Box(0.0, 1.0, shape=(4,), dtype=np.float32)

        self._x = 0
        self._y = 0
        self._t = 0
        self._goal_y = 1

    # ------------------------------------------------------------------ API
    @property
    def goal_up(self) -> bool:
        """True when the cued (rewarded) side of this episode is "up"."""
        return self._goal_y == 1

    def _obs(self) -> np.ndarray:
        obs = np.zeros(4, dtype=np.float32)
        if self._t == 0:
            obs[0 if self._goal_y == 1 else 1] = 1.0
        obs[2] = float(self._x == self.corridor_length)
        obs[3] = self._x / self.corridor_length
        return obs

    def _info(self) -> dict[str, Any]:
        return {"x": self._x, "t": self._t}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._x, self._y, self._t = 0, 0, 0
        self._goal_y = 1 if self.np_random.integers(2) == 0 else -1
        return self._obs(), self._info()

    def step(self, action):
        if not self.action_space.contains(action):
            raise ValueError(
                f"Invalid action {action!r}; expected an integer in [0, 4): 0=forward, 1=up, 2=back, 3=down."
            )
        self._t += 1
        dx, dy = self._MOVES[int(action)]
        nx, ny = self._x + dx, self._y + dy
        if dy != 0:
            if self._x == self.corridor_length:  # arms exist only at the junction
                self._y = ny
        elif 0 <= nx <= self.corridor_length:
            self._x = nx

        reward = 0.0
        if self._x < self._t:
            reward += self.lag_penalty
        terminated = self._y != 0
        truncated = (not terminated) and self._t >= self.max_steps
        info = self._info()
        if terminated:
            success = self._y == self._goal_y
            reward += self.goal_reward if success else self.wrong_reward
            info["success"] = bool(success)
        elif truncated:
            info["success"] = False
        return self._obs(), reward, terminated, truncated, info

    def render(self):
        if self.render_mode != "ansi":
            return None
        L = self.corridor_length

        def arm(y: int) -> str:
            return " " * L + ("A" if (self._x, self._y) == (L, y) else "o")

        row = "".join("A" if (i == self._x and self._y == 0) else "." for i in range(L + 1))
        cue = "up" if self._goal_y == 1 else "down"
        return f"{arm(1)}\n{row}   t={self._t} cue={cue}\n{arm(-1)}\n"


class RepeatFirstEnv(gym.Env[np.ndarray, np.int64]):
    """Repeat the first observation after a delay.

    Source: the RepeatFirst task of POPGym (S. Morad et al., "POPGym:
    Benchmarking Partially Observable Reinforcement Learning", ICLR 2023).
    POPGym deals a card every step and scores the first card's suit at every
    step; this variant isolates pure recall: one symbol, ``delay`` blank
    steps, one scored query.

    Exact spec, with ``K = num_symbols`` and ``D = delay``:

    * Observation ``Box(0, 1, (K + 1,), float32)``: ``[one_hot(symbol), query]``.
    * ``t = 0`` (reset): ``one_hot(s)`` with ``s`` uniform in ``[0, K)``, query 0.
    * ``t = 1 .. D``: blank, all zeros (with ``distractors=True``: a uniformly
      random one-hot symbol instead, as in POPGym, query 0).
    * ``t = D + 1``: query observation ``[0, ..., 0, 1]``.
    * Actions ``Discrete(K)``.  Actions taken before the query are ignored
      (reward 0).  The action taken on the query observation ends the episode
      (``terminated=True``): reward ``correct_reward`` (default 1) if it equals
      ``s``, else ``wrong_reward`` (default 0); ``info["success"]`` says which.
    * Every episode lasts exactly ``D + 2`` steps (``D + 1`` ignored actions and
      one scored action); there is no truncation.

    The query observation is the same for every ``s``, so a memoryless policy
    succeeds with probability exactly ``1 / K``; remembering ``s`` gives 1.
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": []}

    def __init__(
        self,
        delay: int = 10,
        num_symbols: int = 4,
        distractors: bool = False,
        correct_reward: float = 1.0,
        wrong_reward: float = 0.0,
    ):
        self.delay = _check_int("delay", delay, 0)
        self.num_symbols = _check_int(
            "num_symbols", num_symbols, 2, hint="With one symbol there is nothing to remember."
        )
        self.distractors = bool(distractors)
        self.correct_reward = float(correct_reward)
        self.wrong_reward = float(wrong_reward)
        self.action_space = spaces.Discrete(self.num_symbols)
        self.observation_space = spaces.Box(0.0, 1.0, shape=(self.num_symbols + 1,), dtype=np.float32)
        self._t = 0
        self._symbol = 0

    @property
    def episode_steps(self) -> int:
        """Number of ``step`` calls in every episode: ``delay + 2``."""
        return self.delay + 2

    def _symbol_obs(self, symbol: int) -> np.ndarray:
        obs = np.zeros(self.num_symbols + 1, dtype=np.float32)
        obs[symbol] = 1.0
        return obs

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._t = 0
        self._symbol = int(self.np_random.integers(self.num_symbols))
        return self._symbol_obs(self._symbol), {"t": 0}

    def step(self, action):
        if not self.action_space.contains(action):
            raise ValueError(f"Invalid action {action!r}; expected an integer in [0, {self.num_symbols}).")
        if self._t > self.delay + 1:
            raise RuntimeError(
                "step() called after the episode ended (the query was answered); call reset() first."
            )
        answered = self._t == self.delay + 1
        self._t += 1
        info: dict[str, Any] = {"t": self._t}
        if answered:
            success = int(action) == self._symbol
            info["success"] = bool(success)
            obs = np.zeros(self.num_symbols + 1, dtype=np.float32)
            reward = self.correct_reward if success else self.wrong_reward
            return obs, reward, True, False, info
        if self._t == self.delay + 1:
            obs = np.zeros(self.num_symbols + 1, dtype=np.float32)
            obs[-1] = 1.0  # query
        elif self.distractors:
            obs = self._symbol_obs(int(self.np_random.integers(self.num_symbols)))
        else:
            obs = np.zeros(self.num_symbols + 1, dtype=np.float32)
        return obs, 0.0, False, False, info

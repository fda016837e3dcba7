"""Evaluate a return-conditioned policy: N episodes per target return, all in parallel.

One ``gymnasium.vector`` env (``AsyncVectorEnv``: one worker process per env; ``SyncVectorEnv``
for tests) runs ``n_episodes`` rows for every target return at once, and the model sees the
whole batch of contexts in one forward pass per environment step.

Every row starts at t = 0 together and a finished row is only masked out, so at step t all
rows' histories have the same length: the context is the same slice of each row's history
(the last K steps, left-padded while t < K), and no per-row bookkeeping is needed.

Gymnasium >= 1.0 autoresets a finished sub-env on the NEXT ``step`` call (that call ignores
the action and returns the first observation of a new episode with reward 0). Each row runs
exactly one episode: once a row is terminated or truncated it is frozen (its return, length
and history no longer change), so neither the autoreset step nor anything after it counts.
Rows still running after ``max_steps`` are cut there (their return so far is reported).
Following Chen et al., the return-to-go fed at step t+1 is the previous one minus r_t/scale,
and the action token of the current step is a zero placeholder (the model is causal, so the
prediction from the state token never sees it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import numpy as np
import torch
from torch import Tensor

ModelFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]


@dataclass
class EvalResult:
    target: float
    returns: np.ndarray
    lengths: np.ndarray

    @property
    def mean(self) -> float:
        return float(np.mean(self.returns))

    @property
    def std(self) -> float:
        return float(np.std(self.returns))


def make_vector_env(env_id: str, num_envs: int, mode: Literal["async", "sync"] = "async"):
    import gymnasium as gym

    if mode not in ("async", "sync"):
        raise ValueError(f"vector env mode must be 'async' or 'sync', got {mode!r}")
    return gym.make_vec(env_id, num_envs=num_envs, vectorization_mode=mode)


@torch.no_grad()
def evaluate(model: ModelFn, env_id: str, targets: Sequence[float], n_episodes: int, *, state_mean: np.ndarray,
             state_std: np.ndarray, return_scale: float, context_len: int, device: torch.device | str = "cpu",
             max_steps: int = 1000, vector: Literal["async", "sync"] = "async", seed: int = 10_000,
             amp_dtype: torch.dtype | None = None, envs=None) -> list[EvalResult]:
    """Run ``n_episodes`` episodes for each target return in parallel; one EvalResult per target.

    ``model(states, actions, returns_to_go, timesteps, mask)`` -> (B, K, A) as in training; the
    action for step t is read from position K-1. Episode j of every target uses env seed ``seed + j``
    (targets are compared on the same start states). ``envs``: an already-made vector env with
    ``len(targets) * n_episodes`` sub-envs (closed by the caller); otherwise one is made and closed.
    """
    device = torch.device(device)
    n_t = len(targets)
    n = n_t * n_episodes
    own_envs = envs is None
    if own_envs:
        envs = make_vector_env(env_id, n, vector)
    if envs.num_envs != n:
        raise ValueError(f"envs has {envs.num_envs} sub-envs, need {n} ({n_t} targets x {n_episodes} episodes)")
    try:
        obs, _ = envs.reset(seed=[seed + (i % n_episodes) for i in range(n)])
        k = context_len
        mean = torch.as_tensor(state_mean, dtype=torch.float32, device=device)
        std = torch.as_tensor(state_std, dtype=torch.float32, device=device)
        act_dim = int(np.prod(envs.single_action_space.shape))
        low = torch.as_tensor(envs.single_action_space.low, device=device)
        high = torch.as_tensor(envs.single_action_space.high, device=device)
        # Histories: slot t holds step t (actions: zero placeholder until the action is taken).
        states = torch.zeros(n, max_steps, mean.shape[0], device=device)
        actions = torch.zeros(n, max_steps, act_dim, device=device)
        rtg = torch.zeros(n, max_steps, device=device)
        timesteps = torch.arange(max_steps, device=device).expand(n, max_steps)
        rtg[:, 0] = torch.as_tensor(np.repeat(np.asarray(targets, dtype=np.float64), n_episodes) / return_scale,
                                    dtype=torch.float32, device=device)
        returns = np.zeros(n, dtype=np.float64)
        lengths = np.zeros(n, dtype=np.int64)
        alive = np.ones(n, dtype=bool)
        pad = torch.zeros(n, max(0, k), dtype=torch.bool, device=device)
        for t in range(max_steps):
            states[:, t] = (torch.as_tensor(np.asarray(obs), dtype=torch.float32, device=device) - mean) / std
            lo = max(0, t + 1 - k)
            ctx = slice(lo, t + 1)
            n_valid = t + 1 - lo
            mask = pad.clone()
            mask[:, k - n_valid:] = True

            def window(x: Tensor, ctx: slice = ctx, n_valid: int = n_valid) -> Tensor:
                w = x[:, ctx]
                if n_valid == k:
                    return w
                return torch.cat([torch.zeros((n, k - n_valid) + tuple(w.shape[2:]), dtype=w.dtype,
                                              device=device), w], dim=1)

            with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
                pred = model(window(states), window(actions), window(rtg), window(timesteps), mask)
            action = pred[:, -1].float().clamp(low, high)
            actions[:, t] = action
            obs, reward, terminated, truncated, _ = envs.step(action.cpu().numpy())
            reward = np.asarray(reward, dtype=np.float64)
            returns[alive] += reward[alive]
            lengths[alive] += 1
            alive &= ~(np.asarray(terminated) | np.asarray(truncated))
            if not alive.any() or t + 1 == max_steps:
                break
            rtg[:, t + 1] = rtg[:, t] - torch.as_tensor(reward / return_scale, dtype=torch.float32, device=device)
    finally:
        if own_envs:
            envs.close()
    return [EvalResult(float(targets[i]), returns[i * n_episodes:(i + 1) * n_episodes],
                       lengths[i * n_episodes:(i + 1) * n_episodes]) for i in range(n_t)]

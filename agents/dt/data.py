"""Offline trajectories -> tensors on the device, once; K-step windows sampled on the device.

Everything the training loop needs lives on the device from the start: normalized states,
actions, scaled returns-to-go, timesteps and each step's episode end, all flat over the
dataset (N steps). A batch is drawn with a few tensor ops and no Python per sample:

* a flat step index g is drawn uniformly from [0, N). That picks g's episode with probability
  proportional to its length and, given the episode, a start index uniform over its steps --
  exactly Chen et al.'s sampler (episode ~ length, ``si = randint(0, len - 1)``);
* the window is steps [g, min(g + K, episode end)); shorter windows are LEFT-padded to K,
  with ``mask`` False on the padding (states/actions/returns 0, timestep 0 there).

Returns-to-go are undiscounted suffix sums of the episode's rewards divided by
``return_scale`` (1000 for MuJoCo, as in the paper); states are normalized with the dataset's
mean and std (+1e-6), timesteps are the index within the episode.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor


@dataclass
class OfflineData:
    """A dataset's episodes concatenated on the host: N steps in E episodes."""

    observations: np.ndarray
    """(N, S) float: the state each action was taken in (Minari's final observation dropped)"""
    actions: np.ndarray
    """(N, A) float32"""
    rewards: np.ndarray
    """(N,) float64"""
    episode_lengths: np.ndarray
    """(E,) int64"""
    dataset_id: str = ""

    @property
    def state_dim(self) -> int:
        return int(self.observations.shape[1])

    @property
    def act_dim(self) -> int:
        return int(self.actions.shape[1])

    @property
    def n_steps(self) -> int:
        return int(self.rewards.shape[0])

    @property
    def episode_returns(self) -> np.ndarray:
        ends = np.cumsum(self.episode_lengths)
        return np.add.reduceat(self.rewards, ends - self.episode_lengths) if len(ends) else np.zeros(0)

    def state_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std + 1e-6) over all states, float64 (Chen et al.)."""
        obs = self.observations.astype(np.float64)
        return obs.mean(axis=0), obs.std(axis=0) + 1e-6

    @classmethod
    def from_episodes(cls, episodes: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
                      dataset_id: str = "") -> "OfflineData":
        """From (observations (L or L+1, S), actions (L, A), rewards (L,)) per episode."""
        if not episodes:
            raise ValueError("no episodes")
        obs, act, rew, lens = [], [], [], []
        for o, a, r in episodes:
            n = len(r)
            if n == 0:
                continue
            obs.append(np.asarray(o)[:n])
            act.append(np.asarray(a, dtype=np.float32).reshape(n, -1))
            rew.append(np.asarray(r, dtype=np.float64).reshape(n))
            lens.append(n)
        return cls(np.concatenate(obs).reshape(sum(lens), -1), np.concatenate(act), np.concatenate(rew),
                   np.asarray(lens, dtype=np.int64), dataset_id)


def load_offline_data(name: str, download: bool = True) -> OfflineData:
    """Read a Minari dataset (short name or id; local copy first, see envs.datasets) into OfflineData.

    Raises envs.datasets.DatasetNotFoundError with build instructions when it is not available.
    """
    from envs.datasets import load_dataset

    ds = load_dataset(name, download=download)
    episodes = [(ep.observations, ep.actions, ep.rewards) for ep in ds.iterate_episodes()]
    return OfflineData.from_episodes(episodes, dataset_id=ds.spec.dataset_id)


def returns_to_go(rewards: np.ndarray, episode_lengths: np.ndarray) -> np.ndarray:
    """Per step, the undiscounted sum of the rewards from that step to its episode's end (float64)."""
    csum = np.cumsum(rewards, dtype=np.float64)
    ends = np.cumsum(episode_lengths)
    end_of_step = np.repeat(ends, episode_lengths) - 1
    return csum[end_of_step] - csum + rewards


@dataclass
class Batch:
    states: Tensor
    """(B, K, S) normalized"""
    actions: Tensor
    """(B, K, A)"""
    returns_to_go: Tensor
    """(B, K) scaled"""
    timesteps: Tensor
    """(B, K) long"""
    mask: Tensor
    """(B, K) bool, False on left padding"""

    def as_tuple(self) -> tuple[Tensor, ...]:
        return self.states, self.actions, self.returns_to_go, self.timesteps, self.mask


class WindowSampler:
    """The dataset as device tensors, and K-step windows gathered on the device (see module doc)."""

    def __init__(self, data: OfflineData, context_len: int = 20, return_scale: float = 1000.0,
                 max_ep_len: int = 1000, device: torch.device | str = "cpu",
                 state_mean: Optional[np.ndarray] = None, state_std: Optional[np.ndarray] = None):
        if context_len < 1:
            raise ValueError(f"context_len must be >= 1, got {context_len}")
        self.context_len, self.return_scale, self.max_ep_len = context_len, float(return_scale), max_ep_len
        self.device = torch.device(device)
        if state_mean is None or state_std is None:
            state_mean, state_std = data.state_stats()
        self.state_mean, self.state_std = np.asarray(state_mean, np.float64), np.asarray(state_std, np.float64)
        lens = data.episode_lengths
        starts = np.cumsum(lens) - lens
        timesteps = np.arange(data.n_steps) - np.repeat(starts, lens)
        dev = self.device
        self.states = torch.as_tensor(((data.observations - self.state_mean) / self.state_std).astype(np.float32),
                                      device=dev)
        self.actions = torch.as_tensor(data.actions.astype(np.float32), device=dev)
        self.rtg = torch.as_tensor((returns_to_go(data.rewards, lens) / self.return_scale).astype(np.float32),
                                   device=dev)
        self.timesteps = torch.as_tensor(np.minimum(timesteps, max_ep_len - 1), dtype=torch.long, device=dev)
        self.episode_end = torch.as_tensor(np.repeat(starts + lens, lens), dtype=torch.long, device=dev)
        self.offsets = torch.arange(context_len, device=dev)
        self.n_steps = data.n_steps

    def windows(self, starts: Tensor) -> Batch:
        """The K-step windows that begin at flat step indices ``starts`` (B,), left-padded at episode ends."""
        k = self.context_len
        n_valid = (self.episode_end[starts] - starts).clamp(max=k)           # (B,)
        rel = self.offsets[None, :] - (k - n_valid)[:, None]                 # (B, K): <0 on padding
        mask = rel >= 0
        idx = starts[:, None] + rel.clamp(min=0)
        m = mask.unsqueeze(-1)
        return Batch(
            states=torch.where(m, self.states[idx], 0.0),
            actions=torch.where(m, self.actions[idx], 0.0),
            returns_to_go=torch.where(mask, self.rtg[idx], 0.0),
            timesteps=torch.where(mask, self.timesteps[idx], 0),
            mask=mask,
        )

    def sample(self, batch_size: int, generator: Optional[torch.Generator] = None) -> Batch:
        """A batch of windows: start step uniform over the dataset (episode ~ length, start uniform in it)."""
        starts = torch.randint(self.n_steps, (batch_size,), device=self.device, generator=generator)
        return self.windows(starts)

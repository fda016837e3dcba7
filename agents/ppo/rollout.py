"""Vector envs, rollout collection with a carried encoder state, stored memory windows, GAE.

Design: stored per-step memory windows (as in CleanRL's ppo_trxl), kept compact.
-------------------------------------------------------------------------------
During the rollout every env is one batch row; each step is one token (``T = 1``) and the
encoder state is carried step to step, cleared by ``state.reset(done)`` when the env's episode
ended. Training must reproduce, for every stored step, exactly what the policy computed then.

Option (b), truncated chunks of L steps re-run from the state stored at the chunk start, does
not fit the encoder contract: ``reset=`` applies only at a segment's start, so an episode
boundary *inside* a chunk would need per-step processing (slow) or splitting chunks at episode
ends (ragged, padded batches, and burn-in only approximates the rollout's memory). Option (a)
is exact by construction: a step's output depends only on its input and on the XL memory it
attended to, so if training gives each step that same memory the outputs are the same.

Storing each step's full memory (``S x E x layers x mem_len x d``) is what makes (a)
memory-hungry. We store instead what the memory is made of: the layer inputs each step wrote
(``S x E x layers x d``, read off the new state: XL appends the layer input as its newest slot)
plus the memory at the rollout's start (``E x layers x mem_len x d``). Per env and layer this is
the sequence ``[mem0; h_0 .. h_{S-1}]``, and the window step ``s`` attended to is exactly the
``mem_len`` slots ``[s, s + mem_len)`` of it. Validity: the start memory's own mask, and keys
from before the step's episode start are invalid (``ep_start = cummax`` of reset steps). The
rollout keeps its state full length (``mem_len`` zero, invalid slots when fresh), so rollout
and training attend over the same ``mem_len + 1`` keys with the same relative indices; a
reset's zeroed slots and the stale slots the gather finds there are both masked out, so they
get exactly zero attention weight. Minibatches are random sets of (step, env) pairs, each
gathered with one vectorized advanced index; every token is independent, so a minibatch is a
batch of ``N`` one-token segments. Memory stays detached in training, as in Transformer-XL.
``tests/test_ppo.py`` checks recomputed log-probs and values against the rollout's
(< 1e-5) across episode boundaries and several minibatches.

Autoreset: envs use ``AutoresetMode.SAME_STEP`` (gymnasium >= 1.1): the step that ends an
episode returns the next episode's first observation (the last one is in
``info["final_obs"]``), so every stored step is a real transition and nothing needs masking;
the next step's state is reset for those envs.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any, Callable, Optional

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AsyncVectorEnv, AutoresetMode, SyncVectorEnv
from torch import Tensor

from rlformer import EncoderState


class EnvFactory:
    """Picklable ``() -> env`` (async workers may be spawned): imports ``envs`` to register ids."""

    def __init__(self, env_id: str, kwargs: Optional[dict] = None, make: Optional[Callable[..., gym.Env]] = None):
        self.env_id, self.kwargs, self.make = env_id, dict(kwargs or {}), make

    def __call__(self) -> gym.Env:
        import envs  # noqa: F401  (registers rlformer/* ids in this process)

        if self.make is not None:
            return self.make(**self.kwargs)
        return gym.make(self.env_id, **self.kwargs)


def make_vector_env(env_fn: Callable[[], gym.Env], num_envs: int, mode: str = "async") -> gym.vector.VectorEnv:
    """``num_envs`` copies with same-step autoreset (the ending step returns the reset obs)."""
    fns = [env_fn] * num_envs
    if mode == "async":
        return AsyncVectorEnv(fns, autoreset_mode=AutoresetMode.SAME_STEP)
    if mode == "sync":
        return SyncVectorEnv(fns, autoreset_mode=AutoresetMode.SAME_STEP)
    raise ValueError(f"vector mode must be 'async' or 'sync', got {mode!r}")


def obs_to_tensor(obs: Any, device: torch.device) -> Tensor:
    t = torch.as_tensor(np.asarray(obs), device=device)
    return t if t.dtype == torch.uint8 else t.float()


class EpisodeStats:
    """Vectorized running returns/lengths; finished episodes go into windows of recent values."""

    def __init__(self, num_envs: int, window: int = 100):
        self.ret = np.zeros(num_envs, dtype=np.float64)
        self.len = np.zeros(num_envs, dtype=np.int64)
        self.returns: collections.deque = collections.deque(maxlen=window)
        self.lengths: collections.deque = collections.deque(maxlen=window)
        self.successes: collections.deque = collections.deque(maxlen=window)
        self.episodes = 0

    def step(self, reward: np.ndarray, done: np.ndarray, info: dict) -> None:
        self.ret += reward
        self.len += 1
        if not done.any():
            return
        idx = np.flatnonzero(done)
        self.returns.extend(self.ret[idx].tolist())
        self.lengths.extend(self.len[idx].tolist())
        self.episodes += len(idx)
        final = info.get("final_info", {})
        if "success" in final:
            has = final.get("_success", np.ones_like(done))
            sel = idx[has[idx]]
            self.successes.extend(np.asarray(final["success"])[sel].astype(float).tolist())
        self.ret[idx] = 0.0
        self.len[idx] = 0

    def summary(self) -> dict[str, float]:
        out = {}
        if self.returns:
            out["episodic_return"] = float(np.mean(self.returns))
            out["episodic_length"] = float(np.mean(self.lengths))
        if self.successes:
            out["success_rate"] = float(np.mean(self.successes))
        return out


@dataclass
class Carry:
    """What one rollout hands to the next: current obs, encoder state, pending resets."""

    obs: Tensor
    state: Optional[EncoderState]
    reset: Tensor
    """(E,) bool: the env's previous step ended an episode; clear its state before the next step"""


class RolloutBuffer:
    """Per-step tensors (S, E, ...) on the device plus the compact XL memory store."""

    def __init__(self, num_steps: int, num_envs: int, obs_space: gym.Space, act_space: gym.Space,
                 policy, device: torch.device):
        s, e = num_steps, num_envs
        self.S, self.E, self.device = s, e, device
        obs_dtype = torch.uint8 if getattr(obs_space, "dtype", None) == np.uint8 else torch.float32
        obs_shape = () if isinstance(obs_space, gym.spaces.Discrete) else tuple(obs_space.shape)
        act_shape = tuple(act_space.shape) if isinstance(act_space, gym.spaces.Box) else ()
        act_dtype = torch.float32 if isinstance(act_space, gym.spaces.Box) else torch.long
        self.obs = torch.zeros((s, e, *obs_shape), dtype=obs_dtype, device=device)
        self.actions = torch.zeros((s, e, *act_shape), dtype=act_dtype, device=device)
        self.logprobs = torch.zeros(s, e, device=device)
        self.values = torch.zeros(s, e, device=device)
        self.rewards = torch.zeros(s, e, device=device)
        self.ends = torch.zeros(s, e, device=device)
        """1.0 where the transition at (s, e) ended its episode (terminated or truncated)"""
        self.resets = torch.zeros(s, e, dtype=torch.bool, device=device)
        """True where the state was cleared before step (s, e)"""
        self.advantages = torch.zeros(s, e, device=device)
        self.returns = torch.zeros(s, e, device=device)
        self.recurrent = policy.recurrent
        self.xl = self.recurrent and policy.backbone.memory == "xl"
        if self.recurrent:
            self.offsets = torch.zeros(s, e, dtype=torch.long, device=device)
            self.n_slots = policy.encoder.depth.n_slots
        if self.xl:
            n_layers, m, d = policy.backbone.n_layers, policy.backbone.mem_len, policy.backbone.d_model
            self.M = m
            # seq[l, e] = [mem0 (M slots); h_0 .. h_{S-1}], valid likewise
            self.seq = torch.zeros(n_layers, e, m + s, d, device=device)
            self.seq_valid = torch.ones(n_layers, e, m + s, dtype=torch.bool, device=device)
            self.ep_start = torch.zeros(s, e, dtype=torch.long, device=device)

    # ------------------------------------------------------------------ recording
    def record_start(self, state: Optional[EncoderState]) -> None:
        """The memory every env holds before the rollout's first step (before its pending reset)."""
        if not self.xl:
            return
        for layer, slot in enumerate(state.slots):
            mem = slot["memory"]
            self.seq[layer, :, : self.M] = mem["mem"]
            self.seq_valid[layer, :, : self.M] = mem["mem_valid"]

    def record_state(self, t: int, state: Optional[EncoderState], reset: Tensor) -> None:
        self.resets[t] = reset
        if self.recurrent:
            self.offsets[t] = state.offset

    def record_inputs(self, t: int, new_state: Optional[EncoderState]) -> None:
        """The layer inputs step t wrote into memory (the newest XL slot of each layer)."""
        if not self.xl:
            return
        for layer, slot in enumerate(new_state.slots):
            self.seq[layer, :, self.M + t] = slot["memory"]["mem"][:, -1]

    def finish(self) -> None:
        """Episode starts per step (for masking keys of earlier episodes in the gathered windows)."""
        if not self.xl:
            return
        steps = torch.arange(self.S, device=self.device)[:, None].expand(self.S, self.E)
        marks = torch.where(self.resets, steps, torch.full_like(steps, -(self.M + 1)))
        self.ep_start = torch.cummax(marks, dim=0).values

    # ------------------------------------------------------------------ training gather
    def gather_state(self, flat: Tensor) -> Optional[EncoderState]:
        """The encoder state (post-reset) each flat (step * E + env) index saw in the rollout."""
        if not self.recurrent:
            return None
        s, e = flat // self.E, flat % self.E
        offset = self.offsets[s, e]
        if not self.xl:
            return EncoderState(offset, [{"memory": {}, "attention": {}} for _ in range(self.n_slots)])
        pos = s[:, None] + torch.arange(self.M, device=self.device)[None, :]  # (N, M) index in seq
        in_episode = pos >= self.M + self.ep_start[s, e][:, None]
        slots = []
        for layer in range(self.seq.shape[0]):
            rows = e[:, None]
            slots.append({"memory": {"mem": self.seq[layer][rows, pos],
                                     "mem_valid": self.seq_valid[layer][rows, pos] & in_episode},
                          "attention": {}})
        return EncoderState(offset, slots)

    def minibatch(self, flat: Tensor) -> dict[str, Any]:
        s, e = flat // self.E, flat % self.E
        return {"obs": self.obs[s, e], "actions": self.actions[s, e], "logprobs": self.logprobs[s, e],
                "values": self.values[s, e], "advantages": self.advantages[s, e], "returns": self.returns[s, e],
                "state": self.gather_state(flat)}


@torch.no_grad()
def collect_rollout(policy, envs: gym.vector.VectorEnv, carry: Carry, buf: RolloutBuffer, stats: EpisodeStats,
                    gamma: float = 0.99, bootstrap_truncated: bool = True) -> Carry:
    """Fill ``buf`` with ``buf.S`` steps of every env; return the carry for the next rollout."""
    device = buf.device
    policy.eval()
    state, obs, reset = carry.state, carry.obs, carry.reset
    buf.record_start(state)
    for t in range(buf.S):
        if state is not None:
            state = state.reset(reset)
        buf.record_state(t, state, reset)
        action, logprob, value, new_state = policy.act(obs, state)
        buf.record_inputs(t, new_state)
        buf.obs[t] = obs
        buf.actions[t] = action
        buf.logprobs[t] = logprob
        buf.values[t] = value
        env_action = action.cpu().numpy()
        if policy.continuous:
            env_action = np.clip(env_action, envs.single_action_space.low, envs.single_action_space.high)
        next_obs, reward, term, trunc, info = envs.step(env_action)
        done = np.logical_or(term, trunc)
        stats.step(reward, done, info)
        reward = np.asarray(reward, dtype=np.float32).copy()
        next_obs_t = obs_to_tensor(next_obs, device)
        cut = np.logical_and(trunc, np.logical_not(term))
        if bootstrap_truncated and cut.any():
            idx = np.flatnonzero(cut)
            final = next_obs_t.clone()
            final[torch.as_tensor(idx, device=device)] = obs_to_tensor(np.stack(info["final_obs"][idx]), device)
            v_final = policy.value(final, new_state)[torch.as_tensor(idx, device=device)]
            reward[idx] += gamma * v_final.cpu().numpy()
        buf.rewards[t] = torch.as_tensor(reward, device=device)
        reset = torch.as_tensor(done, device=device)
        buf.ends[t] = reset.float()
        obs, state = next_obs_t, new_state
    buf.finish()
    return Carry(obs, state, reset)


@torch.no_grad()
def compute_gae(buf: RolloutBuffer, next_value: Tensor, gamma: float, gae_lambda: float) -> None:
    """Generalized advantage estimation (Schulman et al. 2016) over ``buf``; episode ends cut the trace."""
    last = torch.zeros_like(next_value)
    for t in reversed(range(buf.S)):
        nxt = next_value if t == buf.S - 1 else buf.values[t + 1]
        keep = 1.0 - buf.ends[t]
        delta = buf.rewards[t] + gamma * nxt * keep - buf.values[t]
        last = delta + gamma * gae_lambda * keep * last
        buf.advantages[t] = last
    buf.returns.copy_(buf.advantages + buf.values)


@torch.no_grad()
def bootstrap_value(policy, carry: Carry) -> Tensor:
    """V(obs) of the carry's observation under its (reset-applied) state."""
    policy.eval()
    state = carry.state.reset(carry.reset) if carry.state is not None else None
    return policy.value(carry.obs, state)


@torch.no_grad()
def evaluate_policy(policy, envs: gym.vector.VectorEnv, episodes: int, device: torch.device,
                    deterministic: bool = True, seed: Optional[int] = None, max_steps: int = 1_000_000) -> dict:
    """Run ``episodes`` fresh episodes (envs reset first); mean return and success rate."""
    policy.eval()
    obs, _ = envs.reset(seed=seed)
    n = envs.num_envs
    obs_t = obs_to_tensor(obs, device)
    state = policy.initial_state(n, device)
    per_env = -(-episodes // n)  # each env counts its first per_env episodes: no bias to short ones
    stats = EpisodeStats(n, window=per_env * n)
    counted = np.zeros(n, dtype=np.int64)
    reset = torch.zeros(n, dtype=torch.bool, device=device)
    steps = 0
    while (counted < per_env).any() and steps < max_steps:
        if state is not None:
            state = state.reset(reset)
        action, _, _, state = policy.act(obs_t, state, deterministic=deterministic)
        env_action = action.cpu().numpy()
        if policy.continuous:
            env_action = np.clip(env_action, envs.single_action_space.low, envs.single_action_space.high)
        obs, reward, term, trunc, info = envs.step(env_action)
        done = np.logical_or(term, trunc)
        stats.step(reward, done & (counted < per_env), info)
        counted += done
        reset = torch.as_tensor(done, device=device)
        obs_t = obs_to_tensor(obs, device)
        steps += 1
    out = {"episodes": stats.episodes, "return": float(np.mean(stats.returns)) if stats.returns else float("nan")}
    if stats.successes:
        out["success_rate"] = float(np.mean(stats.successes))
    return out

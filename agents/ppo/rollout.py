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

Speed (``RolloutCollector``, ``PolicyStepper``): per vector step the host does one policy call
(optionally one CUDA-graph replay: reset -> observation encoder -> encoder step -> heads -> state
update in fixed buffers), samples on the device, copies the actions back (the step's only sync),
steps the envs, and sends the next observation batch (uint8 images stay uint8) to the device in
one non-blocking copy from pinned memory. Device records are single indexed copies; rewards,
ends and resets are collected on the host and copied once per rollout; truncation bootstraps are
added on the device without a sync. Envs can be split into pipelined groups (``env_groups``).
"""
from __future__ import annotations

import collections
import time
import warnings
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


def make_vector_env(env_fn: Callable[[], gym.Env], num_envs: int, mode: str = "async",
                    copy: bool = True) -> gym.vector.VectorEnv:
    """``num_envs`` copies with same-step autoreset (the ending step returns the reset obs).
    ``copy=False``: observations are returned in the vector env's own buffer (shared memory for
    async), valid until the next step; the rollout copies them straight into its pinned buffer."""
    fns = [env_fn] * num_envs
    if mode == "async":
        return AsyncVectorEnv(fns, autoreset_mode=AutoresetMode.SAME_STEP, copy=copy)
    if mode == "sync":
        return SyncVectorEnv(fns, autoreset_mode=AutoresetMode.SAME_STEP, copy=copy)
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

    def step(self, reward: np.ndarray, done: np.ndarray, info: dict, cols: slice = slice(None)) -> None:
        """One vector step of the envs ``cols`` (all by default)."""
        ret, length = self.ret[cols], self.len[cols]  # views
        ret += reward
        length += 1
        if not done.any():
            return
        idx = np.flatnonzero(done)
        self.returns.extend(ret[idx].tolist())
        self.lengths.extend(length[idx].tolist())
        self.episodes += len(idx)
        final = info.get("final_info", {})
        if "success" in final:
            has = final.get("_success", np.ones_like(done))
            sel = idx[has[idx]]
            self.successes.extend(np.asarray(final["success"])[sel].astype(float).tolist())
        ret[idx] = 0.0
        length[idx] = 0

    def summary(self) -> dict[str, float]:
        out = {}
        if self.returns:
            out["episodic_return"] = float(np.mean(self.returns))
            out["episodic_length"] = float(np.mean(self.lengths))
        if self.successes:
            out["success_rate"] = float(np.mean(self.successes))
        return out


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
        self.obs_shape, self.obs_dtype, self.act_shape, self.act_dtype = obs_shape, obs_dtype, act_shape, act_dtype
        self.obs = torch.zeros((s, e, *obs_shape), dtype=obs_dtype, device=device)
        self.actions = torch.zeros((s, e, *act_shape), dtype=act_dtype, device=device)
        self.logprobs = torch.zeros(s, e, device=device)
        self.values = torch.zeros(s, e, device=device)
        self.rewards = torch.zeros(s, e, device=device)
        self.bootstrap = torch.zeros(s, e, device=device)
        """gamma * V(final obs) where the transition was truncated by a time limit (added to the rewards)"""
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
    def record_start(self, state: Optional[EncoderState], cols: slice = slice(None)) -> None:
        """The memory envs ``cols`` hold before the rollout's first step (before their pending reset)."""
        self.bootstrap[:, cols] = 0.0
        if not self.xl:
            return
        for layer, slot in enumerate(state.slots):
            mem = slot["memory"]
            self.seq[layer, cols, : self.M] = mem["mem"]
            self.seq_valid[layer, cols, : self.M] = mem["mem_valid"]

    def record_step(self, t: int, cols: slice, obs: Tensor, out: "StepOutput", action: Tensor,
                    logprob: Tensor) -> None:
        """Step t of envs ``cols``, one copy each: the observation the policy saw, its outputs, the
        (post-reset) position of each env and the layer inputs it wrote into XL memory (newest slot)."""
        self.obs[t, cols].copy_(obs)
        self.actions[t, cols].copy_(action)
        self.logprobs[t, cols].copy_(logprob)
        self.values[t, cols].copy_(out.value)
        if self.recurrent:
            self.offsets[t, cols].copy_(out.offset)
        if self.xl:
            self.seq[:, cols, self.M + t].copy_(out.inputs)

    def finish(self, rewards: Tensor, ends: Tensor, resets: Tensor) -> None:
        """Per-step host records (S, E) of the rollout in one copy each; episode starts per step (for
        masking keys of earlier episodes in the gathered windows)."""
        self.rewards.copy_(rewards, non_blocking=True)
        self.rewards += self.bootstrap
        self.ends.copy_(ends, non_blocking=True)
        self.resets.copy_(resets, non_blocking=True)
        if not self.xl:
            return
        steps = torch.arange(self.S, device=self.device)[:, None].expand(self.S, self.E)
        marks = torch.where(self.resets, steps, torch.full_like(steps, -(self.M + 1)))
        self.ep_start = torch.cummax(marks, dim=0).values

    # ------------------------------------------------------------------ training gather
    def gather_state(self, flat: Tensor) -> Optional[EncoderState]:
        """The encoder state (post-reset) each flat (step * E + env) index saw in the rollout: one
        advanced index over all layers (no Python loop over sequences)."""
        if not self.recurrent:
            return None
        s, e = flat // self.E, flat % self.E
        offset = self.offsets[s, e]
        if not self.xl:
            return EncoderState(offset, [{"memory": {}, "attention": {}} for _ in range(self.n_slots)])
        pos = s[:, None] + torch.arange(self.M, device=self.device)[None, :]  # (N, M) index in seq
        in_episode = pos >= self.M + self.ep_start[s, e][:, None]
        rows = e[:, None]
        mem = self.seq[:, rows, pos]                            # (L, N, M, d)
        valid = self.seq_valid[:, rows, pos] & in_episode       # (L, N, M)
        return EncoderState(offset, [{"memory": {"mem": mem[layer], "mem_valid": valid[layer]}, "attention": {}}
                                     for layer in range(mem.shape[0])])

    def minibatch(self, flat: Tensor) -> dict[str, Any]:
        s, e = flat // self.E, flat % self.E
        return {"obs": self.obs[s, e], "actions": self.actions[s, e], "logprobs": self.logprobs[s, e],
                "values": self.values[s, e], "advantages": self.advantages[s, e], "returns": self.returns[s, e],
                "state": self.gather_state(flat)}


def state_leaves(state: Optional[EncoderState]) -> list[Tensor]:
    """The state's tensors in a fixed order (offset, then each slot's tensors by sorted key)."""
    out: list[Tensor] = []

    def walk(obj: Any) -> None:
        if isinstance(obj, Tensor):
            out.append(obj)
        elif isinstance(obj, dict):
            for k in sorted(obj):
                walk(obj[k])
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)

    if state is not None:
        walk([state.offset, state.slots])
    return out


class HostMirror:
    """A host tensor the env results are written into (numpy view ``.np``) for the device tensor ``dev``.

    CUDA: pinned host memory and one ``non_blocking`` copy per ``push()``; the caller must not write
    ``.np`` again before the stream has passed that copy (the rollout synchronizes once per step, on
    the action's copy back, which is enqueued after it). CPU: ``dev`` itself, ``push()`` copies nothing.
    """

    def __init__(self, dev: Tensor):
        self.dev = dev
        self.host = torch.zeros(dev.shape, dtype=dev.dtype, pin_memory=True) if dev.is_cuda else dev
        self.np = self.host.numpy()

    def push(self) -> Tensor:
        if self.host is not self.dev:
            self.dev.copy_(self.host, non_blocking=True)
        return self.dev


def capture_graph(fn: Callable[[], Any]) -> tuple[Any, Any]:
    """``fn`` captured as a CUDA graph (its own memory pool): (graph, fn's outputs, refilled by each replay)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


GRAPH_CHECK_TOL = 1e-5
"""largest |graph replay - eager step| (outputs and new state) accepted at capture (normally exactly 0)"""


@dataclass
class StepOutput:
    head: Tensor
    """(E, n_actions) logits, or (E, act_dim) Gaussian mean"""
    value: Tensor
    offset: Optional[Tensor]
    """(E,) position of each env's token after the reset (recurrent policies)"""
    inputs: Optional[Tensor]
    """(layers, E, d) layer inputs written into XL memory by this step"""


class PolicyStepper:
    """The policy's per-step inference for ``E`` envs over static device buffers; eager or CUDA graph.

    The collector writes the observation batch into ``obs`` (the env's dtype: uint8 images go to the
    device as uint8 and are converted there) and the pending episode ends into ``reset``; ``step()``
    applies the reset to the carried encoder state, runs observation encoder -> encoder -> heads,
    advances the state and returns a ``StepOutput``. Sampling is not part of it (``policy.sample``
    draws from the head outside, so the eager and the graph path take the same random numbers).

    ``cuda_graph=True`` (CUDA only) captures that whole step, and the truncation value
    ``V(final_obs | advanced state)``, as CUDA graphs: one launch per step instead of hundreds of
    kernels. The state then lives in fixed tensors updated in place inside the graph. After capture
    one replay is checked against the eager step from the same state; on a capture error or a
    mismatch it warns and stays eager (``self.graphed`` says which path runs, ``graph_error`` why).
    """

    def __init__(self, policy, num_envs: int, obs_shape: tuple, obs_dtype: torch.dtype, device: torch.device,
                 cuda_graph: bool = False):
        self.policy, self.E, self.device = policy, num_envs, device
        self.obs = torch.zeros((num_envs, *obs_shape), dtype=obs_dtype, device=device)
        self.final_obs = torch.zeros_like(self.obs)
        self.reset = torch.zeros(num_envs, dtype=torch.bool, device=device)
        self.state = policy.initial_state(num_envs, device)
        self.xl = policy.recurrent and policy.backbone.memory == "xl"
        self.graphed = False
        self.graph_error: Optional[str] = None
        self.graph_check_max_diff: Optional[float] = None
        self._graphs: Optional[tuple] = None
        if cuda_graph:
            if device.type != "cuda":
                self.graph_error = "cuda_graph needs a CUDA device"
                warnings.warn(f"PPO rollout: cuda_graph is ignored on {device} (CUDA only); running the policy "
                              f"eagerly", RuntimeWarning, stacklevel=2)
            else:
                self._capture()

    # ------------------------------------------------------------------ bodies (eager, or captured)
    def _step_body(self, in_place: bool) -> StepOutput:
        policy, state = self.policy, self.state
        if state is not None:
            state = state.reset(self.reset)
        feat, new_state, _ = policy.features(self.obs, state)
        head, value = policy.heads(feat)
        out = StepOutput(head, value, state.offset if state is not None else None,
                         torch.stack([slot["memory"]["mem"][:, -1] for slot in new_state.slots]) if self.xl else None)
        if new_state is not None:
            if in_place:
                old, new = state_leaves(self.state), state_leaves(new_state)
                if [(t.shape, t.dtype) for t in old] != [(t.shape, t.dtype) for t in new]:
                    raise RuntimeError("the encoder state changes structure from step to step; it cannot be "
                                       "kept in fixed buffers")
                for dst, src in zip(old, new):
                    dst.copy_(src)
            else:
                self.state = new_state
        return out

    def _final_body(self) -> Tensor:
        feat, _, _ = self.policy.features(self.final_obs, self.state)
        return self.policy.heads(feat)[1]

    # ------------------------------------------------------------------ public
    @torch.no_grad()
    def step(self) -> StepOutput:
        if self._graphs is not None:
            self._graphs[0].replay()
            return self._graph_out
        return self._step_body(in_place=False)

    @torch.no_grad()
    def final_value(self) -> Tensor:
        """V(final_obs) under the state as advanced by the last ``step()`` (the truncated episodes' own)."""
        if self._graphs is not None:
            self._graphs[1].replay()
            return self._graph_final
        return self._final_body()

    @torch.no_grad()
    def bootstrap_value(self) -> Tensor:
        """V(obs) under the reset-applied state, without advancing it (eager: once per rollout)."""
        state = self.state.reset(self.reset) if self.state is not None else None
        return self.policy.value(self.obs, state)

    @torch.no_grad()
    def load_state(self, state: Optional[EncoderState]) -> None:
        if self._graphs is not None:
            for dst, src in zip(state_leaves(self.state), state_leaves(state)):
                dst.copy_(src)
        else:
            self.state = state

    # ------------------------------------------------------------------ capture
    @torch.no_grad()
    def _capture(self) -> None:
        was_training = self.policy.training
        self.policy.eval()  # what the rollout runs (no dropout RNG draws inside the graph)
        leaves = state_leaves(self.state)
        snap = [t.clone() for t in leaves]

        def restore() -> None:
            for t, v in zip(leaves, snap):
                t.copy_(v)

        cur = torch.cuda.current_stream(self.device)
        try:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(cur)
            with torch.cuda.stream(side):  # warm-up outside capture (cuBLAS/cuDNN handles, lazy inits)
                for _ in range(2):
                    restore()
                    self._step_body(in_place=True)
                    self._final_body()
            cur.wait_stream(side)
            restore()
            step_graph, out = capture_graph(lambda: self._step_body(in_place=True))
            final_graph, final = capture_graph(self._final_body)
            restore()  # a capture runs nothing; this only matters for emulated captures (tests)
            # the replay must equal the eager step from the same state
            step_graph.replay()
            final_graph.replay()
            got = [out.head, out.value, final, *leaves] + [t for t in (out.offset, out.inputs) if t is not None]
            got = [t.clone() for t in got]
            restore()
            ref_out = self._step_body(in_place=True)
            ref = [ref_out.head, ref_out.value, self._final_body(), *leaves] + \
                [t for t in (ref_out.offset, ref_out.inputs) if t is not None]
            diff = max((float((a.double() - b.double()).abs().max()) if a.numel() else 0.0) for a, b in zip(got, ref))
            self.graph_check_max_diff = diff
            if diff > GRAPH_CHECK_TOL:
                raise RuntimeError(f"graph replay differs from the eager step by {diff:.3g} (> {GRAPH_CHECK_TOL})")
            self._graphs, self._graph_out, self._graph_final = (step_graph, final_graph), out, final
            self.graphed = True
        except Exception as err:  # any capture problem: fall back, say why
            torch.cuda.synchronize(self.device)
            self._graphs = None
            self.graph_error = f"{type(err).__name__}: {err}"
            warnings.warn(f"PPO rollout: CUDA graph capture failed ({self.graph_error}); running the policy "
                          f"eagerly", RuntimeWarning, stacklevel=3)
        finally:
            restore()
            torch.cuda.synchronize(self.device)
            self.policy.train(was_training)


class Lane:
    """One group of envs, columns ``cols`` of the buffer: its vector env, its policy stepper, the pinned
    host mirrors of the stepper's inputs and the pinned action buffer."""

    def __init__(self, policy, envs: gym.vector.VectorEnv, cols: slice, buf: RolloutBuffer, device: torch.device,
                 cuda_graph: bool):
        n = cols.stop - cols.start
        self.envs, self.cols = envs, cols
        self.stepper = PolicyStepper(policy, n, buf.obs_shape, buf.obs_dtype, device, cuda_graph)
        self.obs = HostMirror(self.stepper.obs)
        self.final = HostMirror(self.stepper.final_obs)
        self.reset = HostMirror(self.stepper.reset)
        self.cut = HostMirror(torch.zeros(n, dtype=torch.bool, device=device))
        self.actions = torch.zeros((n, *buf.act_shape), dtype=buf.act_dtype, pin_memory=device.type == "cuda")
        self.event = torch.cuda.Event() if device.type == "cuda" else None
        self.has_async = hasattr(envs, "step_async") and hasattr(envs, "step_wait")
        self.result: Optional[tuple] = None  # a SyncVectorEnv's step result, between act and wait


class RolloutCollector:
    """Fills a ``RolloutBuffer`` from vector envs with the carried per-env encoder state.

    Per vector step: one (graph) policy call on the device, sampling on the device, ONE copy of the
    actions back (the step's only synchronization), the env step, then the host records (rewards,
    ends, resets) go into (S, E) host arrays copied to the device once per rollout, and the next
    observation batch goes to the device in one non-blocking copy from pinned memory. Device-side
    records are single indexed copies. No per-env Python except gathering ``final_obs`` of envs
    cut by a time limit.

    ``envs`` may be several vector envs (groups, e.g. 2 x 8 async workers for 16 envs): group g owns
    the next ``num_envs`` columns of the buffer and has its own stepper, and the groups are pipelined,
    so the policy runs for one group while the other's workers step (``act`` sends group g's actions
    with ``step_async``; its ``wait`` comes after the next group's ``act``). Each group's rows are
    independent, so this changes nothing but the order of the random draws.

    ``timers`` accumulates wall seconds: ``policy`` (step + sample + buffer writes + the action copy
    back), ``env`` (step_async + step_wait: waiting for the workers) and ``host`` (everything else).
    """

    def __init__(self, policy, envs: gym.vector.VectorEnv | list, buf: RolloutBuffer, stats: EpisodeStats,
                 device: torch.device, gamma: float = 0.99, bootstrap_truncated: bool = True,
                 cuda_graph: bool = False):
        self.policy, self.buf, self.stats, self.device = policy, buf, stats, device
        self.gamma, self.bootstrap_truncated = gamma, bootstrap_truncated
        groups = list(envs) if isinstance(envs, (list, tuple)) else [envs]
        if sum(g.num_envs for g in groups) != buf.E:
            raise ValueError(f"the env groups hold {[g.num_envs for g in groups]} envs but the buffer has {buf.E}")
        self.lanes, start = [], 0
        for g in groups:
            self.lanes.append(Lane(policy, g, slice(start, start + g.num_envs), buf, device, cuda_graph))
            start += g.num_envs
        pin = device.type == "cuda"
        self.rewards = torch.zeros(buf.S, buf.E, pin_memory=pin)
        self.ends = torch.zeros(buf.S, buf.E, pin_memory=pin)
        self.resets = torch.zeros(buf.S, buf.E, dtype=torch.bool, pin_memory=pin)
        space = groups[0].single_action_space
        self.clip = (space.low, space.high) if policy.continuous else None
        self.timers = {"policy": 0.0, "env": 0.0, "host": 0.0, "steps": 0}

    @property
    def stepper(self) -> PolicyStepper:
        """The first group's stepper (the only one without groups)."""
        return self.lanes[0].stepper

    def start(self, seed: Optional[int] = None) -> None:
        """Reset the envs (group g's env i gets seed + its column, as one vector env would seed them) and
        begin from their first observations: fresh states, no pending resets."""
        for lane in self.lanes:
            obs, _ = lane.envs.reset(seed=None if seed is None else seed + lane.cols.start)
            np.copyto(lane.obs.np, np.asarray(obs), casting="unsafe")
            lane.obs.push()
            lane.reset.np[:] = False
            lane.reset.push()
            lane.stepper.load_state(self.policy.initial_state(lane.stepper.E, self.device))

    def bootstrap_value(self) -> Tensor:
        """V of every env's current observation under its reset-applied state (for GAE)."""
        return torch.cat([lane.stepper.bootstrap_value() for lane in self.lanes])

    def _act(self, lane: Lane, t: int) -> None:
        clock = time.perf_counter
        t0 = clock()
        out = lane.stepper.step()
        action, logprob = self.policy.sample(out.head)
        lane.actions.copy_(action, non_blocking=lane.event is not None)
        if lane.event is not None:
            lane.event.record()
        self.buf.record_step(t, lane.cols, lane.stepper.obs, out, action, logprob)
        if lane.event is not None:
            lane.event.synchronize()
        env_action = lane.actions.numpy()
        if self.clip is not None:
            env_action = np.clip(env_action, *self.clip)
        t1 = clock()
        if lane.has_async:
            lane.envs.step_async(env_action)
        else:
            lane.result = lane.envs.step(env_action)
        self._t_policy += t1 - t0
        self._t_env += clock() - t1

    def _wait(self, lane: Lane, t: int) -> None:
        t0 = time.perf_counter()
        next_obs, reward, term, trunc, info = lane.envs.step_wait() if lane.has_async else lane.result
        self._t_env += time.perf_counter() - t0
        cols = lane.cols
        done = np.logical_or(term, trunc)
        self.stats.step(reward, done, info, cols)
        self.resets.numpy()[t, cols] = lane.reset.np
        self.rewards.numpy()[t, cols] = reward
        self.ends.numpy()[t, cols] = done
        np.copyto(lane.obs.np, next_obs, casting="unsafe")
        lane.obs.push()
        cut = np.logical_and(trunc, np.logical_not(term))
        if self.bootstrap_truncated and cut.any():
            idx = np.flatnonzero(cut)
            lane.final.np[idx] = np.stack(info["final_obs"][idx])
            lane.final.push()
            lane.cut.np[:] = cut
            v_final = lane.stepper.final_value()
            self.buf.bootstrap[t, cols] = torch.where(lane.cut.push(), self.gamma * v_final, 0.0)
        lane.reset.np[:] = done
        lane.reset.push()

    @torch.no_grad()
    def collect(self) -> None:
        """Fill the buffer with ``S`` steps of every env; the states, observations and pending resets carry
        over to the next call."""
        buf, lanes = self.buf, self.lanes
        self.policy.eval()
        t_start = time.perf_counter()
        self._t_policy = self._t_env = 0.0
        for lane in lanes:
            buf.record_start(lane.stepper.state, lane.cols)
        pending: collections.deque = collections.deque()
        for t in range(buf.S):
            for lane in lanes:  # with one group: act, wait; with two: act A, act B, wait A, act A', wait B, ...
                self._act(lane, t)
                pending.append((lane, t))
                if len(pending) == len(lanes):
                    self._wait(*pending.popleft())
        while pending:
            self._wait(*pending.popleft())
        buf.finish(self.rewards, self.ends, self.resets)
        if self.device.type == "cuda":  # the host arrays are rewritten by the next rollout
            torch.cuda.current_stream(self.device).synchronize()
        total = time.perf_counter() - t_start
        self.timers["policy"] += self._t_policy
        self.timers["env"] += self._t_env
        self.timers["host"] += total - self._t_policy - self._t_env
        self.timers["steps"] += buf.S


@torch.no_grad()
def compute_gae(buf: RolloutBuffer, next_value: Tensor, gamma: float, gae_lambda: float) -> None:
    """Generalized advantage estimation (Schulman et al. 2016) over ``buf``; episode ends cut the trace.
    The backward recursion runs on host copies (S small steps would be S x 6 kernel launches on a GPU)."""
    values, rewards, ends = buf.values.cpu(), buf.rewards.cpu(), buf.ends.cpu()
    next_value = next_value.cpu()
    adv = torch.empty_like(values)
    last = torch.zeros_like(next_value)
    for t in reversed(range(buf.S)):
        nxt = next_value if t == buf.S - 1 else values[t + 1]
        keep = 1.0 - ends[t]
        delta = rewards[t] + gamma * nxt * keep - values[t]
        last = delta + gamma * gae_lambda * keep * last
        adv[t] = last
    buf.advantages.copy_(adv)
    buf.returns.copy_(adv + values)


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

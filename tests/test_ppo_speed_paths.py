"""PPO speed paths: the buffered rollout collector equals a plain per-step loop, the update's precision /
optimizer options keep the replay check exact, host GAE, the benchmark's variants; CUDA graph == eager (GPU)."""
from __future__ import annotations

import dataclasses
import json

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch.distributions import Categorical, Normal

from agents.ppo import PPOConfig, PPOTrainer, gtrxl_backbone, replay_error
from agents.ppo.rollout import EnvFactory, compute_gae, make_vector_env
from rlformer import EncoderState

torch.set_num_threads(1)

CUDA = torch.cuda.is_available()


class CutEnv(gym.Env):
    """Float observations, episodes that end by termination (p = 0.15 a step) or by a time limit of 4..9
    steps (truncation: the rollout bootstraps from ``final_obs``), random rewards."""

    def __init__(self, continuous: bool = False):
        self.observation_space = gym.spaces.Box(-1.0, 1.0, (3,), np.float32)
        self.action_space = (gym.spaces.Box(-1.0, 1.0, (2,), np.float32) if continuous
                             else gym.spaces.Discrete(3))

    def _obs(self):
        return np.array([self.np_random.uniform(-1, 1), self.t / 10.0, self.last], dtype=np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t, self.limit, self.last = 0, int(self.np_random.integers(4, 10)), 0.0
        return self._obs(), {}

    def step(self, action):
        self.t += 1
        self.last = float(np.asarray(action).reshape(-1)[0]) / 3.0
        term = bool(self.np_random.uniform() < 0.15)
        return self._obs(), float(self.np_random.normal()), term, (not term) and self.t >= self.limit, {}


def make_cfg(tmp_path, **kw) -> PPOConfig:
    base = dict(env="cut", num_envs=4, num_steps=12, num_minibatches=4, update_epochs=2, vector="sync", device="cpu",
                backbone=gtrxl_backbone(d_model=32, n_layers=2, n_heads=2, mem_len=6), obs_hidden=32,
                out_dir=str(tmp_path / "run"), tensorboard=False, progress=False, eval_episodes=0, total_steps=4096,
                checkpoint_every=0)
    base.update(kw)
    return PPOConfig(**base)


@torch.no_grad()
def reference_rollout(policy, env_fn, cfg: PPOConfig, steps: int, seed: int) -> dict:
    """The plain loop: a forward on tensors built from the env's arrays every step, the distribution
    sampled through torch.distributions (group by group, in group order, as the pipelined collector draws),
    the state carried and reset, truncated rewards bootstrapped one env at a time on the host."""
    policy.eval()
    envs = make_vector_env(env_fn, cfg.num_envs, "sync")
    obs, _ = envs.reset(seed=cfg.seed)
    n = cfg.num_envs // cfg.env_groups
    groups = [slice(g * n, (g + 1) * n) for g in range(cfg.env_groups)]
    states = [policy.initial_state(n, "cpu") for _ in groups]
    reset = torch.zeros(cfg.num_envs, dtype=torch.bool)
    torch.manual_seed(seed)
    rec = {k: [] for k in ("obs", "actions", "logprobs", "values", "rewards", "ends", "resets", "offsets", "inputs")}
    for _ in range(steps):
        obs_t = torch.as_tensor(np.array(obs), dtype=torch.float32)
        step = {k: [] for k in rec}
        new_states = []
        for g, sl in enumerate(groups):
            state = states[g].reset(reset[sl])
            feat, new_state, _ = policy.features(obs_t[sl], state)
            head = policy.actor(feat)
            dist = Normal(head, policy.log_std.exp().expand_as(head)) if policy.continuous else Categorical(logits=head)
            action = dist.sample()
            logp = dist.log_prob(action)
            step["actions"].append(action)
            step["logprobs"].append(logp.sum(-1) if policy.continuous else logp)
            step["values"].append(policy.critic(feat)[:, 0])
            step["offsets"].append(state.offset)
            step["inputs"].append(torch.stack([s["memory"]["mem"][:, -1] for s in new_state.slots], dim=0))
            new_states.append(new_state)
        action = torch.cat(step["actions"])
        env_action = np.clip(action.numpy(), -1.0, 1.0) if policy.continuous else action.numpy()
        obs, reward, term, trunc, info = envs.step(env_action)
        reward = np.asarray(reward, dtype=np.float32).copy()
        for i in np.flatnonzero(trunc & ~term):  # one env at a time, obviously
            g, row = divmod(int(i), n)
            final = torch.as_tensor(np.array(obs), dtype=torch.float32)[groups[g]]
            final[row] = torch.as_tensor(info["final_obs"][i])
            f_feat, _, _ = policy.features(final, new_states[g])
            reward[i] += cfg.gamma * policy.critic(f_feat)[row, 0].item()
        for k in ("actions", "logprobs", "values", "offsets"):
            rec[k].append(torch.cat(step[k]))
        rec["inputs"].append(torch.cat(step["inputs"], dim=1))
        for k, v in (("obs", obs_t), ("rewards", torch.as_tensor(reward)), ("resets", reset),
                     ("ends", torch.as_tensor(term | trunc).float())):
            rec[k].append(v)
        reset = torch.as_tensor(term | trunc)
        states = new_states
    envs.close()
    return {k: torch.stack(v) for k, v in rec.items()}


@pytest.mark.parametrize("continuous,vector,groups", [(False, "sync", 1), (True, "async", 1), (False, "async", 2)],
                         ids=["discrete-sync", "continuous-async", "discrete-async-2groups"])
def test_collector_equals_plain_loop(tmp_path, continuous, vector, groups):
    """Two consecutive rollouts (state, observation and pending resets carried over) of the buffered
    collector equal the plain per-step loop: observations, actions, log-probs, values, bootstrapped
    rewards, ends, resets, positions and the layer inputs stored for the XL windows; also with the envs
    split into two pipelined groups."""
    env_fn = EnvFactory("cut", {"continuous": continuous}, make=CutEnv)
    cfg = make_cfg(tmp_path, vector=vector, env_groups=groups)
    trainer = PPOTrainer(cfg, env_fn=env_fn)
    try:
        assert len(trainer.collector.lanes) == groups
        ref = reference_rollout(trainer.policy, env_fn, cfg, 2 * cfg.num_steps, seed=7)
        assert ref["ends"].sum() > 4 and ref["resets"][cfg.num_steps:].any()
        assert (ref["rewards"] != 0).any()
        torch.manual_seed(7)
        buf, m = trainer.buf, trainer.buf.M
        for r in range(2):
            start_mem = trainer.buf.seq[:, :, m:].clone() if r else None
            trainer.collect()
            sl = slice(r * cfg.num_steps, (r + 1) * cfg.num_steps)
            torch.testing.assert_close(buf.obs, ref["obs"][sl], rtol=0, atol=0, msg=lambda m, r=r: f"rollout {r}: {m}")
            torch.testing.assert_close(buf.actions, ref["actions"][sl], rtol=0, atol=0)
            for k in ("logprobs", "values", "rewards"):
                torch.testing.assert_close(getattr(buf, k), ref[k][sl], rtol=0, atol=1e-6, msg=k)
            assert torch.equal(buf.ends, ref["ends"][sl]) and torch.equal(buf.resets, ref["resets"][sl])
            assert torch.equal(buf.offsets, ref["offsets"][sl])
            torch.testing.assert_close(buf.seq[:, :, m:], ref["inputs"][sl].permute(1, 2, 0, 3), rtol=0, atol=1e-6)
            if r:  # the second rollout's windows start with the last M inputs of the first one (the valid
                # slots: an episode end inside them cleared the memory before it)
                valid = buf.seq_valid[:, :, :m]
                assert valid.any() and not valid.all()
                assert torch.equal(buf.seq[:, :, :m][valid], start_mem[:, :, -m:][valid])
            rng = torch.get_rng_state()  # replay_error draws a permutation; keep the sampling stream aligned
            assert replay_error(trainer) < 1e-5
            torch.set_rng_state(rng)
    finally:
        trainer.close()


@pytest.mark.parametrize("precision,fused", [("bf16", False), ("tf32", True)])
def test_update_precision_keeps_float32_replay_check(tmp_path, precision, fused):
    """bf16 autocast / TF32 updates (and fused Adam) still report the float32 replay error (< 1e-5, checked
    before any gradient step) and train: finite losses, parameters move."""
    env_fn = EnvFactory("cut", {}, make=CutEnv)
    trainer = PPOTrainer(make_cfg(tmp_path, update_precision=precision, fused_adam=fused), env_fn=env_fn)
    try:
        assert bool(trainer.optimizer.defaults.get("fused")) == fused
        before = [p.detach().clone() for p in trainer.policy.parameters()]
        for _ in range(2):
            trainer.collect()
            metrics = trainer.update()
            assert float(metrics["replay_max_abs_diff"]) < 1e-5
            for k in ("pg_loss", "v_loss", "entropy", "grad_norm"):
                assert torch.isfinite(torch.as_tensor(metrics[k])), k
        moved = [float((p.detach() - b).abs().max()) for p, b in zip(trainer.policy.parameters(), before)]
        assert max(moved) > 1e-4
    finally:
        trainer.close()


def test_bf16_update_runs_the_encoder_in_bf16(tmp_path):
    """The bf16 path really autocasts (the encoder's matmuls run in bf16) while the heads stay float32."""
    trainer = PPOTrainer(make_cfg(tmp_path, update_precision="bf16"), env_fn=EnvFactory("cut", {}, make=CutEnv))
    try:
        trainer.collect()
        mb = trainer.buf.minibatch(torch.arange(8))
        dtypes = {}
        block = trainer.policy.encoder.depth.blocks[0]
        def hook(name):
            def record(mod, args, out):
                dtypes.setdefault(name, out.dtype)
            return record

        watched = (("inp", trainer.policy.inp), ("ff", block.ff.w1), ("actor", trainer.policy.actor))
        hooks = [m.register_forward_hook(hook(name)) for name, m in watched]
        with trainer.precision():
            logprob, _, value, _ = trainer.policy.evaluate(mb["obs"], mb["state"], mb["actions"])
        for h in hooks:
            h.remove()
        assert dtypes == {"inp": torch.bfloat16, "ff": torch.bfloat16, "actor": torch.float32}
        assert logprob.dtype == value.dtype == torch.float32
    finally:
        trainer.close()


def test_host_gae_matches_recursion():
    """compute_gae against the textbook recursion in float64 (episode ends cut the trace)."""
    class Buf:
        S, E = 9, 3
    g = torch.Generator().manual_seed(0)
    buf = Buf()
    buf.values, buf.rewards = torch.randn(9, 3, generator=g), torch.randn(9, 3, generator=g)
    buf.ends = (torch.rand(9, 3, generator=g) < 0.3).float()
    buf.advantages, buf.returns = torch.zeros(9, 3), torch.zeros(9, 3)
    nxt = torch.randn(3, generator=g)
    compute_gae(buf, nxt, gamma=0.9, gae_lambda=0.8)
    v, r, d = buf.values.double().numpy(), buf.rewards.double().numpy(), buf.ends.double().numpy()
    want = np.zeros((9, 3))
    for e in range(3):
        acc = 0.0
        for t in reversed(range(9)):
            nv = nxt[e].item() if t == 8 else v[t + 1, e]
            delta = r[t, e] + 0.9 * nv * (1 - d[t, e]) - v[t, e]
            acc = delta + 0.9 * 0.8 * (1 - d[t, e]) * acc
            want[t, e] = acc
    np.testing.assert_allclose(buf.advantages.numpy(), want, atol=1e-5)
    np.testing.assert_allclose(buf.returns.numpy(), want + v, atol=1e-5)


def test_cuda_graph_default_is_silent_on_cpu(tmp_path):
    """cuda_graph=True is the default: on CPU the trainer runs eagerly without a warning."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        trainer = PPOTrainer(make_cfg(tmp_path, cuda_graph=True), env_fn=EnvFactory("cut", {}, make=CutEnv))
    try:
        assert not trainer.collector.stepper.graphed
        trainer.collect()
        assert replay_error(trainer) < 1e-5
    finally:
        trainer.close()


def test_bench_variants_tiny(tmp_path):
    """scripts/bench_ppo.py --variants at tiny sizes: one row per variant with the rollout breakdown."""
    pytest.importorskip("minigrid")
    from scripts.bench_ppo import apply_variant, BenchConfig, main

    with pytest.raises(ValueError, match="unknown variant token"):
        apply_variant(BenchConfig(), "graph+fp8")
    out = tmp_path / "bench.json"
    rows = main(["--device", "cpu", "--num-envs", "2", "--num-steps", "4", "--updates", "1", "--warmup", "0",
                 "--num-minibatches", "2", "--update-epochs", "1", "--d-model", "16", "--n-heads", "2",
                 "--mem-len", "4", "--vector", "sync", "--variants", "eager", "graph+bf16+split", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert [r["variant"] for r in saved] == ["eager", "graph+bf16+split"] == [r["variant"] for r in rows]
    for r in saved:
        assert "error" not in r, r.get("error")
        assert r["sps"] > 0 and r["replay_max_abs_diff"] < 1e-5
        parts = r["env_s_per_update"] + r["policy_s_per_update"] + r["host_s_per_update"]
        assert parts == pytest.approx(r["rollout_s_per_update"], rel=1e-6)
        assert min(r["env_s_per_update"], r["policy_s_per_update"], r["host_s_per_update"]) > 0
    assert saved[1]["config"]["update_precision"] == "bf16" and saved[1]["config"]["cuda_graph"]
    assert saved[1]["config"]["env_groups"] == 2


class _FakeGraph:
    """CPU stand-in for a captured graph: replay re-runs the captured function and refills its outputs in
    place (a real replay rewrites the captured output tensors the same way)."""

    def __init__(self, fn, out, offset: float = 0.0):
        self.fn, self.out, self.offset = fn, out, offset

    @staticmethod
    def tensors(out):
        if isinstance(out, torch.Tensor):
            return [out]
        fields = (getattr(out, f.name) for f in dataclasses.fields(out))  # (astuple would deep-copy them)
        return [t for t in fields if t is not None]

    def replay(self):
        for dst, src in zip(self.tensors(self.out), self.tensors(self.fn())):
            dst.copy_(src + self.offset if src.is_floating_point() else src)


def _emulate_cuda(monkeypatch, capture):
    """Let PolicyStepper._capture run on the CPU: streams and syncs do nothing, capture_graph is ``capture``."""
    import contextlib

    import agents.ppo.rollout as rollout

    class Stream:
        def __init__(self, *a, **k):
            pass

        def wait_stream(self, other):
            pass

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a, **k: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(rollout, "capture_graph", capture)


def _stepper_pair(kind="transformer"):
    from agents.ppo.policy import PPOPolicy
    from agents.ppo.rollout import PolicyStepper

    torch.manual_seed(0)
    policy = PPOPolicy(gym.spaces.Box(-1, 1, (3,), np.float32), gym.spaces.Discrete(3), kind,
                       gtrxl_backbone(d_model=32, n_layers=2, n_heads=2, mem_len=5), 32)
    make = lambda: PolicyStepper(policy, 4, (3,), torch.float32, torch.device("cpu"))  # noqa: E731
    return policy, make(), make()


@pytest.mark.parametrize("kind", ["transformer", "mlp"])
def test_graph_stepper_logic_emulated_on_cpu(monkeypatch, kind):
    """The graph path's bookkeeping (warm-up and restore, static outputs, in-place state, the capture-time
    check against eager, final/bootstrap values) with CUDA graphs emulated on the CPU: 12 steps with random
    observations and resets equal the eager stepper's."""
    from agents.ppo.rollout import state_leaves

    def capture(fn):
        out = fn()
        return _FakeGraph(fn, out), out

    _emulate_cuda(monkeypatch, capture)
    policy, eager, graph = _stepper_pair(kind)
    fresh = [t.clone() for t in state_leaves(graph.state)]
    graph._capture()
    assert graph.graphed and graph.graph_check_max_diff == 0.0, graph.graph_error
    assert all(torch.equal(a, b) for a, b in zip(state_leaves(graph.state), fresh))  # capture left it fresh
    assert policy.training  # the mode is restored
    g = torch.Generator().manual_seed(1)
    for t in range(12):
        obs, reset = torch.randn(4, 3, generator=g), torch.rand(4, generator=g) < 0.25
        for st in (eager, graph):
            st.obs.copy_(obs)
            st.reset.copy_(reset)
        torch.testing.assert_close(graph.bootstrap_value(), eager.bootstrap_value(), rtol=0, atol=0)
        out_e, out_g = eager.step(), graph.step()
        assert out_g is graph._graph_out
        for k in ("head", "value", "offset", "inputs"):
            a, b = getattr(out_g, k), getattr(out_e, k)
            assert (a is None and b is None) or torch.equal(a, b), (t, k)
        for a, b in zip(state_leaves(graph.state), state_leaves(eager.state)):
            assert torch.equal(a, b)
        final = torch.randn(4, 3, generator=g)
        eager.final_obs.copy_(final)
        graph.final_obs.copy_(final)
        assert torch.equal(graph.final_value(), eager.final_value())
    if kind == "transformer":
        assert state_leaves(graph.state)[0].max() > 0  # positions advanced in the fixed buffers


def test_graph_capture_failures_fall_back_to_eager(monkeypatch):
    """A capture that raises, or whose replay differs from the eager step, leaves the stepper eager (with a
    warning saying why) and its state as it was."""
    from agents.ppo.rollout import state_leaves

    def broken(fn):
        raise RuntimeError("operation not permitted when stream is capturing")

    def drifting(fn):
        out = fn()
        return _FakeGraph(fn, out, offset=1e-3), out

    for capture, why in ((broken, "not permitted"), (drifting, "differs from the eager step")):
        _emulate_cuda(monkeypatch, capture)
        _, eager, st = _stepper_pair()
        with pytest.warns(RuntimeWarning, match=why):
            st._capture()
        assert not st.graphed and why in st.graph_error
        assert all(not t.any() for t in state_leaves(st.state))
        st.obs.normal_()
        eager.obs.copy_(st.obs)
        assert torch.equal(st.step().head, eager.step().head)


# ---------------------------------------------------------------------------------------------- CUDA only

def _cuda_pair(tmp_path, **kw):
    cfg = make_cfg(tmp_path, device="cuda", num_envs=8, num_steps=32, **kw)
    env_fn = EnvFactory("cut", {}, make=CutEnv)
    graph = PPOTrainer(dataclasses.replace(cfg, cuda_graph=True, out_dir=str(tmp_path / "g")), env_fn=env_fn)
    eager = PPOTrainer(dataclasses.replace(cfg, cuda_graph=False, out_dir=str(tmp_path / "e")), env_fn=env_fn)
    return graph, eager


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_cuda_graph_rollout_equals_eager_step_by_step(tmp_path):
    graph, eager = _cuda_pair(tmp_path, update_precision="bf16")
    try:
        st = graph.collector.stepper
        assert st.graphed, st.graph_error
        assert st.graph_check_max_diff <= 1e-6  # replays the eager kernels: normally exactly 0
        for k, v in eager.policy.state_dict().items():
            assert torch.equal(v, graph.policy.state_dict()[k])
        for r in range(2):  # the second rollout continues the carried state in both
            for tr in (graph, eager):
                torch.manual_seed(100 + r)
                tr.collect()
            gb, eb = graph.buf, eager.buf
            assert torch.equal(gb.actions, eb.actions) and torch.equal(gb.obs, eb.obs)
            assert torch.equal(gb.resets, eb.resets) and torch.equal(gb.offsets, eb.offsets)
            assert gb.resets[1:].any()
            for k in ("logprobs", "values", "rewards", "seq"):
                torch.testing.assert_close(getattr(gb, k), getattr(eb, k), rtol=0, atol=1e-6, msg=k)
            assert replay_error(graph) < 1e-5
        metrics = graph.update()
        assert float(metrics["replay_max_abs_diff"]) < 1e-5
        # after the update (weights changed in place) the graph still follows the new weights
        torch.manual_seed(5)
        graph.collect()
        assert replay_error(graph) < 1e-5
    finally:
        graph.close()
        eager.close()


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_cuda_graph_capture_failure_falls_back_to_eager(tmp_path, monkeypatch):
    """A capture that raises (here forced; e.g. a variant that reads tensor values on the host) leaves the
    policy eager, with a warning, and the rollout stays exact."""
    import agents.ppo.rollout as rollout

    def failing_capture(fn):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(rollout, "capture_graph", failing_capture)
    backbone = gtrxl_backbone(d_model=32, n_layers=1, n_heads=2, mem_len=6)
    cfg = make_cfg(tmp_path, device="cuda", backbone=backbone, cuda_graph=True)
    with pytest.warns(RuntimeWarning, match="capture failed"):
        trainer = PPOTrainer(cfg, env_fn=EnvFactory("cut", {}, make=CutEnv))
    try:
        assert not trainer.collector.stepper.graphed and trainer.collector.stepper.graph_error
        trainer.collect()
        assert replay_error(trainer) < 1e-5
    finally:
        trainer.close()


def test_state_is_fixed_structure_for_graphs(tmp_path):
    """The XL state keeps its tensors' shapes from step to step (what in-place graph buffers need)."""
    from agents.ppo.rollout import state_leaves

    trainer = PPOTrainer(make_cfg(tmp_path), env_fn=EnvFactory("cut", {}, make=CutEnv))
    try:
        st = trainer.collector.stepper
        before = [(t.shape, t.dtype) for t in state_leaves(st.state)]
        trainer.collect()
        assert [(t.shape, t.dtype) for t in state_leaves(st.state)] == before
        assert isinstance(st.state, EncoderState) and len(before) == 1 + 2 * 2
    finally:
        trainer.close()

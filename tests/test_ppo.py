"""PPO with a GTrXL memory: exact replay of the rollout in training, resets, resume, learning."""
from __future__ import annotations

import dataclasses
import json

import gymnasium as gym
import numpy as np
import pytest
import torch

import envs  # noqa: F401  (registers rlformer/* ids)
from agents.ppo import PPOConfig, PPOTrainer, gtrxl_backbone, preset_for, replay_error
from agents.ppo.config import EnvOptions

torch.set_num_threads(1)


def tmaze_cfg(tmp_path, corridor: int = 4, **kw) -> PPOConfig:
    base = dict(env="rlformer/TMaze-v0", env_kwargs=EnvOptions(corridor_length=corridor, lag_penalty=-1.0 / corridor),
                num_envs=4, num_steps=32, num_minibatches=4, update_epochs=2, vector="sync", device="cpu",
                backbone=gtrxl_backbone(d_model=32, n_layers=2, n_heads=2, mem_len=8), obs_hidden=32,
                out_dir=str(tmp_path / "run"), tensorboard=False, progress=False, eval_episodes=0, total_steps=4096)
    base.update(kw)
    return PPOConfig(**base)


class NoisyImageEnv(gym.Env):
    """5x5x3 uint8 symbolic-grid observations (values 0..10, like MiniGrid's), continuous 2-d actions, random episode lengths (resets mid-rollout)."""

    def __init__(self):
        self.observation_space = gym.spaces.Box(0, 255, (5, 5, 3), np.uint8)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t, self.len = 0, int(self.np_random.integers(2, 9))
        return self.np_random.integers(0, 11, (5, 5, 3)).astype(np.uint8), {}

    def step(self, action):
        self.t += 1
        obs = self.np_random.integers(0, 11, (5, 5, 3)).astype(np.uint8)
        return obs, float(-np.square(action).sum()), self.t >= self.len, False, {}


def assert_exact_replay(trainer: PPOTrainer, rollouts: int = 3) -> None:
    for _ in range(rollouts):
        trainer.collect()
        resets = trainer.buf.resets
        assert resets[1:].any(), "the rollout must cross episode boundaries for this test to mean anything"
        err = replay_error(trainer)  # all minibatches, before any gradient step
        assert err < 1e-5, err
        trainer.update()  # params change between rollouts; memory carries over into the next rollout


@pytest.mark.parametrize("backbone", [
    gtrxl_backbone(d_model=32, n_layers=2, n_heads=2, mem_len=8),                       # rope, gtrxl, xl
    gtrxl_backbone(d_model=32, n_layers=2, n_heads=2, mem_len=5, position="learned"),   # input positions (offsets)
    gtrxl_backbone(d_model=32, n_layers=1, n_heads=2, mem_len=6, position="xl"),        # dense score path
    dataclasses.replace(gtrxl_backbone(d_model=32, n_layers=2, n_heads=2), block="pre_ln", memory="none",
                        position="learned"),
], ids=["gtrxl-rope", "gtrxl-learned", "gtrxl-xlpos", "preln-nomem"])
def test_training_path_replays_rollout_exactly(tmp_path, backbone):
    trainer = PPOTrainer(tmaze_cfg(tmp_path, backbone=backbone))
    try:
        assert trainer.buf.xl == (backbone.memory == "xl")
        assert_exact_replay(trainer)
    finally:
        trainer.close()


def test_exact_replay_images_continuous_actions(tmp_path):
    cfg = tmaze_cfg(tmp_path, env="noisy-image", num_envs=3, num_steps=16)
    trainer = PPOTrainer(cfg, env_fn=NoisyImageEnv)
    try:
        assert trainer.policy.continuous and trainer.policy.obs_enc.kind == "image"
        assert trainer.buf.obs.dtype == torch.uint8
        assert_exact_replay(trainer, rollouts=2)
    finally:
        trainer.close()


def test_replay_check_is_sensitive(tmp_path):
    """Negative control: windows shifted by one step (the classic indexing bug) are caught."""
    trainer = PPOTrainer(tmaze_cfg(tmp_path, corridor=3))
    try:
        trainer.collect()
        trainer.buf.seq = torch.roll(trainer.buf.seq, shifts=1, dims=2)
        assert replay_error(trainer) > 1e-3
    finally:
        trainer.close()


def test_resets_clear_state_and_autoreset_is_same_step(tmp_path):
    trainer = PPOTrainer(tmaze_cfg(tmp_path, corridor=2, num_steps=24))
    try:
        trainer.collect()
        buf = trainer.buf
        # a reset step follows every episode end, and only those
        assert torch.equal(buf.resets[1:], buf.ends[:-1].bool())
        # same-step autoreset: the observation right after an episode end is a new episode's first
        # (T-maze shows the cue only at t = 0), and its state was cleared (position 0)
        s, e = torch.nonzero(buf.resets, as_tuple=True)
        assert s.numel() > 0
        assert (buf.obs[s, e, :2].sum(-1) == 1).all()
        assert (buf.offsets[s, e] == 0).all()
        # the state at a reset step is a fresh one: same outputs as a fresh state on that observation
        with torch.no_grad():
            trainer.policy.eval()
            fresh = trainer.policy.initial_state(s.numel(), trainer.device)
            feat, _, _ = trainer.policy.features(buf.obs[s, e], fresh)
            logp, _ = trainer.policy.log_prob_entropy(trainer.policy.distribution(feat), buf.actions[s, e])
        torch.testing.assert_close(logp, buf.logprobs[s, e], atol=1e-5, rtol=0)
        # steps that are not resets kept counting positions
        cont = ~buf.resets[1:]
        assert (buf.offsets[1:][cont] == buf.offsets[:-1][cont] + 1).all()
    finally:
        trainer.close()


def test_resume_continues_counters_and_weights(tmp_path):
    cfg = tmaze_cfg(tmp_path, total_steps=4 * 128, checkpoint_every=1)
    first = PPOTrainer(dataclasses.replace(cfg, total_steps=2 * 128))
    try:
        first.train()
        saved = {k: v.clone() for k, v in first.policy.state_dict().items()}
    finally:
        first.close()
    probe = PPOTrainer(dataclasses.replace(cfg, resume=True))
    try:
        info = probe.load()
        assert probe.update_idx == 2 and probe.global_step == 256 and info["step"] == 256
        for k, v in probe.policy.state_dict().items():
            torch.testing.assert_close(v, saved[k], rtol=0, atol=0)
        assert probe.schedule()[0] == pytest.approx(cfg.lr * 0.5)  # LR annealing continues, not restarts
        assert len(probe.stats.returns) > 0  # episode statistics carried over
    finally:
        probe.close()
    second = PPOTrainer(dataclasses.replace(cfg, resume=True))
    try:
        summary = second.train()  # loads the latest checkpoint, runs updates 3 and 4
    finally:
        second.close()
    assert summary["global_step"] == 512 and summary["updates"] == 4
    data = json.loads((tmp_path / "run" / "summary.json").read_text())
    for key in ("final_return", "success_rate", "sps", "wall_s", "config"):
        assert key in data
    assert data["config"]["resume"] is True


def test_cli_presets_and_overrides(tmp_path):
    from scripts.train_gtrxl import default_config

    cfg, _ = default_config(["--env", "rlformer/TMaze-v0", "--device", "cpu"])
    assert cfg.env_kwargs.corridor_length == 10 and cfg.backbone.block == "gtrxl" and cfg.backbone.memory == "xl"
    long, rest = default_config(["--preset", "tmaze-long", "--env-kwargs.corridor-length", "200"])
    assert long.env_kwargs.corridor_length == 200 and long.backbone.mem_len >= 201 and "--preset" not in rest
    assert preset_for("rlformer/TMaze-v0") is not preset_for("rlformer/TMaze-v0")


def test_bad_backbones_fail_early():
    from agents.ppo.policy import check_backbone

    with pytest.raises(ValueError, match="causal"):
        check_backbone(dataclasses.replace(gtrxl_backbone(), causal=False))


def _train(tmp_path, policy: str, steps: int, seed: int = 0, **kw) -> dict:
    from agents.ppo import train

    cfg = tmaze_cfg(tmp_path / policy, corridor=8, policy=policy, num_envs=16, num_steps=32, num_minibatches=4,
                    update_epochs=4, total_steps=steps, seed=seed, lr=5e-4, ent_coef=0.01, ent_coef_final=0.0,
                    backbone=gtrxl_backbone(d_model=32, n_layers=1, n_heads=2, mem_len=12), eval_episodes=64,
                    checkpoint_every=0, **kw)
    return train(cfg)


@pytest.mark.slow
def test_gtrxl_solves_tmaze_mlp_stays_at_chance(tmp_path):
    """Corridor 8: GTrXL reaches >= 0.95 greedy success (seeds 0-3 solve by ~60k steps); the MLP learns
    to walk to the junction but can only guess the side (a memoryless policy is capped at 1/2)."""
    gtrxl = _train(tmp_path, "transformer", 100_000, stop_success=0.98)
    mlp = _train(tmp_path, "mlp", 100_000)
    print(f"\nT-maze corridor 8: GTrXL eval success {gtrxl['success_rate']:.2f} after {gtrxl['global_step']} steps "
          f"({gtrxl['wall_s']:.0f} s); MLP {mlp['success_rate']:.2f} after {mlp['global_step']} steps "
          f"({mlp['wall_s']:.0f} s)")
    assert gtrxl["success_rate"] >= 0.95
    assert 0.25 <= mlp["success_rate"] <= 0.75
    assert mlp["final_return"] > -0.5  # it did learn to walk (a wandering agent collects about -2)


def test_recurrent_ppo_baseline_same_harness(tmp_path):
    from agents.baselines.recurrent_ppo import from_ppo_config, train_recurrent_ppo

    ppo = tmaze_cfg(tmp_path, corridor=3, total_steps=1024)
    cfg = from_ppo_config(ppo, out_dir=str(tmp_path / "lstm"), eval_episodes=8, tensorboard=False)
    assert cfg.env_kwargs == ppo.env_kwargs and cfg.total_steps == ppo.total_steps and cfg.num_steps == ppo.num_steps
    result = train_recurrent_ppo(cfg)
    assert result["global_step"] >= 1024 and result["eval_episodes"] >= 8
    data = json.loads((tmp_path / "lstm" / "summary.json").read_text())
    for key in ("final_return", "success_rate", "train_success_rate", "sps", "wall_s", "config"):
        assert key in data
    assert 0.0 <= data["success_rate"] <= 1.0

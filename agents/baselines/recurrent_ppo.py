"""sb3-contrib ``RecurrentPPO`` (LSTM policy) in the GTrXL PPO harness.

Same env construction (``agents.ppo.rollout.EnvFactory``: the registered id + the same
``EnvOptions``), the same step budget, the same reporting: TensorBoard ``charts/episodic_return``,
``charts/success_rate``, ``charts/sps`` over the last ``stats_window`` training episodes, a final
greedy evaluation that counts each env's first episodes (no bias towards short ones), and
``summary.json`` with ``final_return``, ``success_rate``, ``train_success_rate``, ``sps``,
``wall_s`` and the config.

    python -m agents.baselines.recurrent_ppo --env rlformer/TMaze-v0 --env-kwargs.corridor-length 10
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np

from agents.common import RunLogger, gpu_memory_mb, make_run_dir, progress, resolve_device, seed_everything, write_summary
from agents.ppo.config import PPOConfig, RunConfig
from agents.ppo.rollout import EnvFactory
from agents.ppo.policy import is_image


@dataclass
class RecurrentPPOConfig(RunConfig):
    """RecurrentPPO (sb3-contrib) settings: the shared run/PPO fields plus the LSTM's size.

    ``vector``: sync = DummyVecEnv, async = SubprocVecEnv (default sync: sb3 steps envs in lockstep).
    """

    vector: Literal["async", "sync"] = "sync"
    lstm_hidden: int = 128
    n_lstm_layers: int = 1


def from_ppo_config(ppo: PPOConfig, **overrides) -> RecurrentPPOConfig:
    """The RecurrentPPO config matching a ``PPOConfig``: same env, options, budget, rollout shape, PPO settings."""
    kw = {f.name: getattr(ppo, f.name) for f in dataclasses.fields(RunConfig)
          if f.name not in ("out_dir", "vector", "threads", "time_limit_s")}
    kw["env_kwargs"] = dataclasses.replace(ppo.env_kwargs)
    kw.update(overrides)
    return RecurrentPPOConfig(**kw)


class _Stats:
    def __init__(self, num_envs: int, window: int):
        from collections import deque

        self.returns, self.successes = deque(maxlen=window), deque(maxlen=window)
        self.ret = np.zeros(num_envs)
        self.episodes = 0

    def step(self, rewards, dones, infos, count: Optional[np.ndarray] = None) -> None:
        self.ret += rewards
        for i in np.flatnonzero(dones):
            if count is None or count[i]:
                self.returns.append(float(self.ret[i]))
                if "success" in infos[i]:
                    self.successes.append(float(infos[i]["success"]))
                self.episodes += 1
            self.ret[i] = 0.0

    def summary(self) -> dict:
        out = {}
        if self.returns:
            out["episodic_return"] = float(np.mean(self.returns))
        if self.successes:
            out["success_rate"] = float(np.mean(self.successes))
        return out


def _make_vec_env(cfg: RecurrentPPOConfig):
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

    factory = EnvFactory(cfg.env, cfg.env_kwargs.kwargs())
    cls = SubprocVecEnv if cfg.vector == "async" else DummyVecEnv
    venv = cls([factory] * cfg.num_envs)
    venv.seed(cfg.seed)
    return venv


def evaluate_recurrent(model, venv, episodes: int, deterministic: bool = True) -> dict:
    """Greedy episodes with the LSTM state carried and reset at episode starts."""
    n = venv.num_envs
    per_env = -(-episodes // n)
    counted = np.zeros(n, dtype=np.int64)
    stats = _Stats(n, per_env * n)
    obs = venv.reset()
    lstm_state, starts = None, np.ones(n, dtype=bool)
    while (counted < per_env).any():
        action, lstm_state = model.predict(obs, state=lstm_state, episode_start=starts, deterministic=deterministic)
        obs, rewards, dones, infos = venv.step(action)
        stats.step(rewards, dones, infos, count=counted < per_env)
        counted += dones
        starts = dones
    out = {"episodes": stats.episodes, "return": float(np.mean(stats.returns))}
    if stats.successes:
        out["success_rate"] = float(np.mean(stats.successes))
    return out


def train_recurrent_ppo(cfg: RecurrentPPOConfig) -> dict:
    import torch
    from sb3_contrib import RecurrentPPO
    from stable_baselines3.common.callbacks import BaseCallback

    device = resolve_device(cfg.device)
    torch.set_num_threads(cfg.threads if cfg.threads is not None else (1 if device.type == "cpu" else torch.get_num_threads()))
    seed_everything(cfg.seed)
    run_dir = make_run_dir(cfg.out_dir, f"{cfg.env.replace('/', '_')}-recurrent_ppo-seed{cfg.seed}")
    venv = _make_vec_env(cfg)
    space = venv.observation_space
    policy = "CnnLstmPolicy" if is_image(space) and min(space.shape[:2]) >= 36 else "MlpLstmPolicy"
    batch = cfg.num_envs * cfg.num_steps
    model = RecurrentPPO(policy, venv, learning_rate=lambda frac: cfg.lr * frac, n_steps=cfg.num_steps,
                         batch_size=batch // cfg.num_minibatches, n_epochs=cfg.update_epochs, gamma=cfg.gamma,
                         gae_lambda=cfg.gae_lambda, clip_range=cfg.clip_coef, ent_coef=cfg.ent_coef,
                         vf_coef=cfg.vf_coef, max_grad_norm=cfg.max_grad_norm, seed=cfg.seed, device=device,
                         policy_kwargs={"lstm_hidden_size": cfg.lstm_hidden, "n_lstm_layers": cfg.n_lstm_layers})
    logger = RunLogger(run_dir, enabled=cfg.tensorboard)
    stats = _Stats(cfg.num_envs, cfg.stats_window)
    bar = progress(cfg.total_steps, desc="recurrent-ppo", unit="step")
    t0 = time.perf_counter()

    class Track(BaseCallback):
        def _on_step(self) -> bool:
            stats.step(self.locals["rewards"], self.locals["dones"], self.locals["infos"])
            bar.update(cfg.num_envs)
            return cfg.time_limit_s is None or time.perf_counter() - t0 < cfg.time_limit_s

        def _on_rollout_end(self) -> None:
            sps = self.num_timesteps / max(time.perf_counter() - t0, 1e-9)
            logger.scalars({**{f"charts/{k}": v for k, v in stats.summary().items()}, "charts/sps": sps,
                            **gpu_memory_mb(device)}, self.num_timesteps)

    try:
        model.learn(total_timesteps=cfg.total_steps, callback=Track())
        wall = time.perf_counter() - t0
        ep = stats.summary()
        result = {"env": cfg.env, "policy": "recurrent_ppo_lstm", "global_step": int(model.num_timesteps),
                  "final_return": ep.get("episodic_return"), "train_success_rate": ep.get("success_rate"),
                  "success_rate": ep.get("success_rate"), "sps": model.num_timesteps / wall, "wall_s": wall}
        if cfg.eval_episodes > 0:
            ev = evaluate_recurrent(model, venv, cfg.eval_episodes, cfg.eval_deterministic)
            result.update(eval_return=ev["return"], eval_episodes=ev["episodes"])
            if "success_rate" in ev:
                result.update(eval_success_rate=ev["success_rate"], success_rate=ev["success_rate"])
        result.update(gpu_memory_mb(device, prefix="gpu_"))
        model.save(Path(run_dir) / "recurrent_ppo.zip")
        write_summary(run_dir, result, config=cfg)
        return result
    finally:
        bar.close()
        logger.close()
        venv.close()


def main(argv: Optional[list[str]] = None) -> dict:
    import json

    import tyro

    cfg = tyro.cli(RecurrentPPOConfig, args=argv)
    result = train_recurrent_ppo(cfg)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

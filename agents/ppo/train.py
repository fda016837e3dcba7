"""PPO (Schulman et al. 2017) with a transformer memory: the training loop.

Clipped surrogate objective, GAE (Schulman et al. 2016), per-minibatch advantage normalization,
(optionally clipped) value loss, entropy bonus (optionally annealed), linear learning-rate
annealing, global grad-norm clipping, optional KL early stop. Rollouts and the stored memory
windows that make the training forward exact are described in ``agents.ppo.rollout``.

    trainer = PPOTrainer(cfg)          # builds envs, policy, optimizer (resumes with cfg.resume)
    summary = trainer.train()          # writes TensorBoard, checkpoints, summary.json
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path
from typing import Callable, Optional

import gymnasium as gym
import torch
from torch import Tensor, nn

from agents.common import (RunLogger, gpu_memory_mb, latest_checkpoint, load_checkpoint, make_run_dir, progress,
                           resolve_device, save_checkpoint, seed_everything, write_summary)
from agents.ppo.config import PPOConfig
from agents.ppo.policy import PPOPolicy
from agents.ppo.rollout import (EnvFactory, EpisodeStats, RolloutBuffer, RolloutCollector, compute_gae,
                                evaluate_policy, make_vector_env)


def default_run_name(cfg: PPOConfig) -> str:
    return f"{cfg.env.replace('/', '_')}-{cfg.policy}-seed{cfg.seed}"


class PPOTrainer:
    """Owns the envs, the policy, the optimizer, the rollout buffer and the counters."""

    def __init__(self, cfg: PPOConfig, env_fn: Optional[Callable[[], gym.Env]] = None,
                 run_dir: Optional[str | Path] = None):
        if cfg.batch_size % cfg.num_minibatches:
            raise ValueError(f"num_envs * num_steps = {cfg.batch_size} is not divisible by num_minibatches = "
                             f"{cfg.num_minibatches}; pick num_minibatches dividing it")
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        elif self.device.type == "cpu":
            torch.set_num_threads(1)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
            torch.backends.cudnn.allow_tf32 = cfg.tf32
        seed_everything(cfg.seed)
        self.run_dir = Path(run_dir) if run_dir is not None else make_run_dir(cfg.out_dir, default_run_name(cfg))
        self.env_fn = env_fn or EnvFactory(cfg.env, cfg.env_kwargs.kwargs())
        if cfg.env_groups < 1 or cfg.num_envs % cfg.env_groups:
            raise ValueError(f"env_groups = {cfg.env_groups} must be >= 1 and divide num_envs = {cfg.num_envs}")
        self.env_groups = [make_vector_env(self.env_fn, cfg.num_envs // cfg.env_groups, cfg.vector, copy=False)
                           for _ in range(cfg.env_groups)]
        self.envs = self.env_groups[0]  # the final evaluation runs on the first group
        obs_space, act_space = self.envs.single_observation_space, self.envs.single_action_space
        self.policy = PPOPolicy(obs_space, act_space, cfg.policy, cfg.backbone, cfg.obs_hidden,
                                cfg.mlp_layers).to(self.device)
        if cfg.compile:
            self.policy.features = torch.compile(self.policy.features)
        fused = cfg.fused_adam if cfg.fused_adam is not None else self.device.type == "cuda"
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=cfg.lr, eps=1e-5,
                                          **({"fused": True} if fused else {}))
        self.buf = RolloutBuffer(cfg.num_steps, cfg.num_envs, obs_space, act_space, self.policy, self.device)
        self.stats = EpisodeStats(cfg.num_envs, cfg.stats_window)
        self.update_idx = 0
        self.global_step = 0
        self.wall_before = 0.0  # wall seconds of earlier sessions of a resumed run
        self.collector = RolloutCollector(self.policy, self.env_groups, self.buf, self.stats, self.device, cfg.gamma,
                                          cfg.bootstrap_truncated,
                                          cuda_graph=cfg.cuda_graph and self.device.type == "cuda")
        self.collector.start(seed=cfg.seed)

    # ------------------------------------------------------------------ one update
    def collect(self) -> None:
        """One rollout into ``self.buf``, then GAE (its time counts as rollout host time)."""
        cfg = self.cfg
        self.collector.collect()
        t0 = time.perf_counter()
        compute_gae(self.buf, self.collector.bootstrap_value(), cfg.gamma, cfg.gae_lambda)
        self.collector.timers["host"] += time.perf_counter() - t0

    def precision(self) -> contextlib.AbstractContextManager:
        """The update's forward/backward precision (``cfg.update_precision``)."""
        mode, dev = self.cfg.update_precision, self.device
        if mode == "bf16":
            return torch.autocast(dev.type, dtype=torch.bfloat16)
        if mode == "tf32" and dev.type == "cuda":
            return allow_tf32()
        return contextlib.nullcontext()

    @torch.no_grad()
    def recompute(self, flat: Tensor) -> tuple[Tensor, Tensor]:
        """Training-path log-probs and values of the flat (step * num_envs + env) indices."""
        self.policy.train()
        mb = self.buf.minibatch(flat)
        logprob, _, value, _ = self.policy.evaluate(mb["obs"], mb["state"], mb["actions"])
        return logprob, value

    def schedule(self) -> tuple[float, float]:
        cfg = self.cfg
        frac = 1.0 - self.update_idx / cfg.num_updates
        lr = cfg.lr * frac if cfg.anneal_lr else cfg.lr
        ent = cfg.ent_coef if cfg.ent_coef_final is None else cfg.ent_coef_final + (cfg.ent_coef - cfg.ent_coef_final) * frac
        return lr, ent

    def update(self) -> dict[str, Tensor | float]:
        cfg, buf, policy = self.cfg, self.buf, self.policy
        lr, ent_coef = self.schedule()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        policy.train()
        n, mbs = cfg.batch_size, cfg.minibatch_size
        sums: dict[str, list[Tensor]] = {k: [] for k in ("pg_loss", "v_loss", "entropy", "approx_kl", "old_approx_kl",
                                                         "clipfrac", "aux_loss", "grad_norm")}
        replay_error = None
        for _epoch in range(cfg.update_epochs):
            perm = torch.randperm(n, device=self.device)
            for start in range(0, n, mbs):
                mb = buf.minibatch(perm[start:start + mbs])
                if replay_error is None and cfg.update_precision != "fp32":  # the check stays float32
                    with torch.no_grad():
                        logprob, _, value, _ = policy.evaluate(mb["obs"], mb["state"], mb["actions"])
                    replay_error = replay_diff(logprob, value, mb)
                with self.precision():
                    logprob, entropy, value, aux = policy.evaluate(mb["obs"], mb["state"], mb["actions"])
                logratio = logprob - mb["logprobs"]
                ratio = logratio.exp()
                if replay_error is None:  # before the first gradient step: must be ~0 (exact replay)
                    replay_error = replay_diff(logprob.detach(), value.detach(), mb)
                with torch.no_grad():
                    sums["old_approx_kl"].append((-logratio).mean())
                    sums["approx_kl"].append(((ratio - 1) - logratio).mean())
                    sums["clipfrac"].append(((ratio - 1.0).abs() > cfg.clip_coef).float().mean())
                adv = mb["advantages"]
                if cfg.norm_adv and adv.numel() > 1:
                    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
                pg_loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - cfg.clip_coef, 1 + cfg.clip_coef)).mean()
                if cfg.clip_vloss:
                    v_clipped = mb["values"] + (value - mb["values"]).clamp(-cfg.clip_coef, cfg.clip_coef)
                    v_loss = 0.5 * torch.max((value - mb["returns"]) ** 2, (v_clipped - mb["returns"]) ** 2).mean()
                else:
                    v_loss = 0.5 * ((value - mb["returns"]) ** 2).mean()
                ent = entropy.mean()
                loss = pg_loss - ent_coef * ent + cfg.vf_coef * v_loss + aux
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                for k, v in (("pg_loss", pg_loss), ("v_loss", v_loss), ("entropy", ent), ("aux_loss", aux),
                             ("grad_norm", grad_norm)):
                    sums[k].append(v.detach())
            if cfg.target_kl is not None and float(sums["approx_kl"][-1]) > cfg.target_kl:
                break
        y_pred, y_true = buf.values.flatten(), buf.returns.flatten()
        var_y = y_true.var()
        explained_var = torch.where(var_y > 0, 1 - (y_true - y_pred).var() / var_y, torch.full_like(var_y, float("nan")))
        out: dict[str, Tensor | float] = {k: torch.stack(v).float().mean() for k, v in sums.items() if v}
        out.update(explained_variance=explained_var, replay_max_abs_diff=replay_error, lr=lr, ent_coef=ent_coef)
        return out

    # ------------------------------------------------------------------ checkpoints
    def save(self, wall_s: float) -> Path:
        extra = {"update_idx": self.update_idx, "global_step": self.global_step, "wall_s": wall_s,
                 "returns": list(self.stats.returns), "lengths": list(self.stats.lengths),
                 "successes": list(self.stats.successes), "episodes": self.stats.episodes,
                 "config": dataclasses.asdict(self.cfg)}
        return save_checkpoint(self.run_dir / "checkpoints", self.global_step, self.policy, self.optimizer,
                               extra=extra)

    def load(self, path: Optional[str | Path] = None) -> dict:
        """Restore model, optimizer, RNG and counters (envs restart their episodes; states start fresh)."""
        info = load_checkpoint(path or self.run_dir / "checkpoints", self.policy, self.optimizer,
                               map_location=self.device)
        extra = info["extra"]
        self.update_idx, self.global_step = extra["update_idx"], extra["global_step"]
        self.wall_before = extra.get("wall_s", 0.0)
        self.stats.returns.extend(extra.get("returns", []))
        self.stats.lengths.extend(extra.get("lengths", []))
        self.stats.successes.extend(extra.get("successes", []))
        self.stats.episodes = extra.get("episodes", 0)
        return info

    # ------------------------------------------------------------------ loop
    def train(self) -> dict:
        cfg = self.cfg
        if cfg.resume:
            if latest_checkpoint(self.run_dir / "checkpoints") is None:
                raise FileNotFoundError(f"--resume: no checkpoint in {self.run_dir / 'checkpoints'}; "
                                        f"pass the --out-dir of the run to continue")
            self.load()
        logger = RunLogger(self.run_dir, enabled=cfg.tensorboard)
        bar = progress(cfg.num_updates * cfg.batch_size, initial=self.global_step, desc="ppo", unit="step",
                       disable=None if cfg.progress is None else not cfg.progress)
        t0 = time.perf_counter()
        start_step = self.global_step
        sps = 0.0
        try:
            while self.update_idx < cfg.num_updates:
                self.collect()
                metrics = self.update()
                self.update_idx += 1
                self.global_step += cfg.batch_size
                bar.update(cfg.batch_size)
                elapsed = time.perf_counter() - t0
                sps = (self.global_step - start_step) / max(elapsed, 1e-9)
                ep = self.stats.summary()
                if self.update_idx % cfg.log_every == 0 or self.update_idx == cfg.num_updates:
                    logged = logger.scalars({**{f"train/{k}": v for k, v in metrics.items()},
                                             **{f"charts/{k}": v for k, v in ep.items()},
                                             "charts/sps": sps, **gpu_memory_mb(self.device)}, self.global_step)
                    bar.set_postfix(ret=f"{ep.get('episodic_return', float('nan')):.3f}",
                                    succ=f"{ep.get('success_rate', float('nan')):.2f}",
                                    kl=f"{logged['train/approx_kl']:.4f}", sps=f"{sps:.0f}", refresh=False)
                if cfg.checkpoint_every and self.update_idx % cfg.checkpoint_every == 0:
                    self.save(self.wall_before + elapsed)
                if cfg.time_limit_s is not None and self.wall_before + elapsed >= cfg.time_limit_s:
                    break
                if (cfg.stop_success is not None and len(self.stats.successes) >= self.stats.successes.maxlen
                        and ep.get("success_rate", 0.0) >= cfg.stop_success):
                    break
            train_wall = time.perf_counter() - t0
            self.save(self.wall_before + train_wall)
            ep = self.stats.summary()
            result = {"env": cfg.env, "policy": cfg.policy, "global_step": self.global_step,
                      "updates": self.update_idx, "final_return": ep.get("episodic_return"),
                      "train_success_rate": ep.get("success_rate"), "sps": sps,
                      "wall_s": self.wall_before + train_wall}
            result["success_rate"] = result["train_success_rate"]
            if cfg.eval_episodes > 0:
                ev = evaluate_policy(self.policy, self.envs, cfg.eval_episodes, self.device,
                                     deterministic=cfg.eval_deterministic, seed=cfg.seed + 10_000)
                result.update(eval_return=ev["return"], eval_episodes=ev["episodes"])
                if "success_rate" in ev:
                    result["eval_success_rate"] = ev["success_rate"]
                    result["success_rate"] = ev["success_rate"]
                logger.scalars({"eval/return": ev["return"], **({"eval/success_rate": ev["success_rate"]}
                                                                 if "success_rate" in ev else {})}, self.global_step)
            result.update(gpu_memory_mb(self.device, prefix="gpu_"))
            write_summary(self.run_dir, result, config=cfg)
            return result
        finally:
            bar.close()
            logger.close()

    def close(self) -> None:
        for envs in self.env_groups:
            envs.close()


@contextlib.contextmanager
def allow_tf32():
    """TF32 matmuls and convolutions inside the block (CUDA), the previous settings after it."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def replay_diff(logprob: Tensor, value: Tensor, mb: dict) -> Tensor:
    """max(|log-prob - rollout log-prob|, |value - rollout value|) over a minibatch (a device scalar)."""
    return torch.maximum((logprob - mb["logprobs"]).abs().max(), (value - mb["values"]).abs().max())


def train(cfg: PPOConfig, env_fn: Optional[Callable[[], gym.Env]] = None) -> dict:
    """Build a trainer, run it, close the envs; returns the summary dict."""
    trainer = PPOTrainer(cfg, env_fn=env_fn)
    try:
        return trainer.train()
    finally:
        trainer.close()


def replay_error(trainer: PPOTrainer) -> float:
    """Max |log-prob| and |value| difference between the rollout and the training path, over the buffer."""
    flat = torch.randperm(trainer.cfg.batch_size, device=trainer.device)
    worst = 0.0
    for start in range(0, flat.numel(), trainer.cfg.minibatch_size):
        idx = flat[start:start + trainer.cfg.minibatch_size]
        logprob, value = trainer.recompute(idx)
        worst = max(worst, float(replay_diff(logprob, value, trainer.buf.minibatch(idx))))
    return worst


__all__ = ["PPOTrainer", "default_run_name", "replay_error", "train"]

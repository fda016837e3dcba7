"""What can an MSE imitator of a stochastic SAC behaviour policy score? (diagnostic for issue 6)

A model trained with mean-squared error on actions sampled from a stochastic policy learns, at
best, the conditional mean of those actions, E[a | s] = E_eps[tanh(mu(s) + sigma(s) eps)]
(SAC's squashed Gaussian). For actions near the +-1 bounds this is NOT the deterministic
policy tanh(mu(s)): the squash pulls the mean inward. BC (and DT where the return-to-go
carries little action information) therefore imitates the "conditional-mean policy", which
this script rolls out next to the deterministic and the stochastic policy on the same seeds:

    python scripts/behaviour_policy_probe.py --policy ../shared/datasets/hopper_medium_sac.zip --episodes 50

Prints raw and D4RL-normalized returns (Hopper reference -20.272305 / 3234.3) per mode, the
share of episodes that end before the time limit, and (``--out``) writes them as JSON.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Optional

import gymnasium as gym
import numpy as np
import torch
import tyro

from envs.datasets import D4RL_REF_SCORES, normalized_score


@dataclass
class Args:
    policy: str = "../shared/datasets/hopper_medium_sac.zip"
    """SB3 SAC behaviour policy (the one that generated the dataset)"""
    env_id: str = "Hopper-v5"
    episodes: int = 50
    """episodes per mode (all run at once in one synchronous vector env)"""
    samples: int = 256
    """Monte-Carlo samples of eps per state for the conditional mean"""
    modes: list[str] = field(default_factory=lambda: ["deterministic", "conditional_mean", "stochastic"])
    seed: int = 10_000
    """episode i is reset with seed + i (the dataset used 123 + i; these are held-out seeds)"""
    out: Optional[str] = None


def policy_actions(actor, obs: torch.Tensor, mode: str, samples: int, gen: torch.Generator) -> torch.Tensor:
    """Actions of SAC's squashed Gaussian pi(a|s) = tanh(N(mu(s), sigma(s)^2)) in one of three modes."""
    mean, log_std, _ = actor.get_action_dist_params(obs)
    if mode == "deterministic":
        return torch.tanh(mean)
    std = log_std.exp()
    if mode == "stochastic":
        return torch.tanh(mean + std * torch.randn(mean.shape, generator=gen))
    if mode == "conditional_mean":
        eps = torch.randn((samples, *mean.shape), generator=gen)
        return torch.tanh(mean + std * eps).mean(0)
    raise ValueError(f"mode {mode!r}: expected deterministic, conditional_mean or stochastic")


def rollout(actor, args: Args, mode: str) -> dict:
    # default next-step autoreset: a finished env restarts on its next step; ``alive`` ignores that part
    envs = gym.vector.SyncVectorEnv([lambda: gym.make(args.env_id) for _ in range(args.episodes)])
    obs, _ = envs.reset(seed=[args.seed + i for i in range(args.episodes)])
    gen = torch.Generator().manual_seed(args.seed)
    returns = np.zeros(args.episodes)
    lengths = np.zeros(args.episodes, dtype=int)
    alive = np.ones(args.episodes, dtype=bool)
    fell = np.zeros(args.episodes, dtype=bool)
    with torch.no_grad():
        while alive.any():
            act = policy_actions(actor, torch.as_tensor(obs, dtype=torch.float32), mode, args.samples, gen).numpy()
            obs, rew, term, trunc, _ = envs.step(act)
            returns += rew * alive
            lengths += alive
            fell |= term & alive
            alive &= ~(term | trunc)
    envs.close()
    score = normalized_score(returns, D4RL_REF_SCORES["hopper"])
    return {"mode": mode, "return_mean": float(returns.mean()), "return_std": float(returns.std()),
            "normalized_mean": float(np.mean(score)), "normalized_median": float(np.median(score)),
            "fell_share": float(fell.mean()), "length_mean": float(lengths.mean()), "episodes": args.episodes}


def main(args: Args) -> list[dict]:
    from stable_baselines3 import SAC

    torch.set_num_threads(1)
    actor = SAC.load(args.policy, device="cpu").policy.actor
    rows = []
    for mode in args.modes:
        t0 = time.time()
        row = rollout(actor, args, mode)
        row["wall_s"] = round(time.time() - t0, 1)
        rows.append(row)
        print(f"{mode:17s} return {row['return_mean']:7.1f} +- {row['return_std']:6.1f}  normalized "
              f"{row['normalized_mean']:5.1f} (median {row['normalized_median']:5.1f})  fell "
              f"{100 * row['fell_share']:5.1f}%  length {row['length_mean']:6.1f}  ({row['wall_s']} s)", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main(tyro.cli(Args))

"""How fast a DT variant fits the data, and whether it uses the returns-to-go (CPU-sized probe).

    python scripts/dt_fit_probe.py --variant dt-gpt2 --steps 2000 --dataset-root /tmp/minari   # --init gpt2
    python scripts/dt_fit_probe.py --variant dt-authors --steps 2000     # Chen et al.'s init (the default)
    python scripts/dt_fit_probe.py --variant dt-pos --steps 2000         # gpt2 init + learned positions
    python scripts/dt_fit_probe.py --variant hf --steps 2000             # Hugging Face DT

Trains ``--steps`` updates (batch 64, K = 20, warm-up steps/5, eager, 1 torch thread), prints the mean
training loss of every 250 updates, then the loss of the trained model on 30 held batches of 256
windows with the true returns-to-go and with the returns-to-go shuffled across the batch: a model
that conditions on the return loses accuracy when they are shuffled.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, not installed

import tyro


@dataclass
class ProbeConfig:
    variant: Literal["dt-gpt2", "dt-authors", "dt-pos", "hf"] = "dt-gpt2"
    steps: int = 2000
    env: str = "hopper-medium"
    dataset_root: Optional[str] = None
    seed: int = 0


def main(argv: Optional[list[str]] = None) -> dict:
    args = tyro.cli(ProbeConfig, args=argv, description=__doc__)
    import numpy as np
    import torch

    torch.set_num_threads(1)
    if args.dataset_root:
        os.environ["MINARI_DATASETS_PATH"] = str(Path(args.dataset_root).resolve())
    from agents.common import seed_everything
    from agents.dt.config import DTConfig, default_backbone
    from agents.dt.data import WindowSampler, load_offline_data
    from agents.dt.model import masked_action_loss
    from agents.dt.train import Updater, build_model, make_optimizer

    seed_everything(args.seed)
    data = load_offline_data(args.env, download=False)
    backbone = default_backbone()
    if args.variant == "dt-pos":
        backbone = dataclasses.replace(backbone, position="learned", max_len=64)
    cfg = DTConfig(env=args.env, model="hf" if args.variant == "hf" else "dt", backbone=backbone,
                   init="authors" if args.variant == "dt-authors" else "gpt2", warmup_steps=max(1, args.steps // 5),
                   train_steps=args.steps, device="cpu").resolved()
    sampler = WindowSampler(data, cfg.context_len, cfg.return_scale, cfg.max_ep_len, "cpu")
    model = build_model(cfg, data.state_dim, data.act_dim)
    opt, sched = make_optimizer(model, cfg, torch.device("cpu"))
    updater = Updater(model, sampler, opt, sched, cfg.batch_size, cfg.grad_clip, torch.device("cpu"))
    t0, curve = time.perf_counter(), []
    for i in range(args.steps):
        updater.step()
        if (i + 1) % 250 == 0:
            curve.append(round(float(updater.pop_means(250)[0]), 4))
    model.eval()
    gen = torch.Generator().manual_seed(1)
    true_rtg, shuffled = [], []
    with torch.no_grad():
        for _ in range(30):
            b = sampler.sample(256, generator=gen)
            true_rtg.append(float(masked_action_loss(model(*b.as_tuple()), b.actions, b.mask)))
            perm = torch.randperm(256, generator=gen)
            pred = model(b.states, b.actions, b.returns_to_go[perm], b.timesteps, b.mask)
            shuffled.append(float(masked_action_loss(pred, b.actions, b.mask)))
    out = {"variant": args.variant, "loss_every_250": curve, "held_loss": float(np.mean(true_rtg)),
           "held_loss_rtg_shuffled": float(np.mean(shuffled)), "wall_s": time.perf_counter() - t0}
    print(out, flush=True)
    return out


if __name__ == "__main__":
    main()

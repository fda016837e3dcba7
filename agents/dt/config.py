"""DTConfig: every setting of a Decision Transformer run (tyro CLI: ``scripts/train_dt.py --help``).

Fields left at ``None`` take the preset's value (``resolve_preset``):

=================  ===============================  ===============================
field              ``quick`` (default)              ``paper`` (Chen et al. 2021)
=================  ===============================  ===============================
train_steps        1,000                            100,000
warmup_steps       100                              10,000
eval_episodes      10 per target                    100 per target
checkpoint_every   500                              10,000
=================  ===============================  ===============================

The quick preset, measured on a 2-core CPU machine on the full local hopper-medium rebuild
(1M steps): 8.4 updates/s, 137 s end to end including a 10-episode evaluation per target
(normalized score 57.6 at target 3600, 62.4 at 1800).

Both: AdamW lr 1e-4, weight decay 1e-4, grad-norm clip 0.25, batch 64, K = 20, return
scale 1000; backbone 3 layers, d = 128, 1 head, dropout 0.1, pre-LN, ReLU 4d feed-forward,
full causal attention, no positional encoding (time enters through the timestep embedding).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional, Tuple

from rlformer import EncoderConfig

#: Target returns of Chen et al. 2021 (Table 5 / their experiment.py), per task.
PAPER_TARGETS: dict[str, Tuple[float, ...]] = {
    "hopper": (3600.0, 1800.0),
    "halfcheetah": (12000.0, 6000.0),
    "walker2d": (5000.0, 2500.0),
}

PRESETS: dict[str, dict[str, int]] = {
    "quick": {"train_steps": 1_000, "warmup_steps": 100, "eval_episodes": 10, "checkpoint_every": 500},
    "paper": {"train_steps": 100_000, "warmup_steps": 10_000, "eval_episodes": 100, "checkpoint_every": 10_000},
}


def default_backbone() -> EncoderConfig:
    """Chen et al.'s GPT-2: 3 layers, d=128, 1 head, dropout 0.1, pre-LN, ReLU 4d FF, no position embedding."""
    return EncoderConfig(d_model=128, n_layers=3, n_heads=1, d_ff=None, activation="relu", dropout=0.1,
                         attention="full", position="none", memory="none", block="pre_ln", causal=True)


@dataclass
class DTConfig:
    """Train and evaluate a Decision Transformer (or a baseline) on a Minari dataset."""

    env: str = "hopper-medium"
    """dataset: short name (hopper-medium) or Minari id (mujoco/hopper/medium-v0)"""
    model: Literal["dt", "bc", "hf"] = "dt"
    """dt: Decision Transformer on the rlformer backbone; bc: behaviour cloning (same backbone, states only);
    hf: Hugging Face DecisionTransformerModel (needs `pip install rlformer[bench]`; ignores --backbone.*)"""
    preset: Literal["quick", "paper"] = "quick"
    """quick: 1,000 updates (measured: 137 s end to end on a 2-core CPU box, normalized ~60 on hopper-medium); paper: Chen et al.'s 100k updates, 100 eval episodes"""
    train_steps: Optional[int] = None
    """gradient updates (None: the preset's)"""
    batch_size: int = 64
    context_len: int = 20
    """K: timesteps per window (3K tokens)"""
    lr: float = 1e-4
    weight_decay: float = 1e-4
    warmup_steps: Optional[int] = None
    """linear learning-rate warm-up (None: the preset's)"""
    grad_clip: float = 0.25
    return_scale: float = 1000.0
    """returns-to-go are divided by this (1000 for MuJoCo)"""
    max_ep_len: int = 1000
    """size of the timestep embedding table"""
    init: Literal["authors", "gpt2"] = "authors"
    """authors: Chen et al.'s code (GPT-2 init in the backbone, PyTorch defaults for the token embeddings and the
    action head); gpt2: N(0, 0.02) for every layer, as Hugging Face does (fits faster, same scores so far:
    RESULTS.md)"""
    eval_episodes: Optional[int] = None
    """episodes per target return (None: the preset's; 0: no evaluation)"""
    eval_targets: Tuple[float, ...] = ()
    """target returns (empty: the paper's for the task, e.g. hopper 3600 1800)"""
    eval_max_steps: int = 1000
    eval_every: int = 0
    """also evaluate every N updates (0: only at the end)"""
    eval_vector: Literal["async", "sync"] = "async"
    """gymnasium.vector mode for evaluation"""
    eval_seed: int = 10_000
    """episode j of every target uses env seed eval_seed + j"""
    seed: int = 0
    device: str = "auto"
    """auto | cpu | cuda | cuda:N"""
    compile: bool = True
    """torch.compile the model on CUDA (CPU always runs eager)"""
    cuda_graph: bool = True
    """on CUDA, capture the whole update (sample, forward, backward, clip, AdamW) in one CUDA graph"""
    amp: bool = True
    """bf16 autocast on CUDA"""
    out_dir: Optional[str] = None
    """run directory (default: runs/<model>-<env>-<preset>-seed<seed>)"""
    resume: bool = False
    """continue from the latest checkpoint in the run directory"""
    log_every: int = 100
    """TensorBoard scalars every N updates (the only host syncs of the training loop)"""
    checkpoint_every: Optional[int] = None
    """save a checkpoint every N updates (None: the preset's; 0: only at the end)"""
    dataset_root: Optional[str] = None
    """Minari store to read (sets MINARI_DATASETS_PATH); default: Minari's own"""
    download: bool = True
    """try Minari's hub when there is no local copy"""
    tensorboard: bool = True
    backbone: EncoderConfig = field(default_factory=default_backbone)
    """the rlformer encoder (any causal variant): --backbone.attention, --backbone.position, ..."""

    def resolved(self) -> "DTConfig":
        return resolve_preset(self)


def resolve_preset(cfg: DTConfig) -> DTConfig:
    """A copy with every None field filled from ``cfg.preset`` and the targets from the task."""
    if cfg.preset not in PRESETS:
        raise ValueError(f"unknown preset {cfg.preset!r}; choose one of {sorted(PRESETS)}")
    fill = {k: v for k, v in PRESETS[cfg.preset].items() if getattr(cfg, k) is None}
    out = dataclasses.replace(cfg, **fill)
    if not out.eval_targets:
        out = dataclasses.replace(out, eval_targets=default_targets(cfg.env))
    return out


def default_targets(env: str) -> Tuple[float, ...]:
    """The paper's target returns for the dataset's task; ValueError naming --eval-targets otherwise."""
    from envs.datasets import env_family

    fam = env_family(env)
    if fam not in PAPER_TARGETS:
        raise ValueError(f"no default target returns for task {fam!r} (known: {sorted(PAPER_TARGETS)}); "
                         "pass --eval-targets R1 R2 ...")
    return PAPER_TARGETS[fam]

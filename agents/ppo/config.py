"""PPO configuration (one dataclass, tyro-friendly) and the per-task presets.

``scripts/train_gtrxl.py --env rlformer/TMaze-v0`` starts from ``preset_for(env)`` and every
other flag overrides it; ``--backbone.*`` is a nested ``rlformer.EncoderConfig``.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from rlformer import EncoderConfig


def gtrxl_backbone(d_model: int = 64, n_layers: int = 2, n_heads: int = 4, mem_len: int = 32,
                   position: str = "rope", **kw: Any) -> EncoderConfig:
    """The default PPO backbone: GTrXL blocks (Parisotto et al. 2019) over an XL memory."""
    return EncoderConfig(d_model=d_model, n_layers=n_layers, n_heads=n_heads, mem_len=mem_len, block="gtrxl",
                         memory="xl", attention="full", position=position, causal=True, dropout=0.0, **kw)


@dataclass
class EnvOptions:
    """Keyword arguments for ``gymnasium.make`` (only the fields that are set are passed)."""

    corridor_length: Optional[int] = None
    """rlformer/TMaze-v0: corridor length L"""
    max_steps: Optional[int] = None
    """rlformer/TMaze-v0: time limit (default 2 (L + 1))"""
    lag_penalty: Optional[float] = None
    """rlformer/TMaze-v0: reward added on each step the agent is behind x = t (Ni et al. 2023 use -1/L)"""
    delay: Optional[int] = None
    """rlformer/RepeatFirst-v0: blank steps between the symbol and the query"""
    num_symbols: Optional[int] = None
    """rlformer/RepeatFirst-v0: number of symbols"""
    view: Optional[str] = None
    """MiniGrid adapters: 'symbolic' (7x7x3 grid) or 'rgb'"""
    extra: str = ""
    """any other kwargs as JSON, e.g. '{"distractors": true}'"""

    def kwargs(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name != "extra" and getattr(self, f.name) is not None}
        if self.extra:
            out.update(json.loads(self.extra))
        return out


@dataclass
class RunConfig:
    """What every on-policy agent of the harness shares (GTrXL-PPO and the RecurrentPPO baseline)."""

    env: str = "rlformer/TMaze-v0"
    """gymnasium id (``import envs`` registers the rlformer/* ids)"""
    env_kwargs: EnvOptions = field(default_factory=EnvOptions)
    total_steps: int = 200_000
    """environment steps (all envs together)"""
    num_envs: int = 16
    num_steps: int = 64
    """rollout length per env; one update uses num_envs * num_steps transitions"""
    seed: int = 1
    device: str = "auto"
    """auto | cpu | cuda | cuda:N"""
    out_dir: Optional[str] = None
    """run directory (default runs/<env>-<policy>-seed<seed>)"""
    vector: Literal["async", "sync"] = "async"
    """gymnasium.vector backend (async = one process per env)"""
    env_groups: int = 1
    """split the envs into this many vector envs stepped in a pipeline: the policy runs for one group
    while the other groups' async workers step (PPO; same results up to the order of random draws)"""
    threads: Optional[int] = None
    """torch CPU threads; None = 1 when the model runs on the CPU (more threads spin against the env
    workers and other jobs on small machines), torch's default otherwise"""
    lr: float = 5e-4
    gamma: float = 0.99
    gae_lambda: float = 0.95
    num_minibatches: int = 4
    update_epochs: int = 4
    clip_coef: float = 0.2
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    stats_window: int = 100
    """training episodes averaged for return / success"""
    eval_episodes: int = 100
    """episodes of the final evaluation (0 = none)"""
    eval_deterministic: bool = True
    """final evaluation takes the most likely action"""
    tensorboard: bool = True
    time_limit_s: Optional[float] = None
    """stop training after this many wall seconds (the summary says how many steps were done)"""


@dataclass
class PPOConfig(RunConfig):
    """PPO (Schulman et al. 2017) with a transformer-memory policy; defaults are the T-maze CPU preset."""

    resume: bool = False
    """continue the run in out_dir from its latest checkpoint (model, optimizer, RNG, counters)"""
    policy: Literal["transformer", "mlp"] = "transformer"
    """transformer: the rlformer encoder below (GTrXL by default); mlp: memoryless baseline"""
    backbone: EncoderConfig = field(default_factory=gtrxl_backbone)
    obs_hidden: int = 64
    """width of the observation encoder (MLP hidden / CNN projection)"""
    mlp_layers: int = 2
    """policy=mlp: hidden layers after the observation encoder"""
    anneal_lr: bool = True
    norm_adv: bool = True
    clip_vloss: bool = False
    ent_coef_final: Optional[float] = None
    """anneal the entropy bonus linearly to this value (None = constant)"""
    target_kl: Optional[float] = None
    """stop an update's epochs early when the approximate KL exceeds this"""
    bootstrap_truncated: bool = True
    """on time-limit truncation add gamma * V(final obs) to the reward (the episode still ends)"""
    tf32: bool = False
    """allow TF32 matmuls/convolutions on CUDA (faster; the rollout/training replay is then exact only to
    ~1e-3 because batch sizes pick different kernels)"""
    compile: bool = False
    """torch.compile the policy (CUDA; fixed shapes make it cheap)"""
    cuda_graph: bool = True
    """CUDA: run the rollout's per-step policy inference (reset -> encoder step -> heads -> state update)
    as one captured CUDA graph; checked against the eager step at capture, falls back to eager with a
    warning if capture fails (agents.ppo.rollout.PolicyStepper). Ignored on CPU. H100, MiniGrid-MemoryS9
    84x84 bench: 3,387 vs 1,417 env steps/s eager (BENCHMARKS.md)"""
    update_precision: Literal["fp32", "tf32", "bf16"] = "fp32"
    """precision of the PPO update's forward/backward: fp32, TF32 matmuls/convs (CUDA) or bf16 autocast.
    Rollouts stay float32, and the replay check (first minibatch, before any gradient step) is then a
    separate float32 forward"""
    fused_adam: Optional[bool] = None
    """fused Adam kernel; None = on CUDA"""
    checkpoint_every: int = 50
    """updates between checkpoints (0 = only at the end)"""
    log_every: int = 1
    """updates between TensorBoard writes"""
    stop_success: Optional[float] = None
    """stop early once the training success rate over stats_window episodes reaches this"""
    progress: Optional[bool] = None
    """progress bar: None = when stderr is a terminal"""

    @property
    def batch_size(self) -> int:
        return self.num_envs * self.num_steps

    @property
    def minibatch_size(self) -> int:
        return self.batch_size // self.num_minibatches

    @property
    def num_updates(self) -> int:
        return max(1, self.total_steps // self.batch_size)


def _tmaze(corridor: int, **kw: Any) -> PPOConfig:
    opts = EnvOptions(corridor_length=corridor, lag_penalty=-1.0 / corridor)
    return PPOConfig(env="rlformer/TMaze-v0", env_kwargs=opts, **kw)


#: Presets: the config ``--env ID`` starts from (all fields can still be overridden).
PRESETS: dict[str, PPOConfig] = {
    # CPU, < 10 min on 2 cores: corridor 10, 2 small GTrXL layers, memory covering the episode;
    # sync envs: a T-maze step costs microseconds, less than a process round trip.
    "rlformer/TMaze-v0": _tmaze(10, total_steps=120_000, num_envs=16, num_steps=64,
                                backbone=gtrxl_backbone(d_model=64, n_layers=2, n_heads=4, mem_len=24),
                                ent_coef=0.01, ent_coef_final=0.0, vector="sync"),
    "rlformer/RepeatFirst-v0": PPOConfig(env="rlformer/RepeatFirst-v0", env_kwargs=EnvOptions(delay=10),
                                         total_steps=200_000,
                                         backbone=gtrxl_backbone(mem_len=16)),
    "rlformer/CartPole-P-v0": PPOConfig(env="rlformer/CartPole-P-v0", total_steps=300_000, num_steps=128,
                                        backbone=gtrxl_backbone(mem_len=16), lr=3e-4),
    "rlformer/POPGym-RepeatPreviousMedium-v0": PPOConfig(
        env="rlformer/POPGym-RepeatPreviousMedium-v0", total_steps=5_000_000, num_envs=32, num_steps=256,
        num_minibatches=8, backbone=gtrxl_backbone(d_model=128, n_layers=3, n_heads=4, mem_len=64),
        obs_hidden=128, lr=3e-4, ent_coef=0.001),
    "rlformer/MiniGrid-MemoryS13Random-v0": PPOConfig(
        env="rlformer/MiniGrid-MemoryS13Random-v0", env_kwargs=EnvOptions(view="symbolic"), total_steps=5_000_000,
        num_envs=32, num_steps=256, num_minibatches=8,
        backbone=gtrxl_backbone(d_model=256, n_layers=2, n_heads=4, mem_len=64), obs_hidden=256, lr=2.5e-4,
        ent_coef=0.001),
}


def tmaze_long(corridor: int = 200, total_steps: int = 2_000_000) -> PPOConfig:
    """GPU preset for long passive T-mazes: memory reaching back over the whole corridor, many small
    updates (4096 steps each: on corridor 30, 8192-step updates were still at chance after 393k steps
    while 2048-step updates solved it at 205k), stop at 0.97 training success."""
    mem = 1 << (corridor + 1).bit_length()  # next power of two above L + 1
    return _tmaze(corridor, total_steps=total_steps, num_envs=32, num_steps=128, num_minibatches=8,
                  backbone=gtrxl_backbone(d_model=128, n_layers=2, n_heads=4, mem_len=mem), lr=5e-4,
                  ent_coef=0.01, ent_coef_final=0.0, vector="sync", stop_success=0.97)


def preset_for(env: str) -> PPOConfig:
    """A copy of the preset for ``env`` (the plain defaults with ``env`` set when there is none)."""
    base = PRESETS.get(env)
    if base is None:
        return PPOConfig(env=env)
    return dataclasses.replace(base, env_kwargs=dataclasses.replace(base.env_kwargs),
                               backbone=dataclasses.replace(base.backbone))

"""Actor-critic policy: observation encoder -> rlformer encoder (one token per step) -> heads.

Observation encoders: an MLP for vectors (Box of any shape, flattened; Discrete one-hot), a
CNN for images (H, W, C): the Nature-DQN stack for large renders (e.g. MiniGrid 84x84 RGB,
scaled by 1/255) and a small 2x2-conv stack for symbolic grids (MiniGrid's 7x7x3, raw values).
Actions: Categorical for Discrete, a diagonal Gaussian with a state-independent log-std for Box.

The transformer path feeds one token per environment step (``T = 1``) and carries the
``EncoderState``; with ``memory='xl'`` the state starts *full length*: ``mem_len`` zero slots
marked invalid (zeros = fresh, see rlformer.state), so every step of a rollout, and every
recomputed step in training, attends over exactly ``mem_len + 1`` keys with the same indices.
"""
from __future__ import annotations

from typing import Optional

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor, nn
from torch.distributions import Categorical, Normal

from rlformer import EncoderConfig, EncoderState, build_encoder, validate


def layer_init(layer: nn.Module, std: float = float(np.sqrt(2)), bias: float = 0.0) -> nn.Module:
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias)
    return layer


def is_image(space: gym.Space) -> bool:
    return isinstance(space, gym.spaces.Box) and len(space.shape) == 3


class ObsEncoder(nn.Module):
    """obs (B, *shape) -> (B, out_dim) features."""

    def __init__(self, space: gym.Space, out_dim: int):
        super().__init__()
        self.out_dim = out_dim
        self.kind = "vector"
        if isinstance(space, gym.spaces.Discrete):
            self.kind, self.n = "discrete", int(space.n)
            self.net = nn.Sequential(layer_init(nn.Linear(self.n, out_dim)), nn.ReLU())
        elif is_image(space):
            h, w, c = space.shape
            self.kind = "image"
            if min(h, w) >= 36:  # rendered pixels
                self.scale = 1.0 / 255.0
                conv = nn.Sequential(
                    layer_init(nn.Conv2d(c, 32, 8, stride=4)), nn.ReLU(),
                    layer_init(nn.Conv2d(32, 64, 4, stride=2)), nn.ReLU(),
                    layer_init(nn.Conv2d(64, 64, 3, stride=1)), nn.ReLU(), nn.Flatten())
            else:  # small symbolic grids
                self.scale = 1.0
                conv = nn.Sequential(
                    layer_init(nn.Conv2d(c, 16, 2)), nn.ReLU(),
                    layer_init(nn.Conv2d(16, 32, 2)), nn.ReLU(),
                    layer_init(nn.Conv2d(32, 64, 2)), nn.ReLU(), nn.Flatten())
            with torch.no_grad():
                n_flat = conv(torch.zeros(1, c, h, w)).shape[1]
            self.net = nn.Sequential(conv, layer_init(nn.Linear(n_flat, out_dim)), nn.ReLU())
        elif isinstance(space, gym.spaces.Box):
            n = int(np.prod(space.shape))
            self.net = nn.Sequential(layer_init(nn.Linear(n, out_dim)), nn.ReLU(),
                                     layer_init(nn.Linear(out_dim, out_dim)), nn.ReLU())
        else:
            raise ValueError(f"observation space {space} is not supported; use a Box (vector or HxWxC image) "
                             f"or Discrete space (wrap Dict/Tuple spaces with gymnasium's FlattenObservation)")

    def forward(self, obs: Tensor) -> Tensor:
        if self.kind == "discrete":
            return self.net(nn.functional.one_hot(obs.long().reshape(-1), self.n).float())
        if self.kind == "image":
            return self.net(obs.float().permute(0, 3, 1, 2) * self.scale)
        return self.net(obs.float().reshape(obs.shape[0], -1))


class PPOPolicy(nn.Module):
    """``act(obs, state) -> (action, logprob, value, new_state)``; ``evaluate(obs, state, action)``.

    ``policy='transformer'``: features = rlformer encoder over the step's token with the carried
    state. ``policy='mlp'``: memoryless (state is always None).
    """

    def __init__(self, obs_space: gym.Space, act_space: gym.Space, policy: str = "transformer",
                 backbone: Optional[EncoderConfig] = None, obs_hidden: int = 64, mlp_layers: int = 2):
        super().__init__()
        self.policy = policy
        self.obs_enc = ObsEncoder(obs_space, obs_hidden)
        if policy == "transformer":
            if backbone is None:
                raise ValueError("policy='transformer' needs a backbone EncoderConfig")
            check_backbone(backbone)
            self.backbone = backbone
            self.inp = layer_init(nn.Linear(obs_hidden, backbone.d_model), std=1.0)
            self.encoder = build_encoder(backbone)
            feat = backbone.d_model
        elif policy == "mlp":
            self.backbone = None
            layers: list[nn.Module] = []
            for _ in range(mlp_layers):
                layers += [layer_init(nn.Linear(obs_hidden, obs_hidden)), nn.Tanh()]
            self.core = nn.Sequential(*layers)
            feat = obs_hidden
        else:
            raise ValueError(f"policy must be 'transformer' or 'mlp', got {policy!r}")
        self.continuous = isinstance(act_space, gym.spaces.Box)
        if self.continuous:
            n_act = int(np.prod(act_space.shape))
            self.actor = layer_init(nn.Linear(feat, n_act), std=0.01)
            self.log_std = nn.Parameter(torch.zeros(n_act))
        elif isinstance(act_space, gym.spaces.Discrete):
            self.actor = layer_init(nn.Linear(feat, int(act_space.n)), std=0.01)
        else:
            raise ValueError(f"action space {act_space} is not supported; use Discrete or Box")
        self.critic = layer_init(nn.Linear(feat, 1), std=1.0)

    # ------------------------------------------------------------------ state
    @property
    def recurrent(self) -> bool:
        return self.policy == "transformer" and self.encoder.stateful

    def initial_state(self, batch: int, device: torch.device | str) -> Optional[EncoderState]:
        """Fresh state; XL memories start full length (zeros, invalid) so shapes never change."""
        if not self.recurrent:
            return None
        state = self.encoder.initial_state(batch, device)
        if self.backbone.memory == "xl":
            m, d = self.backbone.mem_len, self.backbone.d_model
            state.slots = [{"memory": {"mem": torch.zeros(batch, m, d, device=device),
                                       "mem_valid": torch.zeros(batch, m, dtype=torch.bool, device=device)},
                            "attention": {}} for _ in state.slots]
        return state

    # ------------------------------------------------------------------ forward
    def features(self, obs: Tensor, state: Optional[EncoderState]) -> tuple[Tensor, Optional[EncoderState], Tensor]:
        """(B, feat), the new state, the encoder's aux loss. ``state`` already has resets applied."""
        z = self.obs_enc(obs)
        if self.policy == "mlp":
            return self.core(z), None, torch.zeros((), device=z.device)
        out = self.encoder(self.inp(z)[:, None], state=state)
        return out.output[:, 0], out.state, out.aux_loss

    def heads(self, feat: Tensor) -> tuple[Tensor, Tensor]:
        """(distribution parameters: logits, or the Gaussian mean; value), in float32 even under autocast."""
        with torch.autocast(feat.device.type, enabled=False):
            feat = feat.float()
            return self.actor(feat), self.critic(feat)[:, 0]

    def dist_from_head(self, head: Tensor):
        """The action distribution of ``heads()``'s first output (no argument validation: it syncs on CUDA)."""
        if self.continuous:
            return Normal(head, self.log_std.exp().expand_as(head), validate_args=False)
        return Categorical(logits=head, validate_args=False)

    def distribution(self, feat: Tensor):
        return self.dist_from_head(self.heads(feat)[0])

    def log_prob_entropy(self, dist, action: Tensor) -> tuple[Tensor, Tensor]:
        if self.continuous:
            return dist.log_prob(action).sum(-1), dist.entropy().sum(-1)
        return dist.log_prob(action), dist.entropy()

    def sample(self, head: Tensor, deterministic: bool = False) -> tuple[Tensor, Tensor]:
        """(action, log-prob) drawn from the distribution of ``head``; the rollout's eager and CUDA-graph
        paths both sample here, outside any graph, so they take the same draws from torch's RNG."""
        dist = self.dist_from_head(head)
        if deterministic:
            action = dist.mean if self.continuous else head.argmax(-1)
        else:
            action = dist.sample()
        logprob = dist.log_prob(action)
        return action, (logprob.sum(-1) if self.continuous else logprob)

    def act(self, obs: Tensor, state: Optional[EncoderState], deterministic: bool = False):
        """One rollout step: (action, logprob, value, new_state)."""
        feat, new_state, _ = self.features(obs, state)
        head, value = self.heads(feat)
        action, logprob = self.sample(head, deterministic)
        return action, logprob, value, new_state

    def value(self, obs: Tensor, state: Optional[EncoderState]) -> Tensor:
        feat, _, _ = self.features(obs, state)
        return self.heads(feat)[1]

    def evaluate(self, obs: Tensor, state: Optional[EncoderState], action: Tensor):
        """Training path: (logprob, entropy, value, aux_loss) of stored actions under stored states.
        Under autocast the encoder runs in low precision; the heads and the distribution stay float32."""
        feat, _, aux = self.features(obs, state)
        head, value = self.heads(feat)
        logprob, entropy = self.log_prob_entropy(self.dist_from_head(head), action)
        return logprob, entropy, value, aux.float()


def check_backbone(cfg: EncoderConfig) -> None:
    """ValueError unless the backbone is one the PPO rollout/training path reproduces exactly."""
    if not cfg.causal:
        raise ValueError("the PPO policy needs a causal encoder (drop --backbone.no-causal): a step may not see the future")
    cls = validate(cfg)
    if cls["attention"].stateful:
        raise ValueError(f"attention={cfg.attention!r} carries a recurrent state; the PPO agent stores XL memory "
                         f"windows per step and cannot replay it yet. Use a non-recurrent attention with memory='xl'")
    if cfg.memory not in ("xl", "none"):
        raise ValueError(f"the PPO agent replays memory='xl' windows (or no memory); memory={cfg.memory!r} is not "
                         f"supported yet. Use --backbone.memory xl")
    if cfg.depth != "fixed":
        raise ValueError(f"depth={cfg.depth!r}: the PPO agent supports depth='fixed' (one memory slot per layer)")

"""Decision Transformer (Chen et al. 2021) over any causal rlformer encoder.

Faithful to the authors' code (``gym/decision_transformer/models/decision_transformer.py``):
returns-to-go, states and actions are embedded by one linear layer each, a learned timestep
embedding (``nn.Embedding(max_ep_len, d)``) is added to all three, the tokens are interleaved
as (R_1, s_1, a_1, R_2, s_2, a_2, ...) into 3K tokens, ``embed_ln`` LayerNorm follows, and the
backbone runs with NO positional encoding of its own (their GPT-2 has position embeddings
removed: time enters only through the timestep embedding). The action a_t is predicted from
the hidden state of the s_t token through ``Linear -> tanh``. Padding tokens (left padding)
are masked as keys. The backbone's attention/FF projections get GPT-2's initialisation
(N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layers)), the embeddings PyTorch's
defaults, as in the authors' code.

With ``condition_on_return=False`` and ``use_actions=False`` the same class is the
behaviour-cloning baseline (``agents.baselines.bc``): K state tokens, no return or action input.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

import rlformer
from rlformer.attention.base import Attention
from rlformer.blocks.base import FeedForward


def check_causal_backbone(cfg: rlformer.EncoderConfig) -> None:
    """Decision Transformer predicts a_t from tokens up to s_t: the backbone must be causal."""
    if not cfg.causal:
        raise ValueError(
            "the Decision Transformer needs a causal backbone (action a_t is predicted from tokens up to s_t; "
            "a bidirectional encoder would see a_t itself). Set --backbone.causal True (the default), and pick "
            f"an attention that supports it: {[n for n in rlformer.available()['attention'] if _causal_ok(n)]}")
    rlformer.validate(cfg)  # raises ValueError naming the conflict and a fix


def _causal_ok(name: str) -> bool:
    from rlformer.registry import lookup

    return bool(lookup("attention", name).supports_causal)


INITS = ("authors", "gpt2")


def gpt2_init_(encoder: nn.Module, n_layers: int) -> None:
    """GPT-2 init on the standard projections only (variant-specific parameters keep their own init)."""
    resid_std = 0.02 / math.sqrt(2 * n_layers)
    for mod in encoder.modules():
        if isinstance(mod, Attention):
            pairs = [(mod.q_proj, 0.02), (mod.kv_proj, 0.02), (mod.out_proj, resid_std)]
        elif isinstance(mod, FeedForward):
            pairs = [(mod.w1, 0.02), (mod.w2, resid_std)]
        else:
            continue
        for lin, std in pairs:
            nn.init.normal_(lin.weight, mean=0.0, std=std)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)


class DecisionTransformer(nn.Module):
    """``model(states, actions, returns_to_go, timesteps, mask) -> action predictions (B, K, act_dim)``.

    states (B, K, S) normalized; actions (B, K, A); returns_to_go (B, K) scaled; timesteps (B, K) long;
    mask (B, K) bool, False on (left) padding.
    """

    def __init__(self, state_dim: int, act_dim: int, backbone: rlformer.EncoderConfig, max_ep_len: int = 1000,
                 condition_on_return: bool = True, use_actions: bool = True, action_tanh: bool = True,
                 init: str = "authors"):
        super().__init__()
        check_causal_backbone(backbone)
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}: choose 'gpt2' (GPT-2/Hugging Face: N(0, 0.02) everywhere) "
                             "or 'authors' (Chen et al.'s code: PyTorch defaults for embeddings and head)")
        d = backbone.d_model
        self.state_dim, self.act_dim, self.max_ep_len = state_dim, act_dim, max_ep_len
        self.condition_on_return, self.use_actions = condition_on_return, use_actions
        self.tokens_per_step = 1 + int(condition_on_return) + int(use_actions)
        self.state_slot = int(condition_on_return)  # index of the state token within a step
        self.embed_timestep = nn.Embedding(max_ep_len, d)
        self.embed_return = nn.Linear(1, d) if condition_on_return else None
        self.embed_state = nn.Linear(state_dim, d)
        self.embed_action = nn.Linear(act_dim, d) if use_actions else None
        self.embed_ln = nn.LayerNorm(d)
        self.encoder = rlformer.build_encoder(backbone)
        gpt2_init_(self.encoder, backbone.n_layers)
        self.predict_action = nn.Sequential(nn.Linear(d, act_dim), *([nn.Tanh()] if action_tanh else []))
        if init == "gpt2":
            for mod in (self.embed_timestep, self.embed_return, self.embed_state, self.embed_action,
                        self.predict_action[0]):
                if mod is not None:
                    nn.init.normal_(mod.weight, mean=0.0, std=0.02)
                    if getattr(mod, "bias", None) is not None:
                        nn.init.zeros_(mod.bias)

    def forward(self, states: Tensor, actions: Tensor, returns_to_go: Tensor, timesteps: Tensor,
                mask: Tensor, return_aux: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Action predictions; with ``return_aux`` also the backbone's extra training loss
        (``aux_loss``: ACT ponder cost, adaptive-span penalty, compressive reconstruction, ...)."""
        b, k = states.shape[:2]
        time = self.embed_timestep(timesteps.clamp(0, self.max_ep_len - 1))
        tokens = []
        if self.condition_on_return:
            tokens.append(self.embed_return(returns_to_go.reshape(b, k, 1).to(states.dtype)) + time)
        tokens.append(self.embed_state(states) + time)
        if self.use_actions:
            tokens.append(self.embed_action(actions) + time)
        n = self.tokens_per_step
        # (B, K, n, d) -> (B, n*K, d): R_1, s_1, a_1, R_2, ...
        x = self.embed_ln(torch.stack(tokens, dim=2).reshape(b, n * k, -1))
        token_mask = mask[:, :, None].expand(b, k, n).reshape(b, n * k)  # (no repeat_interleave: never syncs)
        out = self.encoder(x, mask=token_mask)
        pred = self.predict_action(out.output.reshape(b, k, n, -1)[:, :, self.state_slot])
        return (pred, out.aux_loss) if return_aux else pred


def masked_action_loss(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean squared error over the valid (unpadded) steps and all action dimensions."""
    m = mask.to(pred.dtype).unsqueeze(-1)
    err = (pred.float() - target.float()).pow(2) * m
    return err.sum() / (m.sum() * pred.shape[-1]).clamp(min=1.0)

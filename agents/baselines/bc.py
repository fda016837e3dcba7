"""Behaviour cloning with the same transformer backbone as the Decision Transformer (``--model bc``).

Chen et al. 2021 compare against "%BC" and BC as an MLP; here BC is the DT architecture with
the return-to-go and action tokens removed: K state tokens (each with its timestep
embedding), the same causal rlformer encoder, action predicted from each state token
through a tanh head, trained with the same masked MSE on the same windows. It sees no
returns, so its evaluation ignores the target return. Comparing it with ``--model dt`` on the
same backbone and updates isolates what return conditioning buys.
"""
from __future__ import annotations

import rlformer
from agents.dt.model import DecisionTransformer


def build_bc_model(state_dim: int, act_dim: int, backbone: rlformer.EncoderConfig,
                   max_ep_len: int = 1000, init: str = "authors") -> DecisionTransformer:
    """A state-only, return-free DecisionTransformer: ``model(states, actions, rtg, timesteps, mask)``
    keeps the DT signature and ignores ``actions`` and ``rtg``."""
    return DecisionTransformer(state_dim, act_dim, backbone, max_ep_len=max_ep_len,
                               condition_on_return=False, use_actions=False, init=init)

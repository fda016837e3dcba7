"""Hugging Face ``transformers.DecisionTransformerModel`` in the same harness (``--model hf``).

An optional extra: ``pip install rlformer[bench]`` (``transformers``). Configured as Chen et
al.'s model (3 layers, d=128, 1 head, ReLU 4d FF, dropout 0.1, tanh action head) and wrapped
to the DT signature ``model(states, actions, returns_to_go, timesteps, mask) -> actions``,
so data, loss, optimizer and evaluation are identical to ``--model dt``. It ignores the
``--backbone.*`` flags except d_model / n_layers / n_heads / d_ff / activation / dropout.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

import rlformer

INSTALL_HINT = "pip install rlformer[bench]   (or: pip install transformers)"


def import_transformers():
    """``transformers``, or ImportError naming the extra to install."""
    try:
        import transformers
        from transformers import DecisionTransformerConfig, DecisionTransformerModel  # noqa: F401
    except ImportError as e:
        raise ImportError(f"--model hf needs Hugging Face transformers, which is not installed: {INSTALL_HINT}") from e
    return transformers


class HFDecisionTransformer(nn.Module):
    """``transformers.DecisionTransformerModel`` behind the rlformer DT call signature."""

    def __init__(self, state_dim: int, act_dim: int, backbone: rlformer.EncoderConfig, max_ep_len: int = 1000,
                 context_len: int = 20):
        super().__init__()
        tf = import_transformers()
        cfg = tf.DecisionTransformerConfig(
            state_dim=state_dim, act_dim=act_dim, hidden_size=backbone.d_model, max_ep_len=max_ep_len,
            action_tanh=True, n_layer=backbone.n_layers, n_head=backbone.n_heads, n_inner=backbone.ff_width,
            activation_function=backbone.activation, resid_pdrop=backbone.dropout, embd_pdrop=backbone.dropout,
            attn_pdrop=backbone.dropout, n_positions=max(1024, 3 * context_len), bos_token_id=None,
            eos_token_id=None)
        self.hf = tf.DecisionTransformerModel(cfg)
        self.max_ep_len = max_ep_len

    def forward(self, states: Tensor, actions: Tensor, returns_to_go: Tensor, timesteps: Tensor,
                mask: Tensor) -> Tensor:
        b, k = states.shape[:2]
        out = self.hf(states=states, actions=actions, rewards=None,
                      returns_to_go=returns_to_go.reshape(b, k, 1).to(states.dtype),
                      timesteps=timesteps.clamp(0, self.max_ep_len - 1), attention_mask=mask.to(torch.long),
                      return_dict=True)
        return out.action_preds

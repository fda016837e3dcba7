"""Block types: reversible recomputation and activation checkpointing."""
from __future__ import annotations

import pytest
import torch
from variants import D_MODEL, small_config

import rlformer
from rlformer.blocks.reversible import run_reversible
from rlformer.diagnostics import saved_activation_bytes


def grads(enc, x):
    enc.zero_grad()
    x = x.clone().requires_grad_(True)
    out = enc(x).output
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return out.detach(), x.grad.clone(), {n: p.grad.clone() for n, p in enc.named_parameters()}


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_reversible_gradients_equal_plain_autograd(dropout, monkeypatch):
    torch.manual_seed(0)
    cfg = small_config("block", "reversible", n_layers=3, dropout=dropout, position="rope", ff_chunks=2)
    enc = rlformer.build_encoder(cfg).double().train()
    x = torch.randn(2, 12, D_MODEL, dtype=torch.float64)
    torch.manual_seed(1)
    out_rev, dx_rev, g_rev = grads(enc, x)
    import rlformer.blocks.reversible as rev
    monkeypatch.setattr(rev, "run_reversible", lambda b, h, c: run_reversible(b, h, c, recompute=False))
    torch.manual_seed(1)
    out_ref, dx_ref, g_ref = grads(enc, x)
    torch.testing.assert_close(out_rev, out_ref)
    torch.testing.assert_close(dx_rev, dx_ref)
    for name in g_ref:
        torch.testing.assert_close(g_rev[name], g_ref[name], msg=name)


def saved_bytes(enc, x) -> int:
    """Bytes of activations the forward pass keeps for backward (parameters excluded)."""
    return saved_activation_bytes(lambda: enc(x).output, exclude=enc)


def test_reversible_activation_memory_does_not_grow_with_depth():
    x = torch.randn(2, 32, D_MODEL, requires_grad=True)
    rev = [saved_bytes(rlformer.build_encoder(small_config("block", "reversible", n_layers=n)), x) for n in (2, 8)]
    plain = [saved_bytes(rlformer.build_encoder(small_config("block", "pre_ln", n_layers=n)), x) for n in (2, 8)]
    assert rev[0] == rev[1], rev                       # constant in depth
    assert plain[1] > 3 * plain[0], plain              # the plain stack grows ~linearly
    assert rev[1] * 5 < plain[1], (rev, plain)


@pytest.mark.parametrize("block", rlformer.available()["block"])
def test_checkpointing_gives_the_same_gradients(block):
    torch.manual_seed(0)
    cfg = small_config("block", block, position="xl")
    enc = rlformer.build_encoder(cfg).double().train()
    ck = rlformer.build_encoder(small_config("block", block, position="xl", checkpointing=True)).double().train()
    ck.load_state_dict(enc.state_dict())
    x = torch.randn(2, 10, D_MODEL, dtype=torch.float64)
    a, b = grads(enc, x), grads(ck, x)
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])
    for name in a[2]:
        torch.testing.assert_close(a[2][name], b[2][name], msg=name)


def test_checkpointing_stores_fewer_activations():
    x = torch.randn(2, 32, D_MODEL, requires_grad=True)
    plain = saved_bytes(rlformer.build_encoder(small_config("block", "pre_ln", n_layers=4)).train(), x)
    ck = saved_bytes(rlformer.build_encoder(small_config("block", "pre_ln", n_layers=4, checkpointing=True)).train(), x)
    assert ck < plain / 2, (ck, plain)


def test_reversible_rejects_memory_with_a_fix():
    with pytest.raises(ValueError, match="memory='none'"):
        rlformer.build_encoder(small_config("block", "reversible", memory="xl"))

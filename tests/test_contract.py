"""Registry-wide tests: every registered variant of every kind, through the public contract."""
from __future__ import annotations

import pytest
import torch

import rlformer
from rlformer.registry import lookup
from variants import D_MODEL, T, all_variants, small_config

VARIANTS = all_variants()
IDS = [f"{k}={n}" for k, n in VARIANTS]


def build(cfg, seed=0):
    torch.manual_seed(seed)
    return rlformer.build_encoder(cfg)


@pytest.mark.parametrize("kind,name", VARIANTS, ids=IDS)
def test_shape_finite_and_gradients(kind, name):
    enc = build(small_config(kind, name)).train()
    x = torch.randn(2, T, D_MODEL, requires_grad=True)
    out = enc(x)
    assert out.output.shape == (2, T, D_MODEL)
    assert torch.isfinite(out.output).all()
    assert out.aux_loss.dim() == 0 and torch.isfinite(out.aux_loss)
    assert isinstance(out.info, dict)
    (out.output.square().mean() + out.aux_loss).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    # A second segment through the state reaches the parameters that only see memory.
    if out.state is not None:
        out2 = enc(torch.randn(2, T, D_MODEL), state=out.state)
        (out2.output.square().mean() + out2.aux_loss).backward()
    no_grad = [n for n, p in enc.named_parameters() if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())]
    assert not no_grad, f"parameters without a finite gradient: {no_grad}"


CAUSAL = [(k, n) for k, n in VARIANTS if small_config(k, n).causal]


@pytest.mark.parametrize("kind,name", CAUSAL, ids=[f"{k}={n}" for k, n in CAUSAL])
def test_causality(kind, name):
    """Perturbing inputs at t' > t never changes the output at t."""
    enc = build(small_config(kind, name)).eval()
    x = torch.randn(2, T, D_MODEL, dtype=torch.float64)
    enc = enc.double()
    base = enc(x).output
    for t in (0, T // 2, T - 2):
        y = x.clone()
        y[:, t + 1:] += torch.randn_like(y[:, t + 1:]) * 3
        out = enc(y).output
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-9)
        assert not torch.allclose(out[:, t + 1:], base[:, t + 1:])


POSITIONS = rlformer.available()["position"]


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("splits", [(16,), (5, 1, 10), (1,) * 16], ids=["one", "uneven", "steps"])
def test_xl_segments_equal_full_pass(position, splits):
    """memory='xl' with mem_len >= total length: segments (down to single steps) == one pass."""
    cfg = small_config("position", position, memory="xl", mem_len=64)
    enc = build(cfg).eval()
    x = torch.randn(3, sum(splits) * 2, D_MODEL)
    full = enc(x).output
    state, outs = None, []
    for seg in x.split(list(splits) * 2, dim=1):
        out = enc(seg, state=state)
        state, _ = out.state, outs.append(out.output)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=0, atol=1e-5)


def accepts(cfg) -> bool:
    try:
        rlformer.validate(cfg)
        return True
    except ValueError:
        return False


@pytest.mark.parametrize("block", [b for b in rlformer.available()["block"]
                                   if accepts(small_config("block", b, memory="xl"))])
@pytest.mark.parametrize("position", ["rope", "sinusoidal", "xl"])
def test_reset_clears_exactly_the_named_rows(block, position):
    cfg = small_config("block", block, memory="xl", mem_len=64, position=position)
    enc = build(cfg).eval()
    history, x = torch.randn(3, 10, D_MODEL), torch.randn(3, 6, D_MODEL)
    state = enc(history).state
    reset = torch.tensor([True, False, True])
    out = enc(x, state=state, reset=reset).output
    fresh = enc(x).output
    kept = enc(x, state=state).output
    torch.testing.assert_close(out[reset], fresh[reset], rtol=0, atol=1e-5)
    torch.testing.assert_close(out[~reset], kept[~reset], rtol=0, atol=1e-6)
    assert not torch.allclose(out[0], kept[0])


def test_padding_mask_hides_padded_tokens():
    enc = build(small_config("position", "rope")).eval()
    x = torch.randn(2, 8, D_MODEL)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[:, :3] = False                                   # left padding
    out = enc(x, mask=mask).output
    y = x.clone()
    y[:, :3] = torch.randn(2, 3, D_MODEL) * 5
    torch.testing.assert_close(enc(y, mask=mask).output[:, 3:], out[:, 3:])
    torch.testing.assert_close(out[:, 3:], enc(x[:, 3:]).output, rtol=0, atol=1e-5)


def test_available_lists_every_kind():
    av = rlformer.available()
    assert set(av) == {"attention", "position", "memory", "block", "depth"}
    assert {"full"} <= set(av["attention"])
    assert {"none", "sinusoidal", "learned", "shaw", "xl", "rope", "alibi", "da"} <= set(av["position"])
    assert {"none", "xl"} <= set(av["memory"])
    assert {"post_ln", "pre_ln", "gtrxl"} <= set(av["block"])
    assert "fixed" in av["depth"]


def test_contract_example_from_the_issue():
    cfg = rlformer.EncoderConfig(d_model=128, n_layers=3, n_heads=4, attention="full", position="rope",
                                 memory="xl", block="gtrxl", depth="fixed", mem_len=64, dropout=0.0, causal=True)
    enc = rlformer.build_encoder(cfg)
    x = torch.randn(2, 10, 128)
    out = enc(x, state=None)
    assert out.output.shape == (2, 10, 128) and out.state is not None
    out2 = enc(x, state=out.state, reset=torch.tensor([True, False]))
    assert out2.output.shape == (2, 10, 128)
    assert float(out.aux_loss) == 0.0


def test_stateless_encoder_returns_no_state():
    enc = build(small_config("position", "rope"))
    assert enc(torch.randn(1, 4, D_MODEL)).state is None


def test_absolute_positions_keep_counting_across_segments():
    enc = build(small_config("position", "learned")).eval()
    x = torch.randn(1, 8, D_MODEL)
    s = enc(x[:, :5]).state
    assert s.offset.tolist() == [5]
    assert not torch.allclose(enc(x[:, 5:], state=s).output, enc(x[:, 5:]).output)


@pytest.mark.parametrize("bad,match", [
    (dict(attention="ful"), "Did you mean 'full'"),
    (dict(d_model=30, n_heads=4), "not divisible"),
    (dict(memory="xl", mem_len=0), "mem_len"),
    (dict(position="rope", d_model=12, n_heads=4), "even"),
    (dict(dropout=1.5), "dropout"),
])
def test_invalid_configs_raise_value_error_at_build(bad, match):
    with pytest.raises(ValueError, match=match):
        rlformer.build_encoder(small_config("attention", "full", **bad))


def test_every_variant_documents_its_paper():
    for kind, name in VARIANTS:
        doc = lookup(kind, name).__doc__
        assert doc and len(doc.strip()) > 10, f"{kind}={name} has no docstring"

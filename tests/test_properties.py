"""Property tests over random configs drawn from the registry.

Valid: ``rlformer.validate`` either refuses a combination with a non-empty ValueError, or the
encoder builds and runs forward + backward (finite output of the right shape, finite gradients),
including a second segment through its state. Invalid: every broken setting raises ValueError
at ``build_encoder`` time, never another exception type and never later in forward.
"""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import rlformer
from rlformer.registry import lookup
from variants import T, base_config

torch.set_num_threads(1)

AV = rlformer.available()
KINDS = ("attention", "position", "memory", "block", "depth")
MEMORIES = [n for n in AV["memory"] if n != "none"]
# CI runs a fixed set of examples; RLFORMER_PROPERTY_EXAMPLES=2000 explores (random seeds) for bugs.
EXPLORE = int(os.environ.get("RLFORMER_PROPERTY_EXAMPLES", "0"))
SETTINGS = settings(max_examples=EXPLORE or 40, deadline=None, derandomize=not EXPLORE, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@st.composite
def configs(draw, attention: str | None = None) -> rlformer.EncoderConfig:
    """Any combination of registered names with small sizes (valid or not: validate decides).

    Three draws in four are guided by the attention's declared capabilities (a causal flag, a
    position and a memory it supports), so rarely-compatible variants are still built often;
    the rest combine names freely, so validate's refusals are exercised too.
    """
    n_heads = draw(st.sampled_from([1, 2, 4]))
    d_head = draw(st.sampled_from([2, 3, 4, 8]))
    names = {kind: draw(st.sampled_from(AV[kind])) for kind in KINDS}
    if attention is not None:
        names["attention"] = attention
    causal = draw(st.booleans())
    if draw(st.integers(0, 3)):
        att = lookup("attention", names["attention"])
        causal = draw(st.sampled_from([c for c, ok in ((True, att.supports_causal),
                                                          (False, att.supports_bidirectional)) if ok]))
        names["position"] = draw(st.sampled_from(
            [p for p in AV["position"] if not set(lookup("position", p).hooks) - {"input"} - set(att.position_hooks)]))
        names["memory"] = draw(st.sampled_from(["none", "none"] + (MEMORIES if att.supports_memory else [])))
    return base_config(
        d_model=n_heads * d_head, n_heads=n_heads, n_layers=draw(st.integers(1, 3)),
        d_ff=draw(st.none() | st.integers(1, 48)), activation=draw(st.sampled_from(["relu", "gelu"])),
        dropout=draw(st.sampled_from([0.0, 0.1])), **names,
        mem_len=draw(st.integers(1, 12)), causal=causal, checkpointing=draw(st.booleans()),
        max_len=draw(st.sampled_from([4, 256])), shaw_clip=draw(st.integers(1, 5)),
        ff_chunks=draw(st.integers(1, 3)),
    )


def accepted(cfg) -> bool:
    try:
        rlformer.validate(cfg)
        return True
    except ValueError as e:
        assert str(e).strip(), f"validate raised an empty ValueError for {cfg}"
        return False


@pytest.mark.parametrize("attention", AV["attention"])
def test_valid_configs_build_and_run(attention):
    """Every attention variant (so none is skipped by chance) with random everything else."""
    settings(SETTINGS, max_examples=EXPLORE or 5)(given(cfg=configs(attention), t2=st.integers(1, T),
                                                         seed=st.integers(0, 2 ** 16))(check_valid_config))()


def check_valid_config(cfg, t2, seed):
    assume(accepted(cfg))
    torch.manual_seed(seed)
    enc = rlformer.build_encoder(cfg).train()
    d = cfg.d_model
    x = torch.randn(2, T, d, requires_grad=True)
    out = enc(x)
    assert out.output.shape == (2, T, d)
    assert torch.isfinite(out.output).all(), cfg
    assert out.aux_loss.dim() == 0 and torch.isfinite(out.aux_loss), cfg
    (out.output.square().mean() + out.aux_loss).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all(), cfg
    bad = [n for n, p in enc.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, (bad, cfg)
    # a second segment through the state, of another length; a variant may refuse a length it
    # cannot lay out (e.g. a fixed 2D grid) but only with a ValueError that says so
    try:
        out2 = enc(torch.randn(2, t2, d), state=out.state, reset=torch.tensor([True, False]))
    except ValueError as e:
        assert str(e).strip()
        return
    assert out2.output.shape == (2, t2, d) and torch.isfinite(out2.output).all(), cfg
    (out2.output.square().mean() + out2.aux_loss).backward()


# ------------------------------------------------------------------------------ invalid configs

NON_CAUSAL = [n for n in AV["attention"] if not lookup("attention", n).supports_causal]
CAUSAL_ONLY = [n for n in AV["attention"] if not lookup("attention", n).supports_bidirectional]


@st.composite
def valid_configs(draw) -> rlformer.EncoderConfig:
    cfg = draw(configs())
    assume(accepted(cfg))
    return cfg


def _unknown_name(draw, cfg):
    kind = draw(st.sampled_from(KINDS))
    name = draw(st.text("abcdefghijklmnopqrstuvwxyz_0123456789", min_size=1, max_size=10)
                .filter(lambda n: n not in AV[kind]))
    return dataclasses.replace(cfg, **{kind: name})


def _not_divisible(draw, cfg):
    heads = draw(st.integers(2, 8))
    return dataclasses.replace(cfg, n_heads=heads, d_model=heads * draw(st.integers(1, 8)) + draw(st.integers(1, heads - 1)))


def _negative_size(draw, cfg):
    field = draw(st.sampled_from(["d_model", "n_heads", "n_layers", "d_ff"]))
    return dataclasses.replace(cfg, **{field: draw(st.integers(-8, 0))})


def _bad_position_setting(draw, cfg):
    position, field, values = draw(st.sampled_from([("shaw", "shaw_clip", st.integers(-4, 0)),
                                                     ("learned", "max_len", st.integers(-4, 0)),
                                                     ("rope", "rope_base", st.floats(-1e4, 0.0))]))
    return dataclasses.replace(cfg, position=position, **{field: draw(values)})


def _bad_dropout(draw, cfg):
    return dataclasses.replace(cfg, dropout=draw(st.floats(1.0, 10.0) | st.floats(-10.0, -1e-3)))


def _no_mem_len(draw, cfg):
    return dataclasses.replace(cfg, memory=draw(st.sampled_from(MEMORIES)), mem_len=draw(st.integers(-4, 0)))


def _causal_non_causal(draw, cfg):
    return dataclasses.replace(cfg, attention=draw(st.sampled_from(NON_CAUSAL)), causal=True)


def _bidirectional_causal_only(draw, cfg):
    return dataclasses.replace(cfg, attention=draw(st.sampled_from(CAUSAL_ONLY)), causal=False)


CORRUPTIONS = [_unknown_name, _not_divisible, _negative_size, _bad_position_setting, _bad_dropout, _no_mem_len]
CORRUPTIONS += [_causal_non_causal] if NON_CAUSAL else []
CORRUPTIONS += [_bidirectional_causal_only] if CAUSAL_ONLY else []


@st.composite
def invalid_configs(draw):
    corrupt = draw(st.sampled_from(CORRUPTIONS))
    return corrupt.__name__, corrupt(draw, draw(valid_configs()))


@SETTINGS
@given(case=invalid_configs())
def test_invalid_configs_raise_value_error_at_build(case):
    what, cfg = case
    with pytest.raises(ValueError) as err:
        rlformer.build_encoder(cfg)
    assert str(err.value).strip(), what


def test_the_strategies_reach_every_registered_name():
    """Guard against the valid-config strategy silently never building some position, memory, block
    or depth variant (every attention has its own run of the valid-config property)."""
    seen = {kind: set() for kind in KINDS}

    @settings(max_examples=500, deadline=None, derandomize=True, database=None)
    @given(cfg=configs())
    def collect(cfg):
        if accepted(cfg):
            for kind in KINDS:
                seen[kind].add(getattr(cfg, kind))

    collect()
    missing = {k: sorted(set(AV[k]) - seen[k]) for k in KINDS[1:] if set(AV[k]) - seen[k]}
    assert not missing, f"never drawn in a valid config: {missing}"


@SETTINGS
@given(cfg=configs(), seed=st.integers(0, 2 ** 16))
def test_encoder_decoder_valid_configs_build_and_run(cfg, seed):
    """build_encoder_decoder refuses with a message, or builds and runs forward + backward."""
    try:
        model = rlformer.build_encoder_decoder(cfg)
    except ValueError as e:
        assert str(e).strip()
        assume(False)
    torch.manual_seed(seed)
    src, tgt = torch.randn(2, T, cfg.d_model), torch.randn(2, T, cfg.d_model, requires_grad=True)
    src_mask = torch.ones(2, T, dtype=torch.bool)
    src_mask[1, T // 2:] = False
    out = model.train()(src, tgt, src_mask=src_mask)
    assert out.output.shape == (2, T, cfg.d_model) and torch.isfinite(out.output).all(), cfg
    (out.output.square().mean() + out.aux_loss).backward()
    assert torch.isfinite(tgt.grad).all(), cfg

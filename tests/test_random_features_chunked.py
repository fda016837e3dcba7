"""The chunk form of causal (gated) linear attention (random_features._LinearAttention and its
hand-written backward) against the naive per-token recurrence: outputs, end state and gradients."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import rlformer
from rlformer.attention.random_features import (ALIGN, PerformerAttention, RFAAttention, chunked_linear_attention,
                                                recurrent_linear_attention)
from rlformer.context import AttentionContext
from rlformer.diagnostics import saved_activation_bytes
from variants import base_config

torch.set_num_threads(1)
F64 = torch.float64


def _inputs(gate: bool, t: int = 21, m: int = 10, dh: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    phi_q, phi_k = (torch.rand(2, 3, t, m, generator=g, dtype=F64).requires_grad_() for _ in range(2))
    v = torch.randn(2, 3, t, dh, generator=g, dtype=F64).requires_grad_()
    lg = F.logsigmoid(torch.randn(2, 3, t, generator=g, dtype=F64) + 1).requires_grad_() if gate else None
    state = {"S": torch.randn(2, 3, m, dh, generator=g, dtype=F64).requires_grad_(),
             "z": (torch.rand(2, 3, m, generator=g, dtype=F64) + 1).requires_grad_()}
    return phi_q, phi_k, v, lg, state


def _loss(out, state, probes):
    return (out * probes[0]).sum() + (state["S"] * probes[1]).sum() + (state["z"] * probes[2]).sum()


@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize("chunk", [1, 4, 5, 7, 21, 64])            # 21 tokens: most chunks do not divide T
def test_chunk_form_equals_per_token_loop(gate, chunk):
    phi_q, phi_k, v, lg, state = _inputs(gate)
    out, s = chunked_linear_attention(phi_q, phi_k, v, chunk, causal=True, state=state, log_gate=lg)
    ref, s_ref = recurrent_linear_attention(phi_q, phi_k, v, causal=True, state=state, log_gate=lg)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for key in ("S", "z"):
        torch.testing.assert_close(s[key], s_ref[key], rtol=1e-12, atol=1e-12)
    g = torch.Generator().manual_seed(1)
    probes = [torch.randn(x.shape, generator=g, dtype=F64) for x in (out, s["S"], s["z"])]
    inputs = [phi_q, phi_k, v, state["S"], state["z"]] + ([lg] if gate else [])
    grads = torch.autograd.grad(_loss(out, s, probes), inputs)
    grads_ref = torch.autograd.grad(_loss(ref, s_ref, probes), inputs)
    for a, b in zip(grads, grads_ref):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)


def test_long_strong_decay_stays_finite():
    """Cumulative log-gates of -20 per token over 300 tokens (-6000): every exponent used is <= 0."""
    phi_q, phi_k, v, _, state = _inputs(False, t=300)
    lg = torch.full((2, 3, 300), -20.0, dtype=F64, requires_grad=True)
    out, s = chunked_linear_attention(phi_q, phi_k, v, 16, causal=True, state=state, log_gate=lg)
    ref, _ = recurrent_linear_attention(phi_q, phi_k, v, causal=True, state=state, log_gate=lg)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    out.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (phi_q, phi_k, v, lg))


def _module(name, gate, group, chunk=3):
    cfg = base_config(attention=name, n_heads=4, causal=True)
    cfg.random_features = rlformer.RandomFeatureConfig(n_features=8, chunk_size=chunk, gate=gate,
                                                       recompute_group=group)
    return (PerformerAttention if name == "performer" else RFAAttention)(cfg, layer=0).double()


@pytest.mark.parametrize("name,gate", [("performer", False), ("rfa", False), ("rfa", True)])
@pytest.mark.parametrize("group", [0, 4, 6])                      # 0: one pass; 4 -> 3 (whole chunks); 6
def test_attend_in_groups_matches_the_recurrence(name, gate, group):
    att = _module(name, gate, group)
    g = torch.Generator().manual_seed(2)
    b, h, t, dh = 2, 4, 17, 8
    q, k, v = (torch.randn(b, h, t, dh, generator=g, dtype=F64).requires_grad_() for _ in range(3))
    lg = F.logsigmoid(torch.randn(b, h, t, generator=g, dtype=F64)).requires_grad_() if gate else None
    m = att.feature_multiplier * att.n_features
    state = {"S": torch.rand(b, h, m, dh, generator=g, dtype=F64).requires_grad_(),
             "z": (torch.rand(b, h, m, generator=g, dtype=F64) + 1).requires_grad_()}
    valid = torch.ones(b, t, dtype=torch.bool)
    valid[0, :3] = False
    valid[1, 9] = False
    idx = torch.arange(t)
    ctx = AttentionContext(causal=True, q_index=idx, k_index=idx, q_pos=idx[None].expand(b, t), key_valid=valid,
                           state=state)
    out, s = att.attend(q, k, v, ctx, lg)
    ref, s_ref = att.reference(q, k, v, ctx, lg)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    for key in ("S", "z"):
        torch.testing.assert_close(s[key], s_ref[key], rtol=1e-10, atol=1e-10)
    inputs = [q, k, v, state["S"], state["z"]] + ([lg] if gate else []) + att.feature_params()
    probe = torch.randn(out.shape, generator=g, dtype=F64)
    grads = torch.autograd.grad((out * probe).sum(), inputs)
    grads_ref = torch.autograd.grad((ref * probe).sum(), inputs)
    for a, r in zip(grads, grads_ref):
        torch.testing.assert_close(a, r, rtol=0, atol=1e-9)


@pytest.mark.parametrize("name,gate", [("performer", False), ("rfa", True)])
def test_bfloat16_matmuls_stay_close_to_float64(name, gate):
    """16-bit inputs run the chunk matmuls in bf16 (sums over chunks in float32)."""
    att = _module(name, gate, 0, chunk=8)
    g = torch.Generator().manual_seed(3)
    q, k, v = (0.5 * torch.randn(1, 4, 40, 8, generator=g, dtype=F64) for _ in range(3))
    lg = F.logsigmoid(torch.randn(1, 4, 40, generator=g, dtype=F64) + 2) if gate else None
    idx = torch.arange(40)
    ctx = AttentionContext(causal=True, q_index=idx, k_index=idx, q_pos=idx[None])
    ref, _ = att.reference(q, k, v, ctx, lg)
    xs = [x.to(torch.bfloat16).requires_grad_() for x in (q, k, v)]
    out, _ = att.float().attend(*xs, ctx, None if lg is None else lg.float())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=0.05)
    out.float().sum().backward()
    assert all(torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0 for x in xs)


@pytest.mark.parametrize("name,gate", [("performer", False), ("rfa", True)])
def test_backward_keeps_only_inputs(name, gate):
    """Saved for backward: q, k, v (+ key weights and gates), one (M, dh + 1) state per group and the
    (H, M, dh + 2 padded to ALIGN) feature weights of queries and keys (parameter-sized, not per token)."""
    h, dh, t = 4, 16, 512
    cfg = base_config(attention=name, n_heads=h, causal=True, d_model=h * dh)
    cfg.random_features = dataclasses.replace(rlformer.RandomFeatureConfig(n_features=32, chunk_size=32,
                                                                           gate=gate), recompute_group=128)
    att = (PerformerAttention if name == "performer" else RFAAttention)(cfg, layer=0)
    q, k, v = (torch.randn(1, h, t, dh, requires_grad=True) for _ in range(3))
    lg = F.logsigmoid(torch.randn(1, h, t)).requires_grad_() if gate else None
    idx = torch.arange(t)
    ctx = AttentionContext(causal=True, q_index=idx, k_index=idx, q_pos=idx[None], training=True)
    total = saved_activation_bytes(lambda: att.attend(q, k, v, ctx, lg)[0], exclude=att)
    m = att.feature_multiplier * att.n_features
    inputs = 3 * t * h * dh * 4 + (2 * t * h * 4 if gate else 0)          # q, k, v; gates and (1 - g)
    states = len(att.groups(t)) * h * m * (dh + 1) * 4
    weights = 2 * h * m * -(-(dh + 2) // ALIGN) * ALIGN * 4
    assert total <= inputs + states + weights + 4 * t * h * 4, (total, inputs, states)
    assert q.grad.abs().sum() > 0 and k.grad.abs().sum() > 0


def test_negative_recompute_group_is_rejected():
    cfg = base_config(attention="performer", causal=True)
    cfg.random_features = rlformer.RandomFeatureConfig(recompute_group=-1)
    with pytest.raises(ValueError, match="recompute_group"):
        rlformer.validate(cfg)


class _CountOps(TorchDispatchMode):
    """Counts the aten ops that do work (views and aliases excluded): kernel launches on a GPU."""

    VIEWS = {"view", "_unsafe_view", "expand", "transpose", "t", "slice", "select", "unsqueeze", "squeeze", "alias",
             "detach", "as_strided", "permute", "unbind", "split", "split_with_sizes", "narrow", "diagonal", "empty",
             "empty_like", "reshape", "lift_fresh"}

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func.overloadpacket.__name__ not in self.VIEWS
        return func(*args, **(kwargs or {}))


def _ops_per_step(name: str, t: int, group: int) -> int:
    att = _module(name, name == "rfa", group, chunk=8).float()
    q, k, v = (torch.randn(1, 4, t, 8, requires_grad=True) for _ in range(3))
    idx = torch.arange(t)
    ctx = AttentionContext(causal=True, q_index=idx, k_index=idx, q_pos=idx[None], training=True)
    lg = F.logsigmoid(torch.randn(1, 4, t)).requires_grad_() if name == "rfa" else None
    counter = _CountOps()
    with counter:
        att.attend(q, k, v, ctx, lg)[0].sum().backward()
    return counter.n


@pytest.mark.parametrize("name", ["performer", "rfa"])
def test_kernel_count_does_not_grow_with_length_in_one_pass(name):
    """One batched pass: the same ops at any length; each further group adds the same fixed number."""
    one = _ops_per_step(name, 64, 0)
    assert _ops_per_step(name, 512, 0) == one
    two, three, four = (_ops_per_step(name, 64 * n, 64) for n in (2, 3, 4))
    assert four - two == 2 * (three - two) > 0
    # gated RFA: the decay matrices; both: ALIGN pads and the exact bias columns of the exponents
    assert one <= {"performer": 130, "rfa": 240}[name], one


@pytest.mark.parametrize("name", ["performer", "rfa"])
def test_padded_start_without_state_has_the_recurrence_gradients(monkeypatch, name):
    """Queries with no weighted key before them and no carried sums (a padded start) have normalizer 0 and output
    num / floor = 0 whatever the inputs, so they send no gradient. With Performer's floor (the dtype's smallest
    normal number) 1 / floor is ~1e38 (float32) / 1e308 (float64): kept in the chunk sums, later chunks' key
    gradients cancelled it against itself and came out off by 1e-2 (an H100 float32 run and CPU float64 alike).
    A floor of 1e-30 keeps the autograd reference itself finite (1 / floor * v overflows float64 at its tiny)."""
    att = _module(name, False, 8, chunk=4)
    monkeypatch.setattr(att, "den_floor", lambda dtype: 1e-30)
    g = torch.Generator().manual_seed(5)
    b, h, t, dh = 2, 4, 29, 8
    q, k, v = (torch.randn(b, h, t, dh, generator=g, dtype=F64).requires_grad_() for _ in range(3))
    valid = torch.ones(b, t, dtype=torch.bool)
    valid[1, :5] = False
    idx = torch.arange(t)
    ctx = AttentionContext(causal=True, q_index=idx, k_index=idx, q_pos=idx[None].expand(b, t), key_valid=valid)
    out, _ = att.attend(q, k, v, ctx)
    ref, _ = att.reference(q, k, v, ctx)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    probe = torch.randn(out.shape, generator=g, dtype=F64)
    inputs = [q, k, v] + att.feature_params()
    grads = torch.autograd.grad((out * probe).sum(), inputs)
    grads_ref = torch.autograd.grad((ref * probe).sum(), inputs)
    for a, r in zip(grads, grads_ref):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-9)

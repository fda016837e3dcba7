"""Adaptive computation: adaptive attention span, Universal Transformer / ACT, per-token early exit."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rlformer
from rlformer.attention.adaptive_span import (AdaptiveSpanAttention, _ProjectedClamp, adaptive_span_reference,
                                              banded_adaptive_span)
from rlformer.context import AttentionContext
from rlformer.depth.early_exit import EarlyExitDepth, calibrate_threshold
from rlformer.depth.universal import coordinate_embedding
from variants import D_MODEL, base_config

torch.set_num_threads(1)


def build(cfg, seed=0):
    torch.manual_seed(seed)
    return rlformer.build_encoder(cfg)


def run_segments(enc, x, splits):
    state, outs = None, []
    for seg in x.split(list(splits), dim=1):
        out = enc(seg, state=state)
        state = out.state
        outs.append(out.output)
    return torch.cat(outs, 1)


# --------------------------------------------------------------------------- adaptive span


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("b,h,t,m,s,r", [(2, 3, 10, 0, 16, 4), (2, 3, 37, 5, 12, 3), (1, 2, 5, 20, 8, 2),
                                         (2, 2, 70, 40, 30, 5), (1, 1, 9, 0, 1, 1)])
def test_banded_span_equals_dense_reference_outputs_and_grads(dynamic, b, h, t, m, s, r):
    torch.manual_seed(0)
    q = torch.randn(b, h, t, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, h, t + m, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, h, t + m, 4, dtype=torch.float64, requires_grad=True)
    z = (torch.rand(b, h, t, dtype=torch.float64) if dynamic else torch.rand(h, dtype=torch.float64)) * s
    z.requires_grad_()
    key_valid = torch.rand(b, t + m) > 0.3
    idx = torch.arange(t + m)
    ctx = AttentionContext(causal=True, q_index=idx[m:], k_index=idx, q_pos=idx[None, m:], key_valid=key_valid)
    fast = banded_adaptive_span(q, k, v, key_valid, 0.5, z, r, s)
    ref = adaptive_span_reference(q, k, v, ctx.allowed(), 0.5, z, r, s, ctx.q_index, ctx.k_index)
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-12)
    g = torch.randn_like(fast)
    for a, c in zip(torch.autograd.grad((fast * g).sum(), [q, k, v, z]),
                    torch.autograd.grad((ref * g).sum(), [q, k, v, z])):
        torch.testing.assert_close(a, c, rtol=0, atol=1e-11)
    # The paper's code divides by (sum + 1e-8): the same up to that epsilon.
    paper = adaptive_span_reference(q, k, v, ctx.allowed(), 0.5, z, r, s, ctx.q_index, ctx.k_index, eps=1e-8)
    torch.testing.assert_close(fast, paper, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("kernel,max_scores", [("math", 1 << 20), ("math", 300), (None, 300)])
def test_banded_span_groups_and_kernels_equal_dense_reference(dynamic, kernel, max_scores):
    """Several groups of chunks (recomputed one by one in backward) and the kernels: same outputs
    and gradients (q, k, v and the spans) as the dense reference. kernel=None picks the CPU flash
    kernel without gradients and the math kernel when the spans need one."""
    torch.manual_seed(1)
    b, h, t, m, s, r = 2, 3, 45, 7, 20, 4
    q = torch.randn(b, h, t, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(b, h, t + m, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    z = ((torch.rand(b, h, t, dtype=torch.float64) if dynamic else torch.rand(h, dtype=torch.float64)) * s)
    z.requires_grad_()
    key_valid = torch.rand(b, t + m) > 0.2
    idx = torch.arange(t + m)
    ctx = AttentionContext(causal=True, q_index=idx[m:], k_index=idx, q_pos=idx[None, m:], key_valid=key_valid)
    ref = adaptive_span_reference(q, k, v, ctx.allowed(), 0.5, z, r, s, ctx.q_index, ctx.k_index)
    fast = banded_adaptive_span(q, k, v, key_valid, 0.5, z, r, s, max_chunk=8, max_scores=max_scores, kernel=kernel)
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-12)
    g = torch.randn_like(fast)
    for a, c in zip(torch.autograd.grad((fast * g).sum(), [q, k, v, z]),
                    torch.autograd.grad((ref * g).sum(), [q, k, v, z])):
        torch.testing.assert_close(a, c, rtol=0, atol=1e-11)
    with torch.no_grad():
        torch.testing.assert_close(banded_adaptive_span(q, k, v, key_valid, 0.5, z, r, s, max_chunk=8,
                                                        max_scores=max_scores), ref, rtol=0, atol=1e-12)


def test_adaptive_span_keeps_linear_activation_memory():
    """Only q, k, v, the output, the spans and integer tables are kept for backward (the
    materializing banded path kept ~5x the output at T=4096 with S=256)."""
    from rlformer.diagnostics import saved_activation_bytes
    h, dh = 8, 64
    cfg = base_config(attention="adaptive_span", n_heads=h, d_model=h * dh)
    cfg.adaptive_span = rlformer.AdaptiveSpanConfig(max_span=256, ramp=32, init=0.5)
    att = AdaptiveSpanAttention(cfg, 0, None)
    saved = []
    for t in (1024, 4096):
        q, k, v = (torch.randn(1, h, t, dh, requires_grad=True) for _ in range(3))
        idx = torch.arange(t)
        ctx = AttentionContext(causal=True, q_index=idx, k_index=idx, q_pos=idx[None])
        total = saved_activation_bytes(lambda: att.attend(q, k, v, ctx)[0], exclude=att)
        assert att.span_frac.grad is not None and att.span_frac.grad.abs().sum() > 0
        att.span_frac.grad = None
        saved.append(total)
        assert total < 1.1 * 4 * t * h * dh * 4, (t, total)
    assert saved[1] <= 4 * saved[0] * 1.05, saved


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-only: fused kernel with bias gradient vs CPU float64")
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_cuda_banded_span_matches_cpu_float64(dynamic, dtype, atol):
    """The CUDA branch (memory-efficient attention forward/backward with the bias gradient for the
    spans) against the CPU float64 path: outputs and gradients of q, k, v and z."""
    g = torch.Generator().manual_seed(2)
    b, h, t, m, s, r = 2, 4, 300, 20, 64, 8
    q = torch.randn(b, h, t, 64, generator=g, dtype=torch.float64)
    k, v = (torch.randn(b, h, t + m, 64, generator=g, dtype=torch.float64) for _ in range(2))
    z = (torch.rand(b, h, t, generator=g, dtype=torch.float64) if dynamic else
         torch.rand(h, generator=g, dtype=torch.float64)) * s
    key_valid = torch.rand(b, t + m, generator=g) > 0.1
    probe = torch.randn(b, h, t, 64, generator=g, dtype=torch.float64)

    # the spans stay float32 under bf16 (a parameter keeps its dtype under autocast; bf16 would round z ~ 64
    # by 0.25 and move the mask ramp); q, k, v are rounded to the tested dtype for the reference too
    q, k, v = (x.to(dtype).double() for x in (q, k, v))
    z_dtype = torch.float32 if dtype == torch.bfloat16 else dtype

    def run(device, dt, zdt, max_scores):
        xs = [x.detach().clone().to(device, d).requires_grad_() for x, d in zip((q, k, v, z), (dt, dt, dt, zdt))]
        out = banded_adaptive_span(*xs[:3], key_valid.to(device), 0.125, xs[3], r, s, max_scores=max_scores)
        (out * probe.to(device, dt)).sum().backward()
        return [out.double().cpu()] + [x.grad.double().cpu() for x in xs]

    ref = run("cpu", torch.float64, torch.float64, 1 << 24)
    for max_scores in (1 << 24, 20000):
        for a, c in zip(run("cuda", dtype, z_dtype, max_scores), ref):
            torch.testing.assert_close(a, c, rtol=0, atol=atol * max(1.0, c.abs().max().item()))


def test_keys_beyond_the_largest_span_are_never_read():
    """Old memory keys past distance ceil(R + max z) may hold anything (NaN): the output is unchanged."""
    torch.manual_seed(0)
    b, h, t, m, s, r = 2, 2, 8, 30, 32, 4
    q, k, v = (torch.randn(b, h, n, 4, dtype=torch.float64) for n in (t, t + m, t + m))
    z = torch.tensor([3.0, 5.5], dtype=torch.float64)                    # window W = ceil(4 + 5.5) = 10
    out = banded_adaptive_span(q, k, v, None, 0.5, z, r, s)
    k2, v2 = k.clone(), v.clone()
    first_needed = m - (10 - 1)                                          # query 0 is at key index m
    k2[:, :, :first_needed] = float("nan")
    v2[:, :, :first_needed] = float("nan")
    torch.testing.assert_close(banded_adaptive_span(q, k2, v2, None, 0.5, z, r, s), out, rtol=0, atol=0)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_adaptive_span_layer_matches_reference_with_rope_and_memory(dynamic):
    cfg = base_config(attention="adaptive_span", position="rope")
    cfg.adaptive_span = rlformer.AdaptiveSpanConfig(max_span=12, ramp=3, init=0.4, dynamic=dynamic)
    torch.manual_seed(0)
    layer = AdaptiveSpanAttention(cfg, 0, rlformer.registry.lookup("position", "rope")(cfg)).double()
    if dynamic:
        nn.init.normal_(layer.span_proj.weight, std=0.5)
    t, m = 9, 6
    x = torch.randn(2, t, D_MODEL, dtype=torch.float64)
    kv = torch.cat([torch.randn(2, m, D_MODEL, dtype=torch.float64), x], 1)
    idx = torch.arange(t + m)
    valid = torch.ones(2, t + m, dtype=torch.bool)
    valid[0, :4] = False
    ctx = AttentionContext(causal=True, q_index=idx[m:], k_index=idx, q_pos=idx[None, m:].expand(2, -1),
                           key_valid=valid)
    fast, _ = layer(x, kv, ctx)
    ref = layer.reference(x, kv, ctx)
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-12)
    g = torch.randn_like(fast)
    params = [p for p in layer.parameters()]
    for a, c in zip(torch.autograd.grad((fast * g).sum(), params), torch.autograd.grad((ref * g).sum(), params)):
        torch.testing.assert_close(a, c, rtol=0, atol=1e-11)
    assert set(ctx.aux.info["span"]) == {0} and ctx.aux.info["span"][0].shape == (cfg.n_heads,)
    if dynamic:
        assert ctx.aux.info["span_per_token"][0].shape == (2, cfg.n_heads, t)


def test_span_info_penalty_and_projected_clamp():
    cfg = base_config(attention="adaptive_span", n_layers=2)
    cfg.adaptive_span = rlformer.AdaptiveSpanConfig(max_span=16, ramp=4, init=0.25, penalty=0.1)
    enc = build(cfg)
    out = enc(torch.randn(2, 10, D_MODEL))
    spans = out.info["span"]
    assert sorted(spans) == [0, 1]
    for layer in spans.values():
        torch.testing.assert_close(layer, torch.full((cfg.n_heads,), 4.0))
    assert out.info["span_window"] == {0: 8, 1: 8}
    torch.testing.assert_close(out.aux_loss, torch.tensor(2 * 0.1 * 4.0))
    # Out of [0, 1], only gradients that move the parameter back in pass.
    p = torch.tensor([-0.5, 0.5, 1.5], requires_grad=True)
    _ProjectedClamp.apply(p).backward(torch.tensor([1.0, 1.0, 1.0]))
    assert p.grad.tolist() == [0.0, 1.0, 1.0]
    p.grad = None
    _ProjectedClamp.apply(p).backward(torch.tensor([-1.0, -1.0, -1.0]))
    assert p.grad.tolist() == [-1.0, -1.0, 0.0]


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_adaptive_span_with_xl_memory_segments_equal_full_pass(dynamic):
    cfg = base_config(attention="adaptive_span", position="rope", memory="xl", mem_len=64)
    cfg.adaptive_span = rlformer.AdaptiveSpanConfig(max_span=8, ramp=2, init=0.5, dynamic=dynamic)
    enc = build(cfg).eval()
    x = torch.randn(2, 24, D_MODEL)
    torch.testing.assert_close(run_segments(enc, x, (5, 1, 10, 8)), enc(x).output, rtol=0, atol=1e-5)


def test_dynamic_span_is_causal():
    cfg = base_config(attention="adaptive_span", position="rope")
    cfg.adaptive_span = rlformer.AdaptiveSpanConfig(max_span=10, ramp=3, init=0.3, dynamic=True)
    enc = build(cfg).eval().double()
    for layer in enc.depth.blocks:
        nn.init.normal_(layer.attention.span_proj.weight, std=0.5)
    x = torch.randn(2, 16, D_MODEL, dtype=torch.float64)
    base = enc(x).output
    y = x.clone()
    y[:, 9:] += 3 * torch.randn_like(y[:, 9:])
    torch.testing.assert_close(enc(y).output[:, :9], base[:, :9], rtol=0, atol=1e-9)


def _train_window_mean(window: int, steps: int = 150, penalty: float = 2e-3) -> torch.Tensor:
    """Predict the mean of the last ``window`` random bits; no position encoding, so only the span can select them."""
    torch.manual_seed(0)
    cfg = rlformer.EncoderConfig(d_model=32, n_layers=1, n_heads=2, d_ff=64, attention="adaptive_span",
                                 position="none", block="pre_ln")
    cfg.adaptive_span = rlformer.AdaptiveSpanConfig(max_span=24, ramp=4, init=6 / 24, penalty=penalty)
    enc = rlformer.build_encoder(cfg)
    emb, head = nn.Embedding(2, 32), nn.Linear(32, 1)
    opt = torch.optim.Adam([*enc.parameters(), *emb.parameters(), *head.parameters()], lr=3e-3)
    for _ in range(steps):
        x = torch.randint(0, 2, (16, 32))
        out = enc(emb(x))
        target = F.avg_pool1d(x[:, None].float(), window, 1)[:, 0]
        loss = 10 * F.mse_loss(head(out.output)[:, window - 1:, 0], target) + out.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return out.info["span"][0]


def test_spans_shrink_on_local_task_and_grow_on_long_context_task():
    init = 6.0
    local = _train_window_mean(2)
    long = _train_window_mean(12)
    assert local.mean() < init / 2, local          # shrinks under the penalty: only 2 tokens matter
    assert long.max() > init + 2, long             # grows: 12 tokens matter
    assert long.mean() > local.mean() + 4


@pytest.mark.parametrize("bad,match", [
    (dict(causal=False), "only supports causal=True"),
    (dict(position="shaw"), "hook"),
    (dict(adaptive_span=rlformer.AdaptiveSpanConfig(max_span=0)), "max_span"),
    (dict(adaptive_span=rlformer.AdaptiveSpanConfig(ramp=0)), "ramp"),
    (dict(adaptive_span=rlformer.AdaptiveSpanConfig(init=1.0, dynamic=True)), "init"),
    (dict(adaptive_span=rlformer.AdaptiveSpanConfig(penalty=-1.0)), "penalty"),
])
def test_adaptive_span_invalid_settings_raise_at_build(bad, match):
    with pytest.raises(ValueError, match=match):
        rlformer.build_encoder(base_config(attention="adaptive_span", **bad))


# --------------------------------------------------------------------------- universal / ACT


def test_coordinate_embedding_is_dehghani_p_t():
    d, pos, step = 6, torch.tensor([[0, 3, 7]]), 4
    p = coordinate_embedding(pos, step, d)
    for i, position in enumerate(pos[0].tolist()):
        for j in range(d // 2):
            f = 1 / 10000 ** (2 * j / d)
            assert math.isclose(p[0, i, 2 * j], math.sin(position * f) + math.sin(step * f), abs_tol=1e-5)
            assert math.isclose(p[0, i, 2 * j + 1], math.cos(position * f) + math.cos(step * f), abs_tol=1e-5)


def test_universal_shares_one_block_over_steps():
    enc = build(base_config(depth="universal", n_layers=4))
    fixed = build(base_config(depth="fixed", n_layers=4))
    assert sum(p.numel() for p in enc.parameters()) * 2 < sum(p.numel() for p in fixed.parameters())
    out = enc(torch.randn(2, 5, D_MODEL))
    assert out.info["act_steps"].eq(4).all() and len(enc.initial_state(2, "cpu").slots) == 4


@pytest.mark.parametrize("depth", ["universal", "act"])
def test_recurrent_depth_with_xl_memory_segments_equal_full_pass(depth):
    cfg = base_config(depth=depth, memory="xl", mem_len=64, position="rope")
    enc = build(cfg).eval()
    x = torch.randn(2, 20, D_MODEL)
    torch.testing.assert_close(run_segments(enc, x, (7, 1, 12)), enc(x).output, rtol=0, atol=1e-5)


def _act_config(**kw):
    cfg = base_config(depth="act", **kw)
    cfg.act = rlformer.ACTConfig(max_steps=4, threshold=0.9, ponder_cost=0.05, halting_bias_init=-0.5)
    return cfg


def test_act_matches_per_position_reference_and_weights_sum_to_one():
    enc = build(_act_config()).double()
    nn.init.normal_(enc.depth.halting.weight, std=0.5)
    x = torch.randn(3, 11, D_MODEL, dtype=torch.float64)
    out = enc(x)
    steps, rem, weights = out.info["act_steps"], out.info["act_remainder"], out.info["act_weights"]
    assert steps.min() >= 1 and steps.max() <= 4 and len(steps.unique()) > 1
    torch.testing.assert_close(weights.sum(0), torch.ones_like(rem), rtol=0, atol=1e-12)
    assert (weights >= 0).all()
    torch.testing.assert_close(out.aux_loss, (0.05 * (steps + rem).mean()).float())
    # halting weight at step N is the remainder, zero after it
    for n in range(weights.shape[0]):
        torch.testing.assert_close(weights[n][steps == n + 1], rem[steps == n + 1])
        assert (weights[n][steps < n + 1] == 0).all()
    params = list(enc.parameters())
    fast_grads = torch.autograd.grad(out.output.sum(), params)
    depth = enc.depth
    captured = {}

    def reference_forward(h, run, aux):
        y, n_steps, r = depth.reference(h, run)
        captured.update(steps=n_steps, rem=r)
        return y

    depth.forward = reference_forward
    ref = enc(x)
    torch.testing.assert_close(out.output, ref.output, rtol=0, atol=1e-12)
    assert torch.equal(captured["steps"], steps)
    torch.testing.assert_close(captured["rem"], rem, rtol=0, atol=1e-12)
    for a, c in zip(torch.autograd.grad(ref.output.sum(), params), fast_grads):
        torch.testing.assert_close(a, c, rtol=0, atol=1e-10)


def test_halted_positions_are_copied_forward():
    """The input of every step after a position halts is its halting state plus P^n, unchanged."""
    enc = build(_act_config()).double()
    nn.init.normal_(enc.depth.halting.weight, std=0.5)
    inputs, forward = [], enc.depth.forward

    def spy(h, run, aux):
        def recording_run(slot, block, hh):
            inputs.append(hh - coordinate_embedding(run.q_pos, slot + 1, D_MODEL).double())
            return run(slot, block, hh)
        recording_run.q_pos = run.q_pos
        return forward(h, recording_run, aux)

    enc.depth.forward = spy
    out = enc(torch.randn(2, 9, D_MODEL, dtype=torch.float64))
    steps = out.info["act_steps"]
    assert len(inputs) == 4 and (steps < 3).any()
    for n in range(1, 4):
        halted = steps < n                      # halted after step steps < n: state frozen since then
        for m in range(n, 4):
            torch.testing.assert_close(inputs[m][halted], inputs[n][halted], rtol=0, atol=1e-12)


def _train_act(steps: int = 60):
    """Targets: a frozen 'teacher' transition applied once (easy tokens) or three times (hard tokens).

    The student ACT encoder starts from the teacher's block (attention output zeroed, so the
    transition is position-wise) and trains everything (the halting unit with a larger step
    size); it must learn when to stop.
    """
    torch.manual_seed(0)
    d = 16

    def make(depth, n_layers):
        cfg = rlformer.EncoderConfig(d_model=d, n_layers=n_layers, n_heads=2, position="none", block="pre_ln",
                                     depth=depth)
        cfg.act = rlformer.ACTConfig(max_steps=4, threshold=0.99, ponder_cost=1e-3, halting_bias_init=0.0)
        return rlformer.build_encoder(cfg)

    one, three, student = make("universal", 1), make("universal", 3), make("act", 1)
    with torch.no_grad():
        one.depth.block.attention.out_proj.weight.zero_()
        one.depth.block.attention.out_proj.bias.zero_()
    three.load_state_dict(one.state_dict())
    student.load_state_dict(one.state_dict(), strict=False)
    halting = list(student.depth.halting.parameters())
    rest = [p for n, p in student.named_parameters() if not n.startswith("depth.halting")]
    opt = torch.optim.Adam([{"params": halting, "lr": 3e-2}, {"params": rest, "lr": 1e-3}])
    for _ in range(steps):
        x = torch.randn(16, 12, d)
        hard = torch.rand(16, 12) < 0.5
        x[..., 0] = torch.where(hard, 2.0, -2.0)                       # the difficulty is visible in the input
        with torch.no_grad():
            target = torch.where(hard[..., None], three(x).output, one(x).output)
        out = student(x)
        loss = F.mse_loss(out.output, target) + out.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return out, hard


def test_act_uses_more_steps_on_harder_inputs():
    out, hard = _train_act()
    steps = out.info["act_steps"].float()
    assert steps[hard].mean() > steps[~hard].mean() + 1, (steps[hard].mean(), steps[~hard].mean())
    torch.testing.assert_close(out.info["act_weights"].sum(0), torch.ones(hard.shape), rtol=0, atol=1e-6)


@pytest.mark.parametrize("bad,match", [
    (dict(max_steps=0), "max_steps"), (dict(threshold=1.5), "threshold"), (dict(threshold=0.0), "threshold"),
    (dict(ponder_cost=-1.0), "ponder_cost"),
])
def test_act_invalid_settings_raise_at_build(bad, match):
    cfg = base_config(depth="act")
    cfg.act = rlformer.ACTConfig(**bad)
    with pytest.raises(ValueError, match=match):
        rlformer.build_encoder(cfg)


# --------------------------------------------------------------------------- early exit


def _exit_config(**kw):
    ee = kw.pop("early_exit", rlformer.EarlyExitConfig())
    cfg = base_config(depth="early_exit", n_layers=3, position="rope", **kw)
    cfg.early_exit = ee
    return cfg


@pytest.mark.parametrize("confidence", ["softmax_gap", "saturation", "classifier"])
def test_threshold_inf_equals_the_full_model_exactly(confidence):
    cfg = _exit_config(early_exit=rlformer.EarlyExitConfig(confidence=confidence, n_classes=5,
                                                           shared_head=False))
    enc = build(cfg).eval()
    full = build(base_config(depth="fixed", n_layers=3, position="rope")).eval()
    missing, unexpected = full.load_state_dict(enc.state_dict(), strict=False)
    assert not missing and all(k.startswith(("depth.heads", "depth.classifiers")) for k in unexpected)
    x = torch.randn(2, 12, D_MODEL)
    out = enc(x)
    assert torch.equal(out.output, full(x).output)
    assert out.info["exit_layer"].eq(3).all()
    enc.train()
    assert torch.equal(enc(x).output, full.train()(x).output)


def test_every_token_exiting_at_layer_one_equals_a_one_layer_model():
    cfg = _exit_config(early_exit=rlformer.EarlyExitConfig(confidence="saturation", threshold=-2.0))
    enc = build(cfg).eval()
    one = build(base_config(depth="fixed", n_layers=1, position="rope")).eval()
    one.load_state_dict({k: v for k, v in enc.state_dict().items() if not k.startswith("depth.blocks.1")
                         and not k.startswith("depth.blocks.2")})
    x = torch.randn(2, 12, D_MODEL)
    out = enc(x)
    assert out.info["exit_layer"].eq(1).all()
    torch.testing.assert_close(out.output, one(x).output, rtol=0, atol=0)


def test_exited_states_are_propagated_and_memory_segments_equal_full_pass():
    cfg = _exit_config(memory="xl", mem_len=64,
                       early_exit=rlformer.EarlyExitConfig(confidence="classifier", threshold=0.5))
    enc = build(cfg).eval()
    x = torch.randn(2, 20, D_MODEL)
    out = enc(x)
    layer = out.info["exit_layer"]
    assert 1 < len(layer.unique())                                   # some tokens exit early, some do not
    hidden = out.info["exit_hidden"]
    for n in range(3):
        for m in range(n, 3):                                        # a token that exited at n+1 stays frozen
            frozen = layer == n + 1
            assert torch.equal(hidden[m][frozen], hidden[n][frozen])
    torch.testing.assert_close(run_segments(enc, x, (6, 1, 13)), out.output, rtol=0, atol=1e-5)


def test_exit_losses_combine_all_exits():
    cfg = _exit_config(early_exit=rlformer.EarlyExitConfig(confidence="softmax_gap", n_classes=4,
                                                           loss_weights="linear"))
    enc = build(cfg)
    out = enc(torch.randn(2, 6, D_MODEL))
    y = torch.randint(0, 4, (2, 6))
    per = [F.cross_entropy(lg.reshape(-1, 4), y.reshape(-1)) for lg in out.info["exit_logits"]]
    torch.testing.assert_close(enc.depth.exit_losses(out.info, y), (per[0] + 2 * per[1] + 3 * per[2]) / 6)
    loss_fn = lambda h: h.square().mean()                            # noqa: E731  (any per-layer loss)
    expected = sum(h.square().mean() * (n + 1) / 6 for n, h in enumerate(out.info["exit_hidden"]))
    torch.testing.assert_close(enc.depth.exit_losses(out.info, loss_fn=loss_fn), expected)
    with pytest.raises(ValueError, match="targets"):
        build(_exit_config()).depth.exit_losses(out.info)


def _train_exit_model(steps: int = 120):
    """Easy tokens: the label is the token itself. Hard tokens: (previous + the one before) mod 8."""
    torch.manual_seed(0)
    cfg = rlformer.EncoderConfig(d_model=32, n_layers=3, n_heads=2, d_ff=64, position="rope", block="pre_ln",
                                 depth="early_exit")
    cfg.early_exit = rlformer.EarlyExitConfig(confidence="softmax_gap", n_classes=8, shared_head=False)
    enc = rlformer.build_encoder(cfg)
    emb = nn.Embedding(16, 32)
    opt = torch.optim.Adam([*enc.parameters(), *emb.parameters()], lr=3e-3)

    def data(n, gen=None):
        x = torch.randint(0, 16, (n, 24), generator=gen)
        hard = x >= 8
        y = torch.where(hard, (x.roll(1, 1) + x.roll(2, 1)) % 8, x % 8)
        y[:, :2] = -100
        return x, y, hard

    for _ in range(steps):
        x, y, _ = data(16)
        out = enc(emb(x))
        loss = enc.depth.exit_losses(out.info, y) + out.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return enc, emb, data(64, torch.Generator().manual_seed(1))


def test_loose_threshold_uses_fewer_layers_on_easy_tokens_and_calibration():
    enc, emb, (x, y, hard) = _train_exit_model()
    enc.eval()
    enc.depth.threshold = 0.9
    with torch.no_grad():
        out = enc(emb(x))
    layers = out.info["exit_layer"][:, 2:].float()
    easy = ~hard[:, 2:]
    assert layers[easy].mean() < 1.5 and layers[~easy].mean() > layers[easy].mean() + 1
    pred = EarlyExitDepth.logits_at_exit(out.info).argmax(-1)
    assert (pred[:, 2:][easy] == y[:, 2:][easy]).float().mean() > 0.95

    def accuracy():
        out = enc(emb(x))
        pred = EarlyExitDepth.logits_at_exit(out.info).argmax(-1)
        return float((pred == y)[y >= 0].float().mean())

    res = calibrate_threshold(enc, accuracy, tolerance=0.01)
    assert enc.depth.threshold == 0.9 and not enc.training                # restored
    assert res.table[0][0] == math.inf and res.table[0][2] == 3.0
    assert res.full_metric - res.metric <= 0.01 and res.avg_layers < 2.7
    enc.depth.threshold = res.threshold
    with torch.no_grad():
        assert math.isclose(accuracy(), res.metric)
        assert math.isclose(float(enc(emb(x)).info["exit_layer"].float().mean()), res.avg_layers, rel_tol=1e-9)

    def worse_when_exiting():                                            # every finite threshold loses accuracy
        accuracy()
        return 1.0 if math.isinf(enc.depth.threshold) else 0.5

    strict = calibrate_threshold(enc, worse_when_exiting, tolerance=0.1, grid=(0.0, 0.5))
    assert strict.threshold == math.inf and strict.avg_layers == 3.0 and len(strict.table) == 3
    with pytest.raises(ValueError, match="tolerance"):
        calibrate_threshold(enc, accuracy, tolerance=-0.1)


@pytest.mark.parametrize("bad,match", [
    (dict(confidence="softmax_gap", n_classes=0), "n_classes >= 2"),
    (dict(n_classes=-1), "n_classes"),
    (dict(threshold=float("nan")), "NaN"),
])
def test_early_exit_invalid_settings_raise_at_build(bad, match):
    with pytest.raises(ValueError, match=match):
        rlformer.build_encoder(_exit_config(early_exit=rlformer.EarlyExitConfig(**bad)))

"""The fused Triton kernels of causal random-feature attention (random_features_fused) against the chunk form of
random_features (itself tested against the per-token recurrence): outputs, end sums, gradients of q, k, v and of
RFA's learned tau, with key weights (padding), a carried state, a ragged last chunk and several segments per head.

On CPU the kernels run in Triton's interpreter (a subprocess with TRITON_INTERPRET=1, set before Triton compiles
anything); on CUDA in float32 (tight) and bfloat16 (against the chunk form, which rounds at the same places).
Both skip where Triton does not import (CPU-only installs such as CI)."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from triton_interpreter import compare_interpreted

import rlformer
from rlformer.attention import random_features_fused as fused_rf
from rlformer.attention.random_features import _carried_sums, _LinearAttention

torch.set_num_threads(1)
needs_triton = pytest.mark.skipif(fused_rf.triton is None, reason="Triton does not import here")
CASES = [(name, weights, state, programs, donate, keep, sums) for name in ("performer", "rfa")
         for weights, state, programs, donate, keep, sums in (
             (False, False, 1, False, False, False), (True, True, 256, True, True, False),
             (False, True, 16, True, True, False), (False, True, 16, False, False, True))]
"""(attention, key weights, carried state, ``PROGRAMS``, k and v donated, ``KEEP_STARTS``, segment sums launched
their own way: half the walks' chunk per step and 16 features per program): at T = 150 with 16-token chunks and 4
heads, 1 = one segment per head, 256 = one chunk per segment (10), 16 = four segments of three chunks, the last one
ragged"""


def compare(name: str, weights: bool, state: bool, programs: int, donate: bool = False, keep: bool = True,
            sums: bool = False, device: str = "cpu",
            dtype: torch.dtype = torch.float32, t: int = 150, d: int = 16, m: int = 32, chunk: int = 16,
            seed: int = 0) -> dict:
    """Largest errors of the fused kernels against ``_LinearAttention`` (relative to the reference's largest
    entry): out, end sums S and z, and the gradients of q, k, v (and RFA's log tau) under a random probe.

    ``donate``: k, v are handed over (``donate_kv``) as copies; the gradients are taken twice, first keeping the
    graph (no donation: the second pass reads k, v again; its errors are reported with a ``kept_`` prefix), then
    not (dk, dv written over the copies: ``dk_dv_in_kv_storage``)."""
    g = torch.Generator().manual_seed(seed)
    b, h = 2, 2
    cfg = rlformer.EncoderConfig(d_model=h * d, n_heads=h, n_layers=1, attention=name, position="none",
                                 dropout=0.0, causal=True, max_len=t)
    cfg.random_features = dataclasses.replace(cfg.random_features, n_features=m, chunk_size=16, seed=seed)
    layer = rlformer.validate(cfg)["attention"](cfg, 0, None).to(device)
    if name == "rfa":
        with torch.no_grad():
            layer.log_tau.copy_(torch.tensor([-1.0, -0.5]))     # normalizers well above the floor (trig features)
    q, k, v = (torch.randn(b, h, t, d, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
    weight = (torch.rand(b, 1, t, generator=g) > 0.2).float().to(device) if weights else None
    ms = m * layer.feature_multiplier
    carried = None
    if state:
        carried = {"S": 0.1 * torch.randn(b, h, ms, d, generator=g).abs(), "z": torch.rand(b, h, ms, generator=g)}
        carried = {key: x.to(device) for key, x in carried.items()}
    s0 = _carried_sums(carried, b, h, ms, d, torch.float32, device)
    floor = layer.den_floor(torch.float32)
    params = [q, k, v] + ([layer.log_tau] if name == "rfa" else [])

    def chunk_form(dt):
        """(out, end sums, gradients of params) of the chunk form with q, k, v in dtype dt."""
        qkv = [x.detach().to(dt).requires_grad_() for x in (q, k, v)]
        acc = torch.promote_types(dt, torch.float32)
        wq, wk = layer.feature_weights(acc)
        out, end = _LinearAttention.apply((type(layer), layer.feature_consts), [(0, t)], 16, floor, s0.to(acc),
                                          *qkv, None if weight is None else weight.to(acc), None, wq, wk)
        grads = torch.autograd.grad(out, qkv + params[3:], probe.to(dt))
        return out, end, grads

    probe = torch.randn(b, h, t, d, generator=g).to(device, dtype)
    ref, ref_end, ref_grads = chunk_form(dtype)
    settings = ("PROGRAMS", "CHUNK", "KEEP_STARTS", "SUMS_CHUNK", "SUMS_BLOCK_M")
    old = [getattr(fused_rf, key) for key in settings]
    fused_rf.PROGRAMS, fused_rf.CHUNK, fused_rf.KEEP_STARTS = programs, chunk, keep
    if sums:
        fused_rf.SUMS_CHUNK, fused_rf.SUMS_BLOCK_M = (dict.fromkeys(fused_rf.BLOCK_M, x) for x in (chunk // 2, 16))
    kd, vd = (x.detach().clone().requires_grad_() for x in (k, v)) if donate else (k, v)
    start = (s0[..., :d], s0[..., d]) if state else (None, None)          # a fresh start is given as None
    try:
        w, scale, bq, bk, kcoef, feat = layer.fused_weights()
        out, s_end, z_end = fused_rf.fused_random_features(feat, q, kd, vd, weight, w, scale, bq, bk, *start, kcoef,
                                                           floor, donate_kv=donate)
        with torch.no_grad():                   # inference: no kept starts, the same output
            out_no_grad = fused_rf.fused_random_features(feat, q, k, v, weight, w, scale, bq, bk, *start, kcoef,
                                                         floor)[0]
        inputs = [q, kd, vd] + params[3:]
        if donate:
            kept = torch.autograd.grad(out, inputs, probe, retain_graph=True)
        grads = torch.autograd.grad(out, inputs, probe)
        if keep:                                # under saved-tensor hooks (checkpointing): starts recomputed instead
            w, scale, bq, bk, kcoef, feat = layer.fused_weights()
            with torch.autograd.graph.saved_tensors_hooks(lambda x: x, lambda x: x):
                out_h = fused_rf.fused_random_features(feat, q, k, v, weight, w, scale, bq, bk, *start, kcoef,
                                                       floor)[0]
            hooks_keep_nothing = out_h.grad_fn.keep is None
            grads_h = torch.autograd.grad(out_h, params, probe)
    finally:
        for key, value in zip(settings, old):
            setattr(fused_rf, key, value)

    def rel(x, y):
        return ((x.double() - y.double()).abs().max() / y.double().abs().max()).item()

    def all_errors(o, s_e, z_e, gs, o_ref, end_ref, gs_ref):
        e = {"out": rel(o, o_ref), "S": rel(s_e, end_ref[..., :d]), "z": rel(z_e, end_ref[..., d])}
        e.update({f"d{n}": rel(a, r) for n, a, r in zip(("q", "k", "v", "log_tau"), gs, gs_ref)})
        return e

    errors = all_errors(out, s_end, z_end, grads, ref, ref_end, ref_grads)
    errors["out_no_grad"] = rel(out_no_grad, ref)
    if keep:
        errors["hooks_keep_nothing"] = hooks_keep_nothing
        errors.update({f"hooks_d{n}": rel(a, r) for n, a, r in zip(("q", "k", "v", "log_tau"), grads_h, ref_grads)})
    if donate:
        errors.update({f"kept_{key}": e for key, e in all_errors(out, s_end, z_end, kept, ref, ref_end,
                                                                 ref_grads).items()})
        errors["dk_dv_in_kv_storage"] = (grads[1].data_ptr() == kd.data_ptr() and grads[2].data_ptr() == vd.data_ptr()
                                         and kept[1].data_ptr() != kd.data_ptr())
    if dtype != torch.float32:                  # both against float64: the fused error next to the chunk form's own
        exact = chunk_form(torch.float64)
        errors["vs_float64"] = all_errors(out, s_end, z_end, grads, *exact)
        errors["chunk_form_vs_float64"] = all_errors(ref, ref_end[..., :d], ref_end[..., d], ref_grads, *exact)
        if donate:
            errors["kept_vs_float64"] = all_errors(out, s_end, z_end, kept, *exact)
    errors["out_storage_is_bthd"] = out.transpose(1, 2).is_contiguous()
    return errors


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA runs the compiled kernels (the tests below); Triton 3.6's "
                    "interpreter cannot take a scalar argument as a loop bound")
def test_interpreted_kernels_match_the_chunk_form():
    """All CASES in Triton's interpreter on CPU (float32, libdevice sin / cos; one subprocess)."""
    results = compare_interpreted("test_random_features_fused", timeout=900)
    for case, errors in zip(CASES, results):
        assert errors["out_storage_is_bthd"], case
        assert errors.get("dk_dv_in_kv_storage", True), case
        assert errors.get("hooks_keep_nothing", True), case
        for key, value in errors.items():
            if isinstance(value, float):
                assert value < 1e-4, (case, key, value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@needs_triton
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernels_match_the_chunk_form(case, dtype):
    """float32: the two agree to rounding; bfloat16: each output / gradient of the kernels is within twice the
    bfloat16 chunk form's own distance from the float64 chunk form plus four bfloat16 rounding units (2^-6): both
    round features and products to bfloat16, at different places; RFA's d log tau, a sum of T * M signed terms,
    has the largest rounding error."""
    errors = compare(*case, device="cuda", dtype=dtype, t=1000, d=64, m=64, chunk=64)
    assert errors["out_storage_is_bthd"]
    assert errors.get("dk_dv_in_kv_storage", True)
    if dtype == torch.float32:
        for key, value in errors.items():
            if isinstance(value, float):
                assert value < 2e-4, (case, key, value)
        return
    for kind in ("vs_float64", "kept_vs_float64") if case[4] else ("vs_float64",):
        for key, value in errors[kind].items():
            assert value < 2 * errors["chunk_form_vs_float64"][key] + 2 ** -6, (case, kind, key, errors)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@needs_triton
@pytest.mark.parametrize("name", ["performer", "rfa"])
def test_cuda_layer_uses_the_fused_kernels_and_matches_unfused(name, monkeypatch):
    """The layer's attend takes the fused path on CUDA and equals RLFORMER_FUSED=0 (the chunk form)."""
    cfg = rlformer.EncoderConfig(d_model=128, n_heads=2, n_layers=1, attention=name, position="none", dropout=0.0,
                                 causal=True, max_len=700)
    cfg.random_features = dataclasses.replace(cfg.random_features, n_features=64)
    layer = rlformer.validate(cfg)["attention"](cfg, 0, None).cuda()
    x = torch.randn(2, 700, 128, device="cuda", requires_grad=True)
    index = torch.arange(700, device="cuda")
    from rlformer.context import AttentionContext

    def step():
        ctx = AttentionContext(causal=True, q_index=index, k_index=index, q_pos=index[None].expand(2, -1), layer=0)
        out, state = layer(x, x, ctx)
        gx, = torch.autograd.grad(out.square().sum(), x)
        return out, state, gx

    calls = []
    original = fused_rf.FusedRandomFeatureAttention.apply
    monkeypatch.setattr(fused_rf.FusedRandomFeatureAttention, "apply",
                        staticmethod(lambda *a: calls.append(1) or original(*a)))
    out, state, gx = step()
    assert calls
    monkeypatch.setenv("RLFORMER_FUSED", "0")
    out0, state0, gx0 = step()
    assert len(calls) == 1
    torch.testing.assert_close(out, out0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state["S"], state0["S"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gx, gx0, rtol=1e-3, atol=1e-3)

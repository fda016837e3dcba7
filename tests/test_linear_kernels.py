"""``rlformer.attention.linear_kernels`` (Triton, causal linear attention from features) against the aten chunk form
of ``random_features`` in float64: outputs, end sums and every gradient, with several segments, ragged lengths,
feature widths that are not powers of two, carried sums and normalizers under the floor. Without a GPU the
kernels run under Triton's interpreter (tests/conftest.py sets ``TRITON_INTERPRET=1``), so CI checks the kernels'
code; on CUDA the same tests run the compiled kernels, and test_fused's CUDA tests check the layers end to end."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import rlformer
from rlformer.attention import linear_kernels as lk
from rlformer.attention import random_features as rf
from rlformer.context import AttentionContext
from variants import base_config

torch.set_num_threads(1)
F64 = torch.float64

pytestmark = pytest.mark.skipif(
    lk.triton is None or not (torch.cuda.is_available() or lk.interpreted()),
    reason="needs Triton: CUDA, or its interpreter (TRITON_INTERPRET=1 before triton is imported)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(t, m, d, signed, seed=0):
    g = torch.Generator().manual_seed(seed)
    if signed:       # trigonometric features: normalizers can fall under the floor
        q, k = (torch.randn(2, 3, t, m, generator=g, dtype=F64) * 0.3 for _ in range(2))
    else:
        q, k = (torch.rand(2, 3, t, m, generator=g, dtype=F64) for _ in range(2))
    v = torch.randn(2, 3, t, d, generator=g, dtype=F64)
    s0 = torch.randn(2, 3, m, d + 1, generator=g, dtype=F64) * 0.1
    s0[..., d] = torch.rand(2, 3, m, generator=g, dtype=F64) if not signed else s0[..., d]
    dout = torch.randn(2, 3, t, d, generator=g, dtype=F64)
    g_end = torch.randn(2, 3, m, d + 1, generator=g, dtype=F64)
    return q, k, v, s0, dout, g_end


@pytest.mark.parametrize("t, m, d, chunk, segment, signed", [
    (200, 20, 16, 16, 48, False),      # ragged T, 5 segments (the last partial), M not a power of two
    (150, 150, 16, 16, 64, False),     # three feature blocks of 64 (the last partial) adding their shares
    (100, 96, 24, 32, 64, True),       # two feature blocks with normalizers under the floor
    (64, 16, 16, 16, None, False),     # one segment
    (96, 32, 24, 16, 32, True),        # signed features: some normalizers under the floor
    (130, 16, 16, 32, 64, False),      # ragged last chunk inside the last segment
])
def test_kernels_match_the_aten_chunk_form(t, m, d, chunk, segment, signed):
    q, k, v, s0, dout, g_end = _case(t, m, d, signed)
    floor = 1e-2 if signed else 1e-6
    v1 = F.pad(v, (0, 1), value=1.0)
    ref, ref_end = rf._group_forward(q, k, v1, None, s0, chunk, floor)
    if signed:
        den = rf._chunk_pass(*(rf._chunks(x, -(-t // chunk), chunk) for x in (q, k, v1)), None, s0)["y"][..., d]
        assert (den < floor).any() and (den >= floor).any()
    dq_r, dk_r, dv_r, _, ds_r = rf._group_backward(q, k, v1, None, s0, chunk, floor, dout, g_end)

    dev = [x.float().to(DEVICE) for x in (q, k, v, s0, dout, g_end)]
    q32, k32, v32, s32, do32, ge32 = dev
    out, s_end, z_end = lk.forward(q32, k32, v32, s32[..., :d], s32[..., d], floor, torch.float32, chunk=chunk,
                                   segment=segment)
    dq, dk, dv, ds0, dz0 = lk.backward(q32, k32, v32, s32[..., :d], s32[..., d], floor, do32, ge32[..., :d],
                                       ge32[..., d], chunk=chunk, segment=segment)
    pairs = [(out, ref), (s_end, ref_end[..., :d]), (z_end, ref_end[..., d]), (dq, dq_r), (dk, dk_r),
             (dv, dv_r[..., :d]), (ds0, ds_r[..., :d]), (dz0, ds_r[..., d])]
    for got, want in pairs:
        torch.testing.assert_close(got.double().cpu(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_no_end_gradient_is_a_zero_one():
    q, k, v, s0, dout, _ = _case(80, 16, 16, False)
    args = [x.float().to(DEVICE) for x in (q, k, v)]
    s = s0.float().to(DEVICE)
    do = dout.float().to(DEVICE)
    a = lk.backward(*args, s[..., :16], s[..., 16], 1e-6, do, None, None, chunk=16, segment=32)
    zero = torch.zeros_like(s)
    b = lk.backward(*args, s[..., :16], s[..., 16], 1e-6, do, zero[..., :16], zero[..., 16], chunk=16, segment=32)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["performer", "rfa"])
@pytest.mark.parametrize("padded, n_features", [(False, 24), (True, 24), (True, 80)])   # 80: 2 / 3 feature blocks
def test_attend_through_kernels_equals_aten(monkeypatch, name, padded, n_features):
    """``attend`` of a causal layer (features and their weights' gradients, padding as key weights, three recompute
    groups with the sums carried between them, a carried state) gives the same outputs, end state and gradients
    through the kernels as through the aten chunk form."""
    cfg = base_config(attention=name, n_heads=2, causal=True)
    cfg.random_features = rlformer.RandomFeatureConfig(n_features=n_features, chunk_size=16, recompute_group=48)
    torch.manual_seed(0)
    att = (rf.PerformerAttention if name == "performer" else rf.RFAAttention)(cfg, layer=0).to(DEVICE)
    g = torch.Generator().manual_seed(1)
    b, h, t, dh = 2, 2, 120, 16
    m = att.feature_multiplier * att.n_features
    q, k, v = (torch.randn(b, h, t, dh, generator=g) for _ in range(3))
    s0, z0 = torch.rand(b, h, m, dh, generator=g) * 0.1, torch.rand(b, h, m, generator=g) + 1
    probe = torch.randn(b, h, t, dh, generator=g).to(DEVICE)
    idx = torch.arange(t, device=DEVICE)
    valid = None
    if padded:
        valid = torch.ones(b, t, dtype=torch.bool, device=DEVICE)
        valid[0, :21] = False
        valid[1, 50] = False
    runs, calls = [], []
    for name_ in ("forward", "backward"):
        real = getattr(lk, name_)
        monkeypatch.setattr(lk, name_, lambda *a, real=real, name_=name_, **kw: calls.append(name_) or real(*a, **kw))
    for use in (False, True):
        monkeypatch.setattr(lk, "available", lambda x, use=use: use)
        leaves = [x.to(DEVICE).requires_grad_() for x in (q, k, v, s0, z0)]
        ctx = AttentionContext(causal=True, q_index=idx, k_index=idx, q_pos=idx[None].expand(b, t), key_valid=valid,
                               state={"S": leaves[3], "z": leaves[4]})
        out, state = att.attend(*leaves[:3], ctx)
        grads = torch.autograd.grad((out * probe).sum(), leaves[:3] + att.feature_params())
        runs.append([out, state["S"], state["z"], *grads])
    assert calls == ["forward"] * 3 + ["backward"] * 3          # the second run only, one call per group
    for a, r in zip(*runs):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4 * r.abs().max().item())

"""Fused shared-QK bucket attention (rlformer.attention.bucket_fused) against the lean CPU path in float64.

The reference is ``chunked_softmax.bucket_softmax_attention`` with the shared-QK keys F.normalize(q) (itself
tested against the naive loops in test_attention_content / test_flex_bucket): outputs and the q, v gradients
(the key gradient reaches q through the normalization). On CPU the kernels run in Triton's interpreter (a
subprocess with TRITON_INTERPRET=1; CI has no Triton and skips it), on CUDA compiled; the CUDA tests also check the
lsh module's default path against the FlexAttention path and that the fused path's peak memory is below it.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from cuda_peak import step_peak_bytes
from triton_interpreter import compare_interpreted

from rlformer.attention import bucket_fused, flex_bucket
from rlformer.attention.chunked_softmax import bucket_softmax_attention

torch.set_num_threads(1)
F64 = torch.float64
needs_triton = pytest.mark.skipif(bucket_fused.triton is None, reason="Triton not installed")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
# (batch, heads, T, d_head, rounds, n_buckets, chunk, causal, padding, before, after): T not a multiple of the
# kernel block; one round (no weights), three (two "other round" tables), one bucket (every pair shares it), chunks
# as long as the kernel block (the benchmark's 64, with d_head 64)
CASES = [(2, 2, 150, 16, 2, 4, 16, True, True, 1, 0), (1, 2, 200, 32, 3, 6, 16, False, True, 1, 0),
         (1, 1, 100, 16, 1, 2, 32, True, False, 1, 0), (1, 2, 130, 16, 2, 1, 8, True, True, 1, 0),
         (1, 1, 120, 16, 2, 4, 16, False, False, 1, 1), (1, 2, 600, 64, 2, 8, 64, True, True, 1, 0)]


def padding(b, t):
    valid = torch.ones(b, t, dtype=torch.bool)
    valid[0, :3] = False
    valid[-1, 5] = False
    return valid


def compare(b, h, t, dh, n_rounds, n_buckets, chunk, causal, padded, before, after, device="cpu",
            dtype=torch.float32) -> dict:
    """Largest errors (relative to the reference's largest magnitude) of the fused output and q, v gradients
    for one case; q, v in split_heads' (B, T, H, dh) storage."""
    g = torch.Generator().manual_seed(b * 1000 + t + n_rounds)
    q, v, probe = (torch.randn(b, t, h, dh, generator=g).transpose(1, 2).to(dtype).double() for _ in range(3))
    buckets = torch.randint(0, n_buckets, (b, h, n_rounds, t), generator=g)
    valid = padding(b, t) if padded else None
    kw = {"causal": causal, "before": before, "after": after, "self_penalty": True, "key_valid": valid}
    scale = dh ** -0.5

    def run(fast, dev, dt):
        qq, vv = (x.detach().to(dev, dt).requires_grad_() for x in (q, v))
        if fast:
            out = bucket_fused.shared_qk_bucket_attention(
                qq, vv, buckets.to(dev), chunk, scale, dedup=True,
                **{**kw, "key_valid": None if valid is None else valid.to(dev)})
        else:
            out = bucket_softmax_attention(qq, F.normalize(qq, dim=-1), vv, buckets, n_buckets, chunk, scale,
                                           dedup=True, **kw)
        (out * probe.to(dev, dt)).sum().backward()
        return [x.detach().double().cpu() for x in (out, qq.grad, vv.grad)]

    ref = run(False, "cpu", F64)
    got = run(True, device, dtype)
    errors = {"finite": all(bool(torch.isfinite(x).all()) for x in got)}
    for name, a, r in zip(("out", "dq", "dv"), got, ref):
        errors[name] = ((a - r).abs().max() / r.abs().max().clamp(min=1.0)).item()
    return errors


def check(errors: dict, tol: float) -> None:
    assert errors["finite"], errors
    for name in ("out", "dq", "dv"):
        assert errors[name] < tol, errors


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA runs the compiled kernels (the tests below)")
def test_interpreted_kernels_match_the_lean_path():
    """All CASES in Triton's interpreter on CPU, float32 (IEEE products): outputs and gradients."""
    for errors in compare_interpreted("test_bucket_fused", timeout=900):
        check(errors, 1e-5)


def test_not_available_without_cuda_or_interpreter():
    """On a plain CPU run (no interpreter) and for unsupported head sizes the fused path says no, and calling it
    anyway names what is wrong."""
    q = torch.randn(1, 1, 8, 16)
    assert not bucket_fused.available(q, q)
    assert not bucket_fused.available(torch.randn(1, 1, 8, 24, device="cuda" if torch.cuda.is_available()
                                                  else "cpu"), torch.randn(1, 1, 8, 24))
    with pytest.raises(ValueError, match="flex_bucket_attention"):
        bucket_fused.shared_qk_bucket_attention(q, q, torch.zeros(1, 1, 1, 8, dtype=torch.long), 4, 0.25,
                                                causal=True)


@cuda
@needs_triton
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_cuda_kernels_match_the_lean_path(case, dtype, tol):
    check(compare(*case, device="cuda", dtype=dtype), tol)


@cuda
@needs_triton
@pytest.mark.parametrize("causal", [True, False])
def test_cuda_lsh_fused_path_is_as_accurate_as_flex(causal, monkeypatch):
    """The lsh module on CUDA takes the fused kernels with ``lsh.fused=True`` (only then); in bf16 (T = 3000, 8
    heads x 64, chunk 64, padding) its outputs and q, v gradients are as close to the float64 lean path (same bf16
    inputs, same buckets) as those of its FlexAttention path (``lsh.fused=False``): both are bf16 kernels, so each
    is compared with the reference, not with the other."""
    from variants import base_config

    from rlformer.attention.lsh import LSHAttention
    from rlformer.context import AttentionContext
    cfg = base_config(attention="lsh", d_model=512, n_heads=8, causal=causal)
    cfg.lsh = dataclasses.replace(cfg.lsh, n_buckets=16, n_hashes=2, chunk_size=64)
    t = 3000
    g = torch.Generator().manual_seed(3)
    q, v, probe = (torch.randn(2, t, 8, 64, generator=g).transpose(1, 2).to("cuda", torch.bfloat16)
                   for _ in range(3))
    valid = padding(2, t)
    idx = torch.arange(t, device="cuda")
    ctx = AttentionContext(causal=causal, q_index=idx, k_index=idx, q_pos=idx[None].expand(2, t),
                           key_valid=valid.cuda(), state={})
    errors, orig = [], bucket_fused.shared_qk_bucket_attention
    for fused in (True, False):
        cfg.lsh = dataclasses.replace(cfg.lsh, fused=fused)
        att = LSHAttention(cfg, layer=0).to("cuda", torch.bfloat16)
        qq, vv = (x.detach().clone().requires_grad_() for x in (q, v))
        calls = []
        monkeypatch.setattr(bucket_fused, "shared_qk_bucket_attention",
                            lambda *a, _run=orig, _calls=calls, **k: _calls.append(1) or _run(*a, **k))
        out, _ = att.attend(qq, F.normalize(qq.detach(), dim=-1), vv, ctx)
        monkeypatch.undo()
        assert bool(calls) == fused
        (out.float() * probe.float()).sum().backward()
        got = [x.double().cpu() for x in (out, qq.grad, vv.grad)]
        buckets = att.buckets(F.normalize(q, dim=-1)).cpu()             # the buckets both paths used
        q64, v64 = (x.double().cpu().requires_grad_() for x in (q, v))
        ref = bucket_softmax_attention(q64, F.normalize(q64, dim=-1), v64, buckets, 16, 64, att.scale, causal=causal,
                                       self_penalty=True, key_valid=valid, dedup=True)
        (ref * probe.double().cpu()).sum().backward()
        errors.append({name: ((a - r).abs().max() / r.abs().max()).item()
                       for name, a, r in zip(("out", "dq", "dv"), got, (ref.detach(), q64.grad, v64.grad))})
    fused_err, flex_err = errors
    for name in ("out", "dq", "dv"):
        assert fused_err[name] < 5e-2 and fused_err[name] <= 1.5 * flex_err[name] + 1e-3, errors


@cuda
@needs_triton
def test_cuda_fused_peak_memory_below_the_flex_path():
    """The benchmark's lsh settings at T = 8k (bf16, 8 heads x 64, two rounds, chunk 64): the fused step's peak
    (forward + backward above the inputs) is below the FlexAttention path's, whose backward holds the sorted
    copies of both rounds."""
    t, nb = 8192, 2 * (8192 // 128)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, v, grad = (torch.randn(1, t, 8, 64, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
                  for _ in range(3))
    q.requires_grad_(), v.requires_grad_()
    buckets = torch.randint(0, nb, (1, 8, 2, t), device="cuda", generator=g)
    kw = {"causal": True, "self_penalty": True, "dedup": True}

    fused = step_peak_bytes(
        lambda: bucket_fused.shared_qk_bucket_attention(q, v, buckets, 64, 0.125, **kw).backward(grad))
    flex = step_peak_bytes(
        lambda: flex_bucket.flex_bucket_attention(q, None, v, buckets, nb, 64, 0.125, **kw).backward(grad))
    block = t * 8 * 64 * 2
    assert fused < flex - 2 * block, (fused / 2 ** 20, flex / 2 ** 20)


@cuda
@needs_triton
def test_cuda_fused_backward_is_deterministic():
    """No atomics and one writer per gradient row per launch, so two backward passes on the same inputs give
    bit-equal gradients (bf16, T = 3000, random buckets, padding: the setting of session 16's accuracy probe,
    where the fused dq's error against float64 varied between runs: 4.3e-2 and 4.3e-3)."""
    b, h, t = 2, 8, 3000
    g = torch.Generator().manual_seed(3)
    q, v, probe = (torch.randn(b, t, h, 64, generator=g).transpose(1, 2).to("cuda", torch.bfloat16) for _ in range(3))
    buckets = torch.randint(0, 16, (b, h, 2, t), generator=g).cuda()
    kw = {"causal": True, "self_penalty": True, "key_valid": padding(b, t).cuda(), "dedup": True}
    grads = []
    for _ in range(3):
        qq, vv = (x.detach().clone().requires_grad_() for x in (q, v))
        out = bucket_fused.shared_qk_bucket_attention(qq, vv, buckets, 64, 0.125, **kw)
        torch.autograd.backward(out, probe)
        grads.append((out.detach(), qq.grad, vv.grad))
    for other in grads[1:]:
        for name, a, c in zip(("out", "dq", "dv"), grads[0], other):
            assert torch.equal(a, c), name

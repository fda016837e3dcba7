"""Content-based and low-rank attention: lsh, routing, linformer, performer, rfa.

Each fast path is checked against its naive reference (outputs and gradients, float64), the
degenerate settings against full attention, and the properties the papers rely on.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from variants import D_MODEL, base_config, small_config

import rlformer
from rlformer.attention.chunked import bucket_attention, combine_rounds, naive_bucket_attention
from rlformer.attention.chunked_softmax import bucket_softmax_attention
from rlformer.attention.linformer import LinformerAttention
from rlformer.attention.lsh import LSHAttention, lsh_buckets
from rlformer.attention.random_features import (
    PerformerAttention,
    RFAAttention,
    chunked_linear_attention,
    recurrent_linear_attention,
)
from rlformer.attention.routing import RoutingAttention
from rlformer.context import AttentionContext
from rlformer.diagnostics import saved_activation_bytes

torch.set_num_threads(1)
F64 = torch.float64


def ctx_for(b: int, t: int, causal: bool, key_valid=None, state=None) -> AttentionContext:
    idx = torch.arange(t)
    return AttentionContext(causal=causal, q_index=idx, k_index=idx, q_pos=idx[None].expand(b, t),
                            key_valid=key_valid, state=state or {})


def qkv(b=2, h=4, t=19, dh=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, t, dh, generator=g, dtype=F64).requires_grad_() for _ in range(3)]


def assert_same_outputs_and_grads(fast, ref, inputs, atol=1e-10):
    torch.testing.assert_close(fast, ref, rtol=0, atol=atol)
    probe = torch.randn_like(fast)
    g_fast = torch.autograd.grad((fast * probe).sum(), inputs, retain_graph=True, allow_unused=True)
    g_ref = torch.autograd.grad((ref * probe).sum(), inputs, retain_graph=True, allow_unused=True)
    for a, b in zip(g_fast, g_ref):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=atol)


def dense(q, k, v, allowed, scale):
    """Full softmax attention in the inputs' dtype (reference.dense_attention takes the softmax in float32)."""
    scores = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def padding(b, t):
    valid = torch.ones(b, t, dtype=torch.bool)
    valid[0, :3] = False
    valid[1, 5] = False
    return valid


# ------------------------------------------------------------------------------------- lsh


def lsh_module(**lsh):
    cfg = base_config(attention="lsh", n_heads=4)
    cfg.lsh = dataclasses.replace(cfg.lsh, **lsh)
    return LSHAttention(cfg, layer=0).double()


@pytest.mark.parametrize("n_hashes", [1, 2])
@pytest.mark.parametrize("causal", [True, False])
def test_lsh_one_bucket_is_shared_qk_full_attention_without_self(n_hashes, causal):
    att = lsh_module(n_buckets=1, n_hashes=n_hashes, chunk_size=32)
    q, _, v = qkv(t=17)
    k = F.normalize(q, dim=-1)
    out, _ = att.attend(q, k, v, ctx_for(2, 17, causal))
    t = 17
    allowed = ~torch.eye(t, dtype=torch.bool)
    if causal:
        allowed &= torch.ones(t, t, dtype=torch.bool).tril()
    allowed |= torch.eye(t, dtype=torch.bool) & ~allowed.any(-1, keepdim=True)   # self only when alone
    assert allowed[0].tolist() == [True] + [False] * (t - 1) if causal else not allowed.diagonal().any()
    torch.testing.assert_close(out, dense(q, k, v, allowed, att.scale), rtol=0, atol=1e-12)


def test_lsh_buckets_invariant_to_scale():
    att = lsh_module(n_buckets=8, n_hashes=3)
    x = torch.randn(3, 4, 50, 8, dtype=F64)
    base = lsh_buckets(x, att.rotations)
    assert base.shape == (3, 4, 3, 50) and base.min() >= 0 and base.max() < 8
    assert len(base.unique()) > 4
    for s in (1e-3, 0.5, 7.0, 1e4):
        assert torch.equal(lsh_buckets(x * s, att.rotations), base)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n_buckets,n_hashes,chunk", [(4, 3, 3), (2, 2, 5), (8, 1, 2)])
def test_lsh_matches_naive_reference(causal, n_buckets, n_hashes, chunk):
    att = lsh_module(n_buckets=n_buckets, n_hashes=n_hashes, chunk_size=chunk)
    q, _, v = qkv(t=19)
    k = F.normalize(q, dim=-1)
    valid = padding(2, 19)
    ctx = ctx_for(2, 19, causal, key_valid=valid)
    fast, _ = att.attend(q, k, v, ctx)
    assert_same_outputs_and_grads(fast, att.reference(q, k, v, ctx), [q, v])


def test_lsh_is_deterministic_with_buffer_rotations_and_exactly_causal():
    cfg = small_config("attention", "lsh")
    cfg.lsh = rlformer.LSHConfig(n_buckets=4, n_hashes=2, chunk_size=2)
    torch.manual_seed(0)
    enc = rlformer.build_encoder(cfg).eval().double()
    names = [n for n, _ in enc.named_parameters()]
    assert not any("rotations" in n for n in names)
    assert any(n.endswith("rotations") for n, _ in enc.named_buffers())
    x = torch.randn(2, 24, D_MODEL, dtype=F64)
    base = enc(x).output
    torch.testing.assert_close(enc(x).output, base, rtol=0, atol=0)
    y = x.clone()
    y[:, 12:] = torch.randn(2, 12, D_MODEL, dtype=F64) * 4      # changes the buckets of later tokens
    torch.testing.assert_close(enc(y).output[:, :12], base[:, :12], rtol=0, atol=1e-12)


def test_bucket_attention_sorted_chunks_bound_memory():
    """Scores exist only per (chunk, window): a long sequence runs without a T x T matrix."""
    b, h, t, dh = 1, 1, 4096, 8
    q = torch.randn(b, h, t, dh)
    buckets = torch.randint(0, 16, (b, h, 1, t))
    out, lse = bucket_attention(q, F.normalize(q, dim=-1), q, buckets, 16, 32, dh ** -0.5, causal=True,
                                self_penalty=True)
    assert out.shape == (b, h, 1, t, dh) and torch.isfinite(out).all() and torch.isfinite(lse).all()


@pytest.mark.parametrize("kernel", ["math", "flash_cpu"])
@pytest.mark.parametrize("causal,window,after", [(True, None, 0), (False, None, 1), (True, 4, 0), (False, 5, 0)])
def test_bucket_softmax_attention_matches_naive_in_one_and_many_groups(kernel, causal, window, after):
    """The lean path (kernels per group of chunks, rounds combined online, backward recomputed) ==
    the naive loops + combine_rounds, outputs and gradients, for 1 group and for groups of 1-2 chunks."""
    q, _, v = qkv(t=23)
    k = F.normalize(q, dim=-1)
    g = torch.Generator().manual_seed(4)
    buckets = torch.randint(0, 4, (2, 4, 3, 23), generator=g)
    kw = dict(causal=causal, after=after, self_penalty=True, key_valid=padding(2, 23), window=window)
    ref = combine_rounds(*naive_bucket_attention(q, k, v, buckets, 4, 3, 0.3, round_buckets=buckets, **kw))
    for max_scores in (1 << 20, 20):
        fast = bucket_softmax_attention(q, k, v, buckets, 4, 3, 0.3, dedup=True, max_scores=max_scores,
                                        kernel=kernel, **kw)
        assert_same_outputs_and_grads(fast, ref, [q, v], atol=1e-10)


@pytest.mark.parametrize("name,tensors", [("lsh", 4), ("routing", 6)])
def test_content_attention_keeps_linear_activation_memory(name, tensors):
    """lsh / routing save q, k, v, the output and integer layout tables (routing also the routed
    keys' normalization, input and output): no per-chunk scores or probabilities (the
    materializing path kept ~13x (lsh) / ~6x (routing) the output at T=4096)."""
    h, dh = 8, 64
    cfg = base_config(attention=name, n_heads=h, causal=True, d_model=h * dh)
    cfg.lsh = rlformer.LSHConfig(n_buckets=16, n_hashes=2, chunk_size=64, max_scores=1 << 20)
    cfg.routing = rlformer.RoutingConfig(n_clusters=8, window=64, chunk_size=64, max_scores=1 << 20)
    att = (LSHAttention if name == "lsh" else RoutingAttention)(cfg, layer=0)
    saved = []
    for t in (1024, 4096):
        q, v = (torch.randn(1, h, t, dh, requires_grad=True) for _ in range(2))
        k = F.normalize(q, dim=-1)
        total = saved_activation_bytes(lambda: att.attend(q, k, v, ctx_for(1, t, True))[0], exclude=att)
        assert v.grad.abs().sum() > 0 and torch.isfinite(q.grad).all()
        saved.append(total)
        assert total < 1.25 * tensors * t * h * dh * 4, (t, total)
    assert saved[1] <= 4 * saved[0] * 1.05, saved


@pytest.mark.parametrize("bad,match", [(dict(n_buckets=3), "even"), (dict(n_hashes=0), "n_hashes"),
                                       (dict(chunk_size=0), "chunk_size")])
def test_lsh_invalid_settings(bad, match):
    cfg = small_config("attention", "lsh")
    cfg.lsh = dataclasses.replace(cfg.lsh, **bad)
    with pytest.raises(ValueError, match=match):
        rlformer.build_encoder(cfg)


# --------------------------------------------------------------------------------- routing


def routing_module(**routing):
    cfg = base_config(attention="routing", n_heads=4)
    cfg.routing = dataclasses.replace(cfg.routing, **routing)
    return RoutingAttention(cfg, layer=0).double()


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("local_heads", [0, 1, 4])
def test_routing_matches_naive_reference(causal, local_heads):
    att = routing_module(n_clusters=3, window=3, chunk_size=3, local_heads=local_heads)
    assert att.n_local == (local_heads or 2)
    q, k, v = qkv(t=19)
    valid = padding(2, 19)
    ctx = ctx_for(2, 19, causal, key_valid=valid)
    fast, _ = att.attend(q, k, v, ctx)
    assert_same_outputs_and_grads(fast, att.reference(q, k, v, ctx), [q, k, v])


@pytest.mark.parametrize("local_heads", [0, 1, 4])
@pytest.mark.parametrize("position", ["none", "rope"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA-only: the FlexAttention path"))])
def test_routing_forward_by_head_group_projections_equals_project_then_attend(local_heads, position, device):
    """``RoutingAttention.forward`` projects per head group (the routed heads' keys never multiplied); it equals
    the generic ``Attention.forward`` (one q and one kv product, rotary, ``attend``): outputs and the gradients of
    x and of every parameter, with padding, in training (centroids restored between the two runs). CPU: float64
    (lean path); CUDA: float32 on the flex path, T = 300."""
    dtype, t = (torch.float64, 19) if device == "cpu" else (torch.float32, 300)
    cfg = base_config(attention="routing", n_heads=4, position=position)
    cfg.routing = dataclasses.replace(cfg.routing, n_clusters=3, window=3, chunk_size=3, local_heads=local_heads)
    pos = None if position == "none" else rlformer.registry.lookup("position", position)(cfg)
    att = RoutingAttention(cfg, layer=0, position=pos).to(device, dtype).train()
    x0 = torch.randn(2, t, cfg.d_model, dtype=dtype, device=device)
    valid = padding(2, t).to(device)
    idx = torch.arange(t, device=device)
    ctx = AttentionContext(causal=True, q_index=idx, k_index=idx, q_pos=idx[None].expand(2, t), key_valid=valid,
                           state={})
    centroids = att.centroids.clone()
    results = []
    for forward in (RoutingAttention.forward, rlformer.attention.base.Attention.forward):
        att.centroids.copy_(centroids)
        att.zero_grad()
        x = x0.clone().requires_grad_()
        out, _ = forward(att, x, x, ctx)
        assert device == "cpu" or rlformer.attention.routing.use_flex_bucket(out, att.dropout, True)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).view_as(out)).sum().backward()
        results.append([out.detach(), x.grad, att.centroids.clone()] +
                       [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in att.parameters()])
    for i, (a, b) in enumerate(zip(*results)):
        tol = 1e-10 if dtype == torch.float64 else 1e-4
        scale = b.abs().max().item() if b.numel() else 0.0
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(1.0, scale), msg=f"item {i}")
    assert att.n_local == 4 or not torch.equal(results[0][2], centroids)     # the EMA step ran (training)


def test_routing_is_causal_inside_the_attention():
    att = routing_module(n_clusters=3, window=4, chunk_size=2)
    q, k, v = (x.detach() for x in qkv(t=20))
    base, _ = att.attend(q, k, v, ctx_for(2, 20, True))
    for t in (0, 7, 15):
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        for x in (q2, k2, v2):
            x[:, :, t + 1:] = torch.randn_like(x[:, :, t + 1:]) * 3
        out, _ = att.attend(q2, k2, v2, ctx_for(2, 20, True))
        torch.testing.assert_close(out[:, :, :t + 1], base[:, :, :t + 1], rtol=0, atol=1e-12)


def test_routing_centroid_update_equals_the_one_hot_mean():
    """The index_add EMA step equals the literal one-hot formula, with padding and empty clusters."""
    torch.manual_seed(1)
    att = routing_module(n_clusters=5, ema_decay=0.7, local_heads=2)
    hr, dh = att.centroids.shape[0], att.centroids.shape[-1]
    x = torch.randn(3, hr, 40, dh, dtype=F64)
    clusters = torch.randint(0, 4, (3, hr, 40))                          # cluster 4 stays empty
    valid = torch.rand(3, 40) > 0.3
    before = att.centroids.clone()
    att.update_centroids(x, clusters, valid)
    onehot = F.one_hot(clusters, 5).to(F64) * valid[:, None, :, None].to(F64)
    sums, counts = torch.einsum("bhtc,bhtd->hcd", onehot, x), onehot.sum(dim=(0, 2))[..., None]
    want = torch.where(counts > 0, 0.7 * before + 0.3 * sums / counts.clamp(min=1), before)
    torch.testing.assert_close(att.centroids, want, rtol=0, atol=1e-12)
    assert torch.equal(att.centroids[:, 4], before[:, 4])


def test_routing_centroids_move_toward_the_data_under_ema():
    torch.manual_seed(0)
    att = routing_module(n_clusters=3, ema_decay=0.8, local_heads=2)
    dh, hr = 8, 2
    centers = F.normalize(torch.randn(hr, 3, dh, dtype=F64), dim=-1)

    def batch():
        which = torch.randint(0, 3, (2, hr, 64))
        pts = torch.take_along_dim(centers[None], which[..., None], dim=2) + 0.05 * torch.randn(2, hr, 64, dh, dtype=F64)
        return pts

    def fit(x):   # mean cosine between each point and its nearest centroid (the k-means objective)
        return torch.einsum("bhtd,hcd->bhtc", F.normalize(x, dim=-1), F.normalize(att.centroids, dim=-1)).amax(-1).mean()

    def center_gap():   # mean distance from each true center to its nearest centroid
        cos = torch.einsum("hkd,hcd->hkc", centers, F.normalize(att.centroids, dim=-1))
        return (1 - cos.amax(-1)).mean()

    probe = batch()
    before, gap_before = fit(probe), center_gap()
    att.eval()
    frozen = att.centroids.clone()
    v = torch.randn(2, 4, 64, dh, dtype=F64)
    x = batch()
    att.attend(torch.cat([x, x], 1), torch.cat([x, x], 1), v, ctx_for(2, 64, True))
    assert torch.equal(att.centroids, frozen), "eval must not update the centroids"
    att.train()
    for _ in range(30):
        x = batch()
        att.attend(torch.cat([x, x], 1), torch.cat([x, x], 1), v, ctx_for(2, 64, True))
    assert not any(n == "centroids" for n, _ in att.named_parameters())
    print(f"k-means fit {before:.3f} -> {fit(probe):.3f}; center gap {gap_before:.3f} -> {center_gap():.3f}")
    assert fit(probe) > before + 0.3
    assert center_gap() < gap_before / 2


def test_routing_invalid_local_heads():
    cfg = small_config("attention", "routing")
    cfg.routing = dataclasses.replace(cfg.routing, local_heads=9)
    with pytest.raises(ValueError, match="local_heads"):
        rlformer.build_encoder(cfg)


# ------------------------------------------------------------------------------- linformer


def linformer_module(sharing="headwise", k=8, max_len=19):
    cfg = base_config(attention="linformer", causal=False, n_heads=4)
    cfg.linformer = rlformer.LinformerConfig(k=k, max_len=max_len, sharing=sharing)
    return LinformerAttention(cfg, layer=0).double()


@pytest.mark.parametrize("sharing", ["none", "headwise", "kv", "layerwise"])
def test_linformer_identity_projections_equal_full_attention(sharing):
    att = linformer_module(sharing, k=19, max_len=19)
    with torch.no_grad():
        for p in (att.E, att.F):
            if p is not None:
                p.copy_(torch.eye(19, dtype=F64).expand_as(p))
    q, k, v = qkv(t=19)
    out, _ = att.attend(q, k, v, ctx_for(2, 19, False))
    torch.testing.assert_close(out, dense(q, k, v, None, att.scale), rtol=0, atol=1e-12)


@pytest.mark.parametrize("sharing", ["none", "headwise", "kv", "layerwise"])
def test_linformer_matches_per_head_loop_with_shorter_sequences(sharing):
    att = linformer_module(sharing, k=6, max_len=24)
    q, k, v = qkv(t=19)
    valid = padding(2, 19)
    fast, _ = att.attend(q, k, v, ctx_for(2, 19, False, key_valid=valid))
    rows = []
    for b in range(2):
        heads = []
        for h in range(4):
            e = att.E if att.E.dim() == 2 else att.E[h]
            f = e if att.F is None else (att.F if att.F.dim() == 2 else att.F[h])
            keep = valid[b].to(F64)[:, None]
            kk, vv = e[:, :19] @ (k[b, h] * keep), f[:, :19] @ (v[b, h] * keep)
            heads.append(torch.softmax(q[b, h] @ kk.T * att.scale, dim=-1) @ vv)
        rows.append(torch.stack(heads))
    assert_same_outputs_and_grads(fast, torch.stack(rows), [q, k, v])


def test_linformer_layerwise_shares_one_projection_per_encoder():
    cfg = small_config("attention", "linformer", n_layers=3)
    cfg.linformer = dataclasses.replace(cfg.linformer, sharing="layerwise")
    enc1, enc2 = rlformer.build_encoder(cfg), rlformer.build_encoder(cfg)
    e1 = [blk.attention.E for blk in enc1.depth.blocks]
    assert all(e is e1[0] for e in e1) and e1[0] is not enc2.depth.blocks[0].attention.E
    assert sum("attention.E" in n for n, _ in enc1.named_parameters()) == 1
    enc1(torch.randn(2, 16, D_MODEL)).output.sum().backward()
    assert e1[0].grad is not None and e1[0].grad.abs().sum() > 0


def test_linformer_refuses_causal_and_long_sequences():
    with pytest.raises(ValueError, match="mix the keys and values of all n positions"):
        rlformer.build_encoder(small_config("attention", "linformer", causal=True))
    enc = rlformer.build_encoder(small_config("attention", "linformer"))
    enc(torch.randn(1, 10, D_MODEL))                       # shorter than max_len: fine
    with pytest.raises(ValueError, match="max_len"):
        enc(torch.randn(1, 17, D_MODEL))


# ------------------------------------------------------------------- performer and rfa


def rf_module(name, n_features=16, chunk_size=4, gate=False, causal=True):
    cfg = base_config(attention=name, n_heads=4, causal=causal)
    cfg.random_features = rlformer.RandomFeatureConfig(n_features=n_features, chunk_size=chunk_size, gate=gate)
    cls = PerformerAttention if name == "performer" else RFAAttention
    return cls(cfg, layer=0).double()


@pytest.mark.parametrize("name", ["performer", "rfa"])
@pytest.mark.parametrize("causal", [True, False])
def test_random_features_converge_to_softmax_attention(name, causal):
    att = rf_module(name, causal=causal)
    if name == "rfa":
        with torch.no_grad():
            att.log_tau.fill_(1.0)                          # tau = e: sharper than uniform attention
    g = torch.Generator().manual_seed(0)
    q, k, v = (0.6 * torch.randn(2, 4, 24, 8, generator=g, dtype=F64) for _ in range(3))
    target = att.softmax_target(q, k, v, causal)
    errors = []
    for m in (4, 16, 64, 256, 1024):
        err = 0.0
        for seed in range(6):
            att.n_features = m
            att.features = torch.zeros(4, m, 8, dtype=F64)
            att.redraw(torch.Generator().manual_seed(100 + seed))
            out, _ = att.attend(q, k, v, ctx_for(2, 24, causal))
            err += (out - target).abs().mean().item() / 6
        errors.append(err)
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < errors[0] / 6, errors


@pytest.mark.parametrize("name,gate,causal", [("performer", False, True), ("performer", False, False),
                                              ("rfa", False, True), ("rfa", False, False), ("rfa", True, True)])
def test_chunked_prefix_sums_match_the_recurrence(name, gate, causal):
    att = rf_module(name, gate=gate, chunk_size=3)
    q, k, v = qkv(t=17)
    g = torch.Generator().manual_seed(1)
    log_gate = F.logsigmoid(torch.randn(2, 4, 17, generator=g, dtype=F64)).requires_grad_() if gate else None
    m = att.feature_multiplier * att.n_features
    state = {"S": torch.randn(2, 4, m, 8, generator=g, dtype=F64).abs(), "z": torch.rand(2, 4, m, generator=g,
                                                                                              dtype=F64) + 1}
    ctx = ctx_for(2, 17, causal, key_valid=padding(2, 17), state=state)
    fast, s_fast = att.attend(q, k, v, ctx, log_gate)
    ref, s_ref = att.reference(q, k, v, ctx, log_gate)
    inputs = [q, k, v] + ([log_gate] if gate else [])
    assert_same_outputs_and_grads(fast, ref, inputs, atol=1e-9)
    for key in ("S", "z"):
        torch.testing.assert_close(s_fast[key], s_ref[key], rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("gate", [False, True])
def test_chunked_equals_unchunked(gate):
    g = torch.Generator().manual_seed(2)
    phi_q, phi_k = (torch.rand(2, 3, 21, 10, generator=g, dtype=F64) for _ in range(2))
    v = torch.randn(2, 3, 21, 5, generator=g, dtype=F64)
    log_gate = F.logsigmoid(torch.randn(2, 3, 21, generator=g, dtype=F64)) if gate else None
    whole, s_whole = chunked_linear_attention(phi_q, phi_k, v, 21, causal=True, log_gate=log_gate)
    for chunk in (1, 4, 8, 64):
        out, s = chunked_linear_attention(phi_q, phi_k, v, chunk, causal=True, log_gate=log_gate)
        torch.testing.assert_close(out, whole, rtol=0, atol=1e-12)
        torch.testing.assert_close(s["S"], s_whole["S"], rtol=1e-12, atol=1e-12)
    ref, _ = recurrent_linear_attention(phi_q, phi_k, v, causal=True, log_gate=log_gate)
    torch.testing.assert_close(whole, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name,gate,position", [("performer", False, "rope"), ("performer", False, "sinusoidal"),
                                                ("rfa", True, "rope"), ("rfa", False, "none")])
def test_step_by_step_with_state_equals_full_causal_pass(name, gate, position):
    cfg = small_config("attention", name, position=position)
    cfg.random_features = rlformer.RandomFeatureConfig(n_features=16, chunk_size=3, gate=gate)
    torch.manual_seed(0)
    enc = rlformer.build_encoder(cfg).eval()
    x = torch.randn(3, 14, D_MODEL)
    full = enc(x)
    assert set(full.state.slots[0]["attention"]) == {"S", "z"}
    for splits in ([1] * 14, [5, 1, 8]):
        state, outs = None, []
        for seg in x.split(splits, dim=1):
            out = enc(seg, state=state)
            state = out.state
            outs.append(out.output)
        torch.testing.assert_close(torch.cat(outs, 1), full.output, rtol=0, atol=1e-5)
        torch.testing.assert_close(state.slots[1]["attention"]["S"], full.state.slots[1]["attention"]["S"],
                                   rtol=1e-5, atol=1e-5)
    # zeros are a fresh state: resetting rows gives exactly the fresh pass for them
    reset = torch.tensor([True, False, True])
    y = torch.randn(3, 5, D_MODEL)
    out = enc(y, state=full.state, reset=reset).output
    torch.testing.assert_close(out[reset], enc(y).output[reset], rtol=0, atol=1e-6)
    assert not torch.allclose(out[1], enc(y).output[1])


def test_features_fixed_in_eval_redrawn_per_training_forward_when_asked():
    cfg = small_config("attention", "performer")
    enc = rlformer.build_encoder(cfg)
    feats = enc.depth.blocks[0].attention.features
    assert "features" not in dict(enc.named_parameters())
    first = feats.clone()
    enc.train()(torch.randn(1, 8, D_MODEL))
    enc.eval()(torch.randn(1, 8, D_MODEL))
    assert torch.equal(feats, first)
    cfg.random_features = dataclasses.replace(cfg.random_features, redraw=True)
    enc = rlformer.build_encoder(cfg)
    feats = enc.depth.blocks[0].attention.features
    first = feats.clone()
    enc.eval()(torch.randn(1, 8, D_MODEL))
    assert torch.equal(feats, first)
    enc.train()(torch.randn(1, 8, D_MODEL))
    assert not torch.equal(feats, first)


def test_random_features_padding_hides_padded_tokens():
    enc = rlformer.build_encoder(small_config("attention", "performer")).eval()
    x = torch.randn(2, 8, D_MODEL)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[:, :3] = False
    out = enc(x, mask=mask).output
    y = x.clone()
    y[:, :3] = torch.randn(2, 3, D_MODEL) * 5
    torch.testing.assert_close(enc(y, mask=mask).output[:, 3:], out[:, 3:], rtol=0, atol=1e-6)


@pytest.mark.parametrize("bad,match", [
    (dict(attention="performer", position="alibi"), "hook"),
    (dict(attention="rfa", position="shaw"), "hook"),
    (dict(attention="performer", random_features=rlformer.RandomFeatureConfig(gate=True)), "attention='rfa'"),
    (dict(attention="rfa", causal=False, random_features=rlformer.RandomFeatureConfig(gate=True)), "causal=True"),
    (dict(attention="performer", memory="xl"), "memory"),
])
def test_random_feature_invalid_settings(bad, match):
    with pytest.raises(ValueError, match=match):
        rlformer.build_encoder(base_config(**bad))


@pytest.mark.parametrize("causal", [True, False])
def test_bucket_attention_chunk_groups_equal_one_pass(causal):
    """The memory-bounded path (chunk groups under checkpointing) computes the same outputs and gradients."""
    q, _, v = qkv(t=23)
    k = F.normalize(q, dim=-1)
    g = torch.Generator().manual_seed(3)
    buckets = torch.randint(0, 4, (2, 4, 2, 23), generator=g)
    kw = dict(causal=causal, self_penalty=True, key_valid=padding(2, 23), round_buckets=buckets)
    one, lse_one = bucket_attention(q, k, v, buckets, 4, 3, 0.3, **kw)
    many, lse_many = bucket_attention(q, k, v, buckets, 4, 3, 0.3, max_scores=200, **kw)
    torch.testing.assert_close(lse_many, lse_one, rtol=0, atol=1e-12)
    assert_same_outputs_and_grads(many, one, [q, v], atol=1e-12)


MINE = ["lsh", "routing", "linformer", "performer", "rfa"]


@pytest.mark.parametrize("name", MINE)
def test_position_hooks_input_and_rotary_only(name):
    for position in ("rope", "sinusoidal"):
        enc = rlformer.build_encoder(small_config("attention", name, position=position))
        assert torch.isfinite(enc(torch.randn(2, 16, D_MODEL)).output).all()
    with pytest.raises(ValueError, match="hook"):
        rlformer.build_encoder(small_config("attention", name, position="alibi"))


def test_half_precision_keeps_float32_buffers():
    enc = rlformer.build_encoder(small_config("attention", "routing")).to(torch.bfloat16)
    att = enc.depth.blocks[0].attention
    assert att.centroids.dtype == torch.float32 and att.q_proj.weight.dtype == torch.bfloat16
    before = att.centroids.clone()
    enc.train()(torch.randn(2, 16, D_MODEL, dtype=torch.bfloat16))
    assert not torch.equal(att.centroids, before), "EMA updates must survive bf16 (0.999 x rounds to x there)"
    for name, buf in (("lsh", "rotations"), ("performer", "features")):
        enc = rlformer.build_encoder(small_config("attention", name)).half()
        assert getattr(enc.depth.blocks[0].attention, buf).dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-only: GPU fast paths against the CPU float64 pass")
@pytest.mark.parametrize("name", MINE)
def test_cuda_matches_cpu_float64(name):
    # bf16 for the continuous variants; float32 for lsh/routing, whose discrete bucket / cluster
    # choices may legitimately flip on near-ties under bf16 rounding.
    dtype = torch.float32 if name in ("lsh", "routing") else torch.bfloat16
    cfg = small_config("attention", name)
    torch.manual_seed(0)
    enc = rlformer.build_encoder(cfg).eval()
    x = torch.randn(2, 16, D_MODEL)
    ref = enc.double()(x.double()).output.float()
    out = enc.to("cuda", dtype)(x.to("cuda", dtype)).output.float().cpu()
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-3 if dtype == torch.float32 else 0.1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-only: fused memory-efficient kernel vs CPU float64")
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("causal", [True, False])
def test_cuda_bucket_softmax_kernels_match_cpu_float64(dtype, atol, causal):
    """The CUDA branch (aten memory-efficient attention forward/backward per group, bias in the
    inputs' dtype) and the CUDA math kernel against the CPU float64 path, outputs and gradients."""
    g = torch.Generator().manual_seed(5)
    b, h, t, dh = 2, 4, 200, 64
    q, v = (torch.randn(b, h, t, dh, generator=g, dtype=F64) for _ in range(2))
    buckets = torch.randint(0, 4, (b, h, 2, t), generator=g)
    valid = padding(b, t)
    probe = torch.randn(b, h, t, dh, generator=g, dtype=F64)
    kw = dict(causal=causal, after=0 if causal else 1, self_penalty=True, dedup=True)

    def run(device, dt, kernel, max_scores):
        qq, vv = (x.detach().clone().to(device, dt).requires_grad_() for x in (q, v))
        out = bucket_softmax_attention(qq, F.normalize(qq, dim=-1), vv, buckets.to(device), 4, 16, 0.125,
                                       key_valid=valid.to(device), max_scores=max_scores, kernel=kernel, **kw)
        (out * probe.to(device, dt)).sum().backward()
        return [x.double().cpu() for x in (out, qq.grad, vv.grad)]

    ref = run("cpu", F64, "flash_cpu", 1 << 24)
    for kernel, max_scores in (("efficient", 1 << 24), ("efficient", 5000), ("math", 1 << 24)):
        for a, r in zip(run("cuda", dtype, kernel, max_scores), ref):
            torch.testing.assert_close(a, r, rtol=0, atol=atol * max(1.0, r.abs().max().item()))


@pytest.mark.parametrize("name,gate", [("performer", False), ("rfa", False), ("rfa", True)])
def test_recomputed_causal_backward_matches_the_recurrence_across_groups(name, gate):
    att = rf_module(name, gate=gate, chunk_size=3)
    att.recompute_group = 6                                 # 17 tokens: groups of 6, 6, 5 (chunks of 3)
    q, k, v = qkv(t=17)
    g = torch.Generator().manual_seed(3)
    log_gate = F.logsigmoid(torch.randn(2, 4, 17, generator=g, dtype=F64)).requires_grad_() if gate else None
    m = att.feature_multiplier * att.n_features
    s0 = torch.randn(2, 4, m, 8, generator=g, dtype=F64).abs().requires_grad_()
    z0 = (torch.rand(2, 4, m, generator=g, dtype=F64) + 1).requires_grad_()
    ctx = ctx_for(2, 17, True, key_valid=padding(2, 17), state={"S": s0, "z": z0})
    fast, s_fast = att.attend(q, k, v, ctx, log_gate)
    ref, s_ref = att.reference(q, k, v, ctx, log_gate)
    inputs = [q, k, v, s0, z0] + ([log_gate] if gate else []) + att.feature_params()
    assert_same_outputs_and_grads(fast, ref, inputs, atol=1e-9)
    for key in ("S", "z"):
        torch.testing.assert_close(s_fast[key], s_ref[key], rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("name,gate", [("performer", False), ("rfa", True)])
def test_causal_random_features_keep_linear_activation_memory(name, gate):
    """The causal forward keeps only q, k, v (+ gates, padding) and the carried sums at group
    boundaries: 3 * dh floats per token and head, plus M * dh per 1024 tokens. With M = dh = 64
    that is ~1.5 * T * H * (M + dh) * 4 bytes; the old per-chunk tensors kept 7-14x."""
    h, m, dh = 8, 64, 64
    cfg = base_config(attention=name, n_heads=h, causal=True, d_model=h * dh)
    cfg.random_features = rlformer.RandomFeatureConfig(n_features=m // (2 if name == "rfa" else 1), chunk_size=64,
                                                       gate=gate)
    att = (PerformerAttention if name == "performer" else RFAAttention)(cfg, layer=0)
    saved = []
    for t in (1024, 4096):
        q, k, v = (torch.randn(1, h, t, dh, requires_grad=True) for _ in range(3))
        log_gate = F.logsigmoid(torch.randn(1, h, t)).requires_grad_() if gate else None
        total = saved_activation_bytes(lambda: att.attend(q, k, v, ctx_for(1, t, True), log_gate)[0], exclude=att)
        assert q.grad is not None and k.grad.abs().sum() > 0
        saved.append(total)
        assert total < 2.0 * t * h * (m + dh) * 4, (t, total)
    assert saved[1] <= 4 * saved[0] * 1.05, saved                    # linear in T

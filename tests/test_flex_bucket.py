"""FlexAttention path of lsh / routing (rlformer.attention.flex_bucket).

CPU: FlexAttention runs forward only there (uncompiled, the dense eager implementation), so the CPU tests
check the forward of ``flex_bucket_attention`` (and of lsh / routing ``attend`` forced onto it) against the
naive loop reference, and that the static band BlockMask holds every pair the naive mask allows. The CUDA
tests (skipped without a GPU) check outputs and gradients of the compiled kernel, that calls with new data
do not recompile, and that peak memory grows linearly in T.
"""
from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
import torch.nn.functional as F
from cuda_peak import step_peak_bytes
from flex_stand_in import dense_flex
from variants import base_config

from rlformer.attention import flex_bucket, lsh, routing
from rlformer.attention.chunked import bucket_attention, combine_rounds, naive_bucket_attention
from rlformer.attention.flex_bucket import BLOCK, band_block_mask, bucket_slots, flex_bucket_attention
from rlformer.attention.lsh import LSHAttention
from rlformer.attention.routing import RoutingAttention
from rlformer.context import AttentionContext

torch.set_num_threads(1)
F64 = torch.float64
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-only: compiled FlexAttention kernels")


@pytest.fixture(autouse=True)
def _ieee_float32():
    """The CUDA float32 tolerances need IEEE float32 matmuls (TF32 rounds to ~1e-3); restored after each test.
    (Not monkeypatch: torch.backends.cuda.matmul's flags are not plain attributes, undo would delattr them.)"""
    if not torch.cuda.is_available():
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def padding(b, t):
    valid = torch.ones(b, t, dtype=torch.bool)
    valid[0, :3] = False
    valid[-1, 5] = False
    return valid


def ctx_for(b, t, causal, key_valid=None):
    idx = torch.arange(t)
    return AttentionContext(causal=causal, q_index=idx, k_index=idx, q_pos=idx[None].expand(b, t),
                            key_valid=key_valid, state={})


def inputs(b, h, t, dh, n_rounds, n_buckets, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    q, v = (torch.randn(b, h, t, dh, generator=g, dtype=dtype) for _ in range(2))
    buckets = torch.randint(0, n_buckets, (b, h, n_rounds, t), generator=g)
    return q, F.normalize(q, dim=-1), v, buckets


# ------------------------------------------------------------------------- CPU: forward vs naive


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n_rounds,n_buckets,chunk,after,window",
                         [(1, 4, 3, 0, None), (2, 4, 5, 0, None), (2, 2, 4, 1, None), (3, 3, 2, 0, None),
                          (1, 1, 6, 1, 6), (2, 8, 2, 0, 5)])
def test_forward_matches_naive(causal, n_rounds, n_buckets, chunk, after, window):
    """Several chunks per bucket and several buckets, key padding, 1-3 rounds (dedup), windows."""
    q, k, v, buckets = inputs(2, 3, 41, 8, n_rounds, n_buckets)
    kw = {"causal": causal, "after": after, "self_penalty": True, "key_valid": padding(2, 41), "window": window}
    ref = combine_rounds(*naive_bucket_attention(q, k, v, buckets, n_buckets, chunk, 0.3, round_buckets=buckets,
                                                 **kw))
    with torch.no_grad():
        out = flex_bucket_attention(q, k, v, buckets, n_buckets, chunk, 0.3, dedup=True, compile=False, **kw)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


def test_forward_without_self_penalty_or_dedup_matches_naive():
    q, k, v, buckets = inputs(1, 2, 30, 8, 2, 3, seed=1)
    ref = combine_rounds(*naive_bucket_attention(q, k, v, buckets, 3, 4, 0.5, causal=True))
    with torch.no_grad():
        out = flex_bucket_attention(q, k, v, buckets, 3, 4, 0.5, causal=True, compile=False)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


def test_float32_forward_matches_naive():
    q, k, v, buckets = inputs(2, 2, 40, 16, 2, 4, seed=2, dtype=torch.float32)
    kw = {"causal": True, "self_penalty": True, "key_valid": padding(2, 40)}
    ref = combine_rounds(*naive_bucket_attention(q, k, v, buckets, 4, 4, 0.25, round_buckets=buckets, **kw))
    with torch.no_grad():
        out = flex_bucket_attention(q, k, v, buckets, 4, 4, 0.25, dedup=True, compile=False, **kw)
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-6)


@pytest.mark.parametrize("n_buckets", [1, 3])
def test_split_heads_storage_and_identity_order_match_naive(n_buckets):
    """q, k, v in split_heads' (B, T, H, dh) storage; with one bucket, one round and T = 256 the sorted order is
    the identity and the inputs go to the kernel ungathered (routing's local heads)."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 256, 2, 8, generator=g, dtype=F64).transpose(1, 2) for _ in range(3))
    buckets = torch.randint(0, n_buckets, (1, 2, 1, 256), generator=g)
    kw = {"causal": True, "key_valid": padding(1, 256), "window": 40}
    ref, _ = naive_bucket_attention(q, k, v, buckets, n_buckets, 24, 0.3, **kw)
    with torch.no_grad():
        out = flex_bucket_attention(q, k, v, buckets, n_buckets, 24, 0.3, compile=False, **kw)
    torch.testing.assert_close(out, ref[:, :, 0], rtol=0, atol=1e-12)


@pytest.fixture
def eager_flex(monkeypatch):
    """Force lsh / routing ``attend`` onto the flex path on CPU (uncompiled, forward only)."""
    for module in (lsh, routing):
        monkeypatch.setattr(module, "use_flex_bucket", lambda q, dropout, training: True)
        monkeypatch.setattr(module, "flex_bucket_attention", functools.partial(flex_bucket_attention, compile=False))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n_hashes", [1, 2])
def test_lsh_attend_on_the_flex_path_matches_reference(eager_flex, causal, n_hashes):
    cfg = base_config(attention="lsh", n_heads=4)
    cfg.lsh = dataclasses.replace(cfg.lsh, n_buckets=4, n_hashes=n_hashes, chunk_size=3)
    att = LSHAttention(cfg, layer=0).double()
    q, k, v, _ = inputs(2, 4, 29, 8, 1, 1, seed=3)
    ctx = ctx_for(2, 29, causal, padding(2, 29))
    with torch.no_grad():
        out, _ = att.attend(q, k, v, ctx)
        torch.testing.assert_close(out, att.reference(q, k, v, ctx), rtol=0, atol=1e-12)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("local_heads", [1, 2])
def test_routing_attend_on_the_flex_path_matches_reference(eager_flex, causal, local_heads):
    cfg = base_config(attention="routing", n_heads=4, causal=causal)
    cfg.routing = dataclasses.replace(cfg.routing, n_clusters=3, window=5, chunk_size=3, local_heads=local_heads)
    att = RoutingAttention(cfg, layer=0).double().eval()
    q, _, v, _ = inputs(2, 4, 29, 8, 1, 1, seed=4)
    k = torch.randn_like(q)                         # local heads use their own keys; routed heads ignore k
    ctx = ctx_for(2, 29, causal, padding(2, 29))
    with torch.no_grad():
        out, _ = att.attend(q, k, v, ctx)
        torch.testing.assert_close(out, att.reference(q, k, v, ctx), rtol=0, atol=1e-12)


# ------------------------------------------------------------------------- CPU: the permutation autograd Functions


def layouts(b, h, t, dh, g):
    """(B, H, T, dh) float64 tensors in the storage orders the layers hand over: contiguous, split_heads'
    (B, T, H, dh), and a ``chunk`` of a wider projection (row stride 2 H dh, storage offset H dh)."""
    plain = torch.randn(b, h, t, dh, generator=g, dtype=F64)
    split = torch.randn(b, t, h, dh, generator=g, dtype=F64).transpose(1, 2)
    wide = torch.randn(b, t, 2 * h * dh, generator=g, dtype=F64).chunk(2, dim=-1)[1].view(b, t, h, dh).transpose(1, 2)
    return [plain, split, wide]


def slot_tables(buckets, chunk=4):
    b, h, r, t = buckets.shape
    tables = bucket_slots(buckets, chunk, None, dedup=False)
    length = tables["length"]
    dst = (torch.arange(b * h * r) * length).view(b, h, r, 1) + tables["slot"]
    return tables["rows"], tables["slot"], dst, length


@pytest.mark.parametrize("t", [41, 128])
def test_gather_matches_plain_indexing_and_gradcheck(t):
    """``_Gather`` (rounds x permutation, inverse-permutation backward) equals x[b, h, rows] in value and in the
    gradient (zero probe on the padding slots, whose gradient the kernel makes zero); gradcheck without padding."""
    g = torch.Generator().manual_seed(11)
    b, h, r, dh = 2, 2, 2, 4
    xs = [x.requires_grad_() for x in layouts(b, h, t, dh, g)]
    buckets = torch.randint(0, 3, (b, h, r, t), generator=g)
    rows, slot, _, length = slot_tables(buckets)
    ys = flex_bucket._Gather.apply(rows, slot, *xs)
    bi, hi = torch.arange(b).view(b, 1, 1, 1), torch.arange(h).view(1, h, 1, 1)
    refs = [x[bi, hi, rows.long()].reshape(b, h * r, length, dh) for x in xs]
    probes = [torch.randn(y.shape, generator=g, dtype=F64) for y in ys]
    for p in probes:
        p[:, :, t:] = 0
    for y, ref in zip(ys, refs):
        assert torch.equal(y, ref)
    got = torch.autograd.grad(sum((y * p).sum() for y, p in zip(ys, probes)), xs)
    want = torch.autograd.grad(sum((y * p).sum() for y, p in zip(refs, probes)), xs)
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, rtol=0, atol=1e-12)
    if t % BLOCK == 0:
        small = [x.detach()[:1, :, :, :2].clone().requires_grad_() for x in xs[:2]]   # clone keeps the strides
        assert torch.autograd.gradcheck(lambda *z: flex_bucket._Gather.apply(rows[:1], slot[:1], *z), small)


@pytest.mark.parametrize("n_rounds", [1, 3])
def test_ungather_matches_index_select_and_combine_rounds(n_rounds):
    """``_Ungather`` (back to position order, rounds combined) equals index_select + ``combine_rounds`` in value
    and gradients w.r.t. the kernel output and lse (padding slots included: zero for both); gradcheck."""
    g = torch.Generator().manual_seed(12)
    b, h, t, dh = 2, 2, 41, 3
    buckets = torch.randint(0, 3, (b, h, n_rounds, t), generator=g)
    rows, slot, dst, length = slot_tables(buckets)
    out = torch.randn(b, h * n_rounds, length, dh, generator=g, dtype=F64, requires_grad=True)
    lse = torch.randn(b, h * n_rounds, length, generator=g, dtype=F64, requires_grad=True) if n_rounds > 1 else None

    def plain(out, lse):
        o = out.reshape(-1, dh).index_select(0, dst.reshape(-1).long()).view(b, h, n_rounds, t, dh)
        if lse is None:
            return o[:, :, 0]
        return combine_rounds(o, lse.reshape(-1).index_select(0, dst.reshape(-1).long()).view(b, h, n_rounds, t))

    got, ref = flex_bucket._Ungather.apply(out, lse, rows, slot), plain(out, lse)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    probe = torch.randn(b, h, t, dh, generator=g, dtype=F64)
    inputs = [out] if lse is None else [out, lse]
    for a, w in zip(torch.autograd.grad((got * probe).sum(), inputs), torch.autograd.grad((ref * probe).sum(), inputs)):
        torch.testing.assert_close(a, w, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *z: flex_bucket._Ungather.apply(z[0], z[1] if lse is not None else None,
                                                                           rows, slot), (out, lse))


@cuda
@pytest.mark.parametrize("n_rounds", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_row_kernels_match_the_aten_path(n_rounds, dtype, monkeypatch):
    """The Triton row kernels (``row_gather``: gather, its round-summing backward, the round combination and its
    backward) give the values and gradients of the aten path, for the three storage layouts, T not a multiple of
    the block (padding slots), one to three rounds."""
    from rlformer.attention import row_gather
    g = torch.Generator().manual_seed(21)
    b, h, t, dh = 2, 3, 300, 64
    rows, slot, _, length = (x.cuda() if torch.is_tensor(x) else x
                             for x in slot_tables(torch.randint(0, 4, (b, h, n_rounds, t), generator=g)))
    xs = [x.to("cuda", dtype).requires_grad_() for x in layouts(b, h, t, dh, g)]
    lse = (torch.randn(b, h * n_rounds, length, generator=g) * 3).cuda().requires_grad_() if n_rounds > 1 else None
    probe = torch.randn(b, h, t, dh, generator=g).cuda()
    fast = row_gather.available
    assert fast(xs[0])

    def run(use_kernels: bool):
        monkeypatch.setattr(row_gather, "available", fast if use_kernels else (lambda x: False))
        ys = flex_bucket._Gather.apply(rows, slot, *xs)
        o = flex_bucket._Ungather.apply(ys[0] + 2 * ys[1] - ys[2], lse, rows, slot)
        leaves = xs + ([] if lse is None else [lse])
        return [y.detach() for y in ys] + [o.detach()] + list(torch.autograd.grad((o.float() * probe).sum(), leaves))

    got, want = run(True), run(False)
    for a, w in zip(got[:3], want[:3]):
        assert torch.equal(a, w)                      # the gathers copy bits
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for a, w in zip(got[3:], want[3:]):
        assert a.shape == w.shape and a.stride() == w.stride()
        torch.testing.assert_close(a.float(), w.float(), rtol=tol, atol=tol)


# ------------------------------------------------------------------------- CPU: the band BlockMask


def naive_allowed(buckets, n_buckets, chunk, causal, after, window, key_valid):
    """(B, H, R, T, T) allowed pairs of the naive reference: with zero scores and v = identity, the output
    row of query i is uniform over its allowed keys (no self penalty, no dedup: every weight > 0)."""
    b, h, _, t = buckets.shape
    zeros = torch.zeros(b, h, t, 1, dtype=F64)
    eye = torch.eye(t, dtype=F64).expand(b, h, t, t)
    out, _ = naive_bucket_attention(zeros, zeros, eye, buckets, n_buckets, chunk, 1.0, causal=causal, after=after,
                                    key_valid=key_valid, window=window)
    return out > 0


@pytest.mark.parametrize("chunk,causal,after,window", [(64, True, 0, None), (128, False, 0, None),
                                                        (200, True, 0, None), (48, False, 1, None),
                                                        (130, True, 0, 150), (37, False, 1, 90)])
def test_band_block_mask_covers_every_allowed_pair(chunk, causal, after, window):
    """Every (query, key) pair the naive mask allows lies in a block of the static band (in slot order),
    for chunk sizes below, at, above and not dividing the 128 block; and the band is sparse."""
    t, n_buckets = 700, 2
    g = torch.Generator().manual_seed(chunk)
    buckets = torch.randint(0, n_buckets, (1, 1, 2, t), generator=g)
    buckets[..., 100:400] = 0                                  # a long run: chunks far from block boundaries
    valid = padding(1, t)
    allowed = naive_allowed(buckets, n_buckets, chunk, causal, after, window, valid)
    tables = bucket_slots(buckets, chunk, valid, dedup=False)
    mask = band_block_mask(tables["length"], chunk, 1, after, causal, window, "cpu")
    dense = mask.to_dense()[0, 0].bool()                       # (NQ, NK) blocks in the band
    assert dense.shape == (tables["length"] // BLOCK,) * 2
    for r in range(2):
        i, j = allowed[0, 0, r].nonzero(as_tuple=True)
        slot = tables["slot"][0, 0, r]
        assert dense[slot[i] // BLOCK, slot[j] // BLOCK].all()
    back, ahead = 2 * chunk - 1, 0 if causal else (after + 1) * chunk - 1
    if window is not None:
        back, ahead = min(back, window - 1), min(ahead, window - 1)
    assert dense.sum(1).max() <= (back + ahead) // BLOCK + 2   # only the blocks that the reach can touch


def test_band_is_linear_in_length():
    """Causal, chunk 64, one chunk back: every query block but the first needs exactly 2 key blocks."""
    for t in (1024, 4096):
        dense = band_block_mask(t, 64, 1, 0, True, None, "cpu").to_dense()[0, 0]
        assert dense.sum().item() == 2 * (t // BLOCK) - 1


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("chunk,n_buckets,causal,after,window", [(64, 3, True, 0, None), (37, 1, False, 1, 90)])
def test_compiled_cpu_forward_uses_the_band_and_does_not_recompile(chunk, n_buckets, causal, after, window):
    """The production call (torch.compile'd flex_attention; one round, since compiled CPU flex has no lse) runs
    the kernel over the band's blocks only (T = 700: 6 query blocks), equals the dense eager forward, and a
    second call with new buckets reuses the compiled graph."""
    from torch._dynamo.utils import counters
    g = torch.Generator().manual_seed(chunk)
    q, k, v = (torch.randn(1, 2, 700, 16, generator=g) for _ in range(3))
    kw = {"causal": causal, "after": after, "self_penalty": True, "key_valid": padding(1, 700), "window": window}
    for call in range(2):
        buckets = torch.randint(0, n_buckets, (1, 2, 1, 700), generator=g)
        with torch.no_grad():
            ref = flex_bucket_attention(q, k, v, buckets, n_buckets, chunk, 0.25, compile=False, **kw)
            out = flex_bucket_attention(q, k, v, buckets, n_buckets, chunk, 0.25, compile=True, **kw)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
        if call == 0:
            graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n_rounds", [1, 2])
def test_unit_keys_give_the_normalized_keys_gradients(monkeypatch, causal, n_rounds):
    """Shared-QK keys passed as q itself with 1 / |q| in the score (``_UnitKeys``): outputs and q / v gradients equal
    those of explicit keys F.normalize(q) (autograd through the normalization), float64, dense stand-in for flex."""
    monkeypatch.setattr(flex_bucket, "_flex", lambda: (dense_flex, None))
    monkeypatch.setattr(flex_bucket._UnitKeys, "ROWS", 100)                 # several row chunks in backward
    q, _, v, buckets = inputs(2, 3, 37, 8, n_rounds, 4, seed=5)
    q = q * torch.linspace(0.2, 3.0, 37, dtype=q.dtype)[:, None]            # norms far from 1
    probe = torch.randn(2, 3, 37, 8, dtype=q.dtype)
    kw = {"causal": causal, "self_penalty": True, "key_valid": padding(2, 37), "dedup": True}
    results = []
    for shared in (True, False):
        qq, vv = (x.clone().requires_grad_() for x in (q, v))
        keys = None if shared else F.normalize(qq, dim=-1)
        out = flex_bucket_attention(qq, keys, vv, buckets, 4, 3, 0.4, compile=True, **kw)
        (out * probe).sum().backward()
        results.append((out.detach(), qq.grad, vv.grad))
    for name, a, c in zip(("out", "dq", "dv"), *results):
        torch.testing.assert_close(a, c, rtol=0, atol=1e-12, msg=name)
    assert results[0][1].abs().max() > 1e-3


@pytest.mark.parametrize("shared_qk,n_rounds,groups", [(True, 2, 2), (True, 1, 3), (False, 2, 4), (False, 3, 0)])
def test_head_groups_equal_one_call(monkeypatch, shared_qk, n_rounds, groups):
    """``head_groups`` (``_HeadGroups``: a graph per group of heads, backward group by group) gives the outputs and
    q, k, v gradients of one call, float64, the dense stand-in for flex; split_heads storage, padding, dedup.
    groups=0 with ``GROUP_ROWS`` lowered: the automatic choice (one head per group here)."""
    monkeypatch.setattr(flex_bucket, "_flex", lambda: (dense_flex, None))
    assert (flex_bucket.auto_head_groups(8, 2, 16384), flex_bucket.auto_head_groups(8, 2, 65536)) == (1, 4)
    monkeypatch.setattr(flex_bucket, "GROUP_ROWS", 64)
    assert flex_bucket.auto_head_groups(4, n_rounds, 128) == 4
    g = torch.Generator().manual_seed(11)
    b, h, t, dh = 2, 4, 45, 8
    q, k, v = (torch.randn(b, t, h, dh, generator=g, dtype=F64).transpose(1, 2) for _ in range(3))
    buckets = torch.randint(0, 4, (b, h, n_rounds, t), generator=g)
    probe = torch.randn(b, h, t, dh, generator=g, dtype=F64)
    kw = {"causal": True, "self_penalty": True, "key_valid": padding(b, t), "dedup": True, "compile": True}
    results = []
    for head_groups in (1, groups):
        qq, kk, vv = (x.detach().clone().requires_grad_() for x in (q, k, v))
        keys = None if shared_qk else kk
        out = flex_bucket_attention(qq, keys, vv, buckets, 4, 3, 0.4, head_groups=head_groups, **kw)
        assert (out.grad_fn.name() == "_HeadGroupsBackward") == (head_groups != 1)
        (out * probe).sum().backward()
        results.append((out.detach(), qq.grad, vv.grad, kk.grad if not shared_qk else torch.zeros(())))
    for name, a, c in zip(("out", "dq", "dv", "dk"), *results):
        torch.testing.assert_close(a, c, rtol=0, atol=1e-12, msg=name)
    assert results[1][1].abs().max() > 1e-3 and results[1][1].stride() == q.stride()   # split_heads layout kept


def test_lsh_head_groups_on_the_flex_path_match_the_lean_path(monkeypatch):
    """lsh ``attend`` with ``lsh.head_groups=2`` on the flex path (dense stand-in) vs the CPU lean path: outputs
    and q, v gradients (shared-QK, two rounds, padding, causal), float64."""
    monkeypatch.setattr(flex_bucket, "_flex", lambda: (dense_flex, None))
    monkeypatch.setattr(lsh, "flex_bucket_attention", functools.partial(flex_bucket_attention, compile=True))
    cfg = base_config(attention="lsh", n_heads=4)
    cfg.lsh = dataclasses.replace(cfg.lsh, n_buckets=4, n_hashes=2, chunk_size=3, head_groups=2)
    att = LSHAttention(cfg, layer=0).double()
    q, _, v, _ = inputs(2, 4, 29, 8, 1, 1, seed=6)
    probe = torch.randn_like(q)
    results = []
    for flex_path in (True, False):
        monkeypatch.setattr(lsh, "use_flex_bucket", lambda *a, f=flex_path: f)
        qq, vv = (x.clone().requires_grad_() for x in (q, v))
        out, _ = att.attend(qq, F.normalize(qq, dim=-1), vv, ctx_for(2, 29, True, padding(2, 29)))
        (out * probe).sum().backward()
        results.append((out.detach(), qq.grad, vv.grad))
    for name, a, c in zip(("out", "dq", "dv"), *results):
        torch.testing.assert_close(a, c, rtol=0, atol=1e-10, msg=name)


def test_head_groups_keep_one_groups_sorted_copies_at_a_time(monkeypatch):
    """Forward keeps no sorted copy (only q, v and the slot tables); backward makes each group's again and drops
    them before the next group's: when a group's rows are summed back, only that group's copies are alive. A
    second backward through the same graph (retain_graph) gives the same gradients."""
    import weakref
    monkeypatch.setattr(flex_bucket, "_flex", lambda: (dense_flex, None))
    made, alive_at_sum = [], []
    gather, total = flex_bucket.gather_sorted, flex_bucket.sum_sorted

    def tracked_gather(x, rows):
        y = gather(x, rows)
        made.append(weakref.ref(y))
        return y

    def tracked_sum(*a, **k):
        alive_at_sum.append(sum(r() is not None for r in made))
        return total(*a, **k)

    monkeypatch.setattr(flex_bucket, "gather_sorted", tracked_gather)
    monkeypatch.setattr(flex_bucket, "sum_sorted", tracked_sum)
    q, _, v, buckets = inputs(1, 4, 40, 8, 2, 4, seed=2)
    q, v = q.requires_grad_(), v.requires_grad_()
    out = flex_bucket_attention(q, None, v, buckets, 4, 3, 0.4, causal=True, dedup=True, head_groups=4, compile=True)
    assert len(made) == 8 and all(r() is None for r in made)         # q and v per group, none kept
    out.sum().backward(retain_graph=True)
    assert len(made) == 16 and alive_at_sum == [2] * 8               # per group: q's rows, then v's
    first = (q.grad.clone(), v.grad.clone())
    q.grad = v.grad = None
    out.sum().backward()
    torch.testing.assert_close((q.grad, v.grad), first, rtol=0, atol=0)


def test_shared_qk_hash_keys_keep_no_graph_on_the_flex_path(monkeypatch):
    """On the flex path lsh's keys (k = q / |q|) and routing's routed keys only hash / route (the kernel makes its
    keys from q): they carry no graph, so nothing keeps q alive until backward; off it they do."""
    for flex_path in (True, False):
        monkeypatch.setattr(lsh, "use_flex_bucket", lambda *a, f=flex_path: f)
        att = LSHAttention(base_config(attention="lsh"), layer=0)
        x = torch.randn(1, 8, att.cfg.d_model, requires_grad=True)
        q, k, v = att.project(x, x)
        assert q.requires_grad and v.requires_grad and k.requires_grad == (not flex_path)
        rout = RoutingAttention(base_config(attention="routing"), layer=0)
        routed_q = q[:, :rout.centroids.shape[0]]
        assert rout._routed(routed_q, keys_grad=not flex_path)[0].requires_grad == (not flex_path)


# ------------------------------------------------------------------------- CUDA: compiled kernels


def _run(device, dtype, q, v, buckets, kw, probe, k=None, fast=True):
    qq, vv = (x.detach().clone().to(device, dtype).requires_grad_() for x in (q, v))
    kk = None if k is None else k.detach().clone().to(device, dtype).requires_grad_()
    keys = F.normalize(qq, dim=-1) if kk is None else kk
    if fast:
        out = flex_bucket_attention(qq, keys, vv, buckets.to(device), 8, 32, 0.125, **kw)
    else:        # materializing sort-and-chunk path (tested against the naive loops in test_attention_content)
        o, lse = bucket_attention(qq, keys, vv, buckets.to(device), 8, 32, 0.125,
                                  round_buckets=buckets.to(device) if kw.get("dedup") else None,
                                  **{n: x for n, x in kw.items() if n != "dedup"})
        out = combine_rounds(o, lse)
    (out * probe.to(device, dtype)).sum().backward()
    return [x.double().cpu() for x in (out, qq.grad, vv.grad) + (() if kk is None else (kk.grad,))]


@cuda
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-4), (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n_rounds,shared_qk", [(1, True), (2, True), (2, False)])
def test_cuda_outputs_and_gradients_match_reference(dtype, atol, causal, n_rounds, shared_qk):
    """Compiled flex (outputs, dq through the shared-QK normalization, dk, dv) vs the float64 CPU reference on
    the same (dtype-rounded) inputs; T = 1000 with chunk 32 and 8 buckets: about 40 chunks per round."""
    g = torch.Generator().manual_seed(7)
    b, h, t, dh = 2, 4, 1000, 64
    q, v, k = (torch.randn(b, h, t, dh, generator=g).to(dtype).double() for _ in range(3))
    buckets = torch.randint(0, 8, (b, h, n_rounds, t), generator=g)
    probe = torch.randn(b, h, t, dh, generator=g, dtype=F64)
    kw = {"causal": causal, "self_penalty": True, "key_valid": padding(b, t), "dedup": True}
    key = None if shared_qk else k
    ref = _run("cpu", F64, q, v, buckets, kw, probe, key, fast=False)
    got = _run("cuda", dtype, q, v, buckets, {**kw, "key_valid": kw["key_valid"].cuda()}, probe, key)
    for name, a, r in zip(("out", "dq", "dv", "dk"), got, ref):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, r, rtol=0, atol=atol * max(1.0, r.abs().max().item()), msg=name)


@cuda
@pytest.mark.parametrize("name", ["lsh", "routing"])
def test_cuda_module_attend_matches_cpu_lean_path(name):
    """lsh / routing ``attend`` on CUDA (their fast paths: lsh's fused kernels, routing's flex; float32; T = 384,
    so routing's local heads take the ungathered identity order) vs the CPU float64 lean path, with padding:
    outputs and q, k, v gradients."""
    cfg = base_config(attention=name, d_model=64, n_heads=4, causal=True)
    if name == "lsh":
        cfg.lsh = dataclasses.replace(cfg.lsh, n_buckets=4, n_hashes=2, chunk_size=16)
        att = LSHAttention(cfg, layer=0)
    else:
        cfg.routing = dataclasses.replace(cfg.routing, n_clusters=3, window=24, chunk_size=16)
        att = RoutingAttention(cfg, layer=0).eval()
    t = 384
    g = torch.Generator().manual_seed(8)
    q, k, v, probe = (torch.randn(2, 4, t, 16, generator=g, dtype=F64) for _ in range(4))
    valid = padding(2, t)

    def run(device, dtype):
        qq, kk, vv = (x.detach().to(device, dtype).requires_grad_() for x in (q, k, v))
        keys = F.normalize(qq, dim=-1) if name == "lsh" else kk
        out, _ = att.to(device, dtype).attend(qq, keys, vv, ctx_for(2, t, True, valid.to(device)))
        (out * probe.to(device, dtype)).sum().backward()
        return [x.double().cpu() if x is not None else torch.zeros(()) for x in (out, qq.grad, kk.grad, vv.grad)]

    ref = run("cpu", F64)
    assert flex_bucket.use_flex_bucket(q.cuda().float(), att.dropout, att.training)
    for what, a, r in zip(("out", "dq", "dk", "dv"), run("cuda", torch.float32), ref):
        torch.testing.assert_close(a, r, rtol=0, atol=2e-4 * max(1.0, r.abs().max().item()), msg=what)


@cuda
@pytest.mark.parametrize("shared_qk", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_head_groups_equal_one_call(shared_qk, dtype):
    """Compiled kernels, Triton row kernels (``sum_rounds`` into head slices): head_groups=4 gives the outputs and
    gradients of one call (same kernels per head, so equal up to the order of float sums)."""
    g = torch.Generator().manual_seed(9)
    b, h, t, dh = 1, 8, 2000, 64
    q, k, v, probe = (torch.randn(b, t, h, dh, generator=g).transpose(1, 2).to("cuda", dtype) for _ in range(4))
    buckets = torch.randint(0, 8, (b, h, 2, t), generator=g).cuda()
    kw = {"causal": True, "self_penalty": True, "dedup": True}
    results = []
    for groups in (1, 4):
        qq, kk, vv = (x.detach().clone().requires_grad_() for x in (q, k, v))
        out = flex_bucket_attention(qq, None if shared_qk else kk, vv, buckets, 8, 32, 0.125, head_groups=groups, **kw)
        (out * probe).sum().backward()
        results.append([x.float() for x in (out, qq.grad, vv.grad) + (() if shared_qk else (kk.grad,))])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for name, a, c in zip(("out", "dq", "dv", "dk"), *results):
        torch.testing.assert_close(a, c, rtol=0, atol=tol * max(1.0, c.abs().max().item()), msg=name)


@cuda
def test_cuda_new_buckets_do_not_recompile():
    from torch._dynamo.utils import counters
    kw = {"causal": True, "self_penalty": True, "dedup": True}
    for seed in range(3):
        q, k, v, buckets = (x.cuda() for x in inputs(1, 2, 512, 64, 2, 8, seed=seed, dtype=torch.float32))
        flex_bucket_attention(q, k, v, buckets, 8, 32, 0.125, **kw)
        if seed == 0:
            graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs


@cuda
def test_cuda_peak_memory_is_linear_in_length():
    """bf16, B=1, 8 heads, d_head 64, 2 rounds (the benchmark's lsh settings): fwd+bwd peak at T = 16k is
    about twice that at 8k (quadratic would be 4x) and below a quarter of the 8 heads' T x T bf16 score
    matrices (4 GiB at 16k)."""
    def peak(t):
        g = torch.Generator(device="cuda").manual_seed(0)
        q, v = (torch.randn(1, 8, t, 64, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
                for _ in range(2))
        buckets = torch.randint(0, 2 * (t // 128), (1, 8, 2, t), device="cuda", generator=g)

        def step():
            out = flex_bucket_attention(q, F.normalize(q, dim=-1), v, buckets, 2 * (t // 128), 64, 0.125,
                                        causal=True, self_penalty=True, dedup=True)
            out.backward(torch.ones_like(out))

        return step_peak_bytes(step)

    peaks = [peak(8192), peak(16384)]
    assert peaks[1] < 2.5 * peaks[0], peaks
    assert peaks[1] < 0.25 * 8 * 16384 ** 2 * 2, peaks

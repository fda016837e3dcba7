"""Mask-shaped attentions (local, local2d, strided, fixed, blockwise, longformer, bigbird, etc).

Fast path (SDPA + the masks.py pattern) == naive loop-built reference, outputs and gradients, in
float64 with padding and XL memory prefixes; hand-checked pattern entries from the papers;
degenerate settings == full attention; the FlexAttention mask_mod == the dense mask (no hash
arithmetic inside it; compiled BlockMasks == dense blocks); build-time errors; the Sparse Transformer
fast paths (strided columns == reference with gradients, fixed's summary-first key order makes the
BlockMask sparse, eager Flex forward == dense); and (CUDA only) FlexAttention == the dense path.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import rlformer
from rlformer.attention.masks import PatternAttention, dense_mask, flex_mask_mod
from rlformer.context import AttentionContext
from rlformer.registry import lookup

torch.set_num_threads(1)

H, D = 4, 32


def config(attention, causal, d_model=D, **family):
    cfg = rlformer.EncoderConfig(d_model=d_model, n_heads=H, n_layers=2, attention=attention, causal=causal,
                                 position="none", dropout=0.0)
    for name, kw in family.items():
        setattr(cfg, name, dataclasses.replace(getattr(cfg, name), **kw))
    return cfg


def module(cfg, layer=0, position=None, dtype=torch.float64):
    torch.manual_seed(0)
    rlformer.validate(cfg)
    pos = None if position is None else lookup("position", position)(cfg)
    return lookup("attention", cfg.attention)(cfg, layer, pos).to(dtype)


def context(t, n_mem=0, causal=True, pad=False, b=2):
    index = torch.arange(n_mem + t)
    valid = None
    if pad:
        valid = torch.ones(b, n_mem + t, dtype=torch.bool)
        valid[0, : n_mem + 2] = False        # empty memory slots + left padding
        valid[1, -2:] = False                # right padding
    q_pos = torch.arange(t)[None].expand(b, -1)
    return AttentionContext(causal=causal, q_index=index[n_mem:], k_index=index, q_pos=q_pos, key_valid=valid)


CASES = {
    "local": dict(local=dict(block_size=4, lookback=3)),
    "local2d": dict(local=dict(grid=(3, 5), query_shape=(2, 2), memory_flange=(1, 2))),
    "strided-merged": dict(sparse=dict(stride=3, mode="merged")),
    "strided-split": dict(sparse=dict(stride=3, mode="split")),
    "strided-interleaved": dict(sparse=dict(stride=3, mode="interleaved")),
    "fixed-merged": dict(sparse=dict(stride=4, summary=2, mode="merged")),
    "fixed-split": dict(sparse=dict(stride=4, summary=1, mode="split")),
    "fixed-interleaved": dict(sparse=dict(stride=4, summary=2, mode="interleaved")),
    "blockwise": dict(sparse=dict(n_blocks=3)),
    "blockwise-seeded": dict(sparse=dict(n_blocks=4, seed=5)),
    "longformer": dict(global_local=dict(window=2, dilation=2, dilated_heads=2, global_positions=(0, 5),
                                         layer_windows=(1, 3))),
    "bigbird": dict(global_local=dict(block_size=3, window_blocks=1, n_random=2, global_positions=(1,), seed=3)),
    "etc": dict(global_local=dict(window=2, n_global_tokens=3)),
}


LAYER_LEVEL = ("etc", "longformer")   # extra parameters beyond q/k/v: compared through the whole layer


def variant(case):
    return case.split("-")[0]


def settings():
    out = []
    for case in CASES:
        cls = lookup("attention", variant(case))
        for causal in (True, False):
            if (causal and not cls.supports_causal) or (not causal and not cls.supports_bidirectional):
                continue
            for n_mem in ((0, 5) if cls.supports_memory else (0,)):
                for pad in (False, True):
                    out.append((case, causal, n_mem, pad))
    return out


SETTINGS = settings()


def seq_len(case):
    return 15 if variant(case) == "local2d" else 11


def run_both(attn, t, ctx, layer_input=False):
    """(fast, reference) outputs and gradients w.r.t. the inputs (and ETC's parameters)."""
    b = ctx.q_pos.shape[0]
    torch.manual_seed(1)
    if layer_input:
        x = torch.randn(b, ctx.k_index.shape[0], D, dtype=torch.float64)
        results = []
        for fn in (lambda *a: attn(*a)[0], attn.reference_forward):
            xi = x.clone().requires_grad_()
            attn.zero_grad()
            out = fn(xi[:, ctx.n_mem:], xi, ctx)
            out.backward(torch.ones_like(out) + torch.linspace(0, 1, out.numel()).view_as(out).to(out))
            results.append((out.detach(), xi.grad, *(p.grad.clone() for p in attn.parameters())))
        return results
    q = torch.randn(b, H, t, D // H, dtype=torch.float64)
    k = torch.randn(b, H, ctx.k_index.shape[0], D // H, dtype=torch.float64)
    v = torch.randn_like(k)
    results = []
    for fn in (lambda *a: attn.attend(*a)[0], attn.reference):
        qi, ki, vi = (z.clone().requires_grad_() for z in (q, k, v))
        out = fn(qi, ki, vi, ctx)
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out).to(out))
        results.append((out.detach(), qi.grad, ki.grad, vi.grad))
    return results


@pytest.mark.parametrize("case,causal,n_mem,pad", SETTINGS,
                         ids=[f"{c}-{'causal' if ca else 'bidir'}-mem{m}-{'pad' if p else 'nopad'}"
                              for c, ca, m, p in SETTINGS])
def test_fast_path_equals_naive_reference(case, causal, n_mem, pad):
    cfg = config(variant(case), causal, **CASES[case])
    t = seq_len(case)
    layers = (0, 1) if "interleaved" in case or case == "longformer" else (0,)
    for layer in layers:
        attn = module(cfg, layer)
        fast, ref = run_both(attn, t, context(t, n_mem, causal, pad), layer_input=case in LAYER_LEVEL)
        assert torch.isfinite(fast[0]).all()
        for a, b in zip(fast, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # reference softmax is float32


@pytest.mark.parametrize("case,position", [("local", "alibi"), ("longformer", "xl"), ("strided-split", "shaw"),
                                           ("bigbird", "alibi")])
def test_score_positions_follow_the_reference(case, position):
    """Additive (ALiBi: float mask) and score-rewriting (XL, Shaw: dense path) positions."""
    cfg = config(variant(case), True, **CASES[case])
    cfg.position = position
    attn = module(cfg, 0, position)
    fast, ref = run_both(attn, 11, context(11, 4, True, True), layer_input=case in LAYER_LEVEL)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # reference softmax is float32


@pytest.mark.parametrize("case", ["etc", "longformer"])
def test_rotary_follows_the_reference_in_global_local_layers(case):
    """Rotary on the layers with a global stage: ETC's global tokens read the local keys before rotation (its fast
    path reuses the layer's projection for them), Longformer's global rows take the formed K_g path."""
    causal = case != "etc"
    cfg = config(case, causal, **CASES[case])
    cfg.position = "rope"
    attn = module(cfg, 0, "rope")
    fast, ref = run_both(attn, 11, context(11, 0, causal, True), layer_input=True)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # reference softmax is float32


def mask_of(case, t, causal, n_mem=0, layer=0, pad=False, **family):
    """Dense mask of CASES[case], or of variant ``case`` with ``family`` settings."""
    cfg = config(variant(case), causal, **(family or CASES[case]))
    attn = module(cfg, layer)
    ctx = context(t, n_mem, causal, pad)
    return dense_mask(attn.pattern(ctx, n_mem + t), ctx.q_index, ctx.k_index, H, causal, ctx.key_valid)


def keys(mask_row):
    return mask_row.nonzero().flatten().tolist()


def test_local_pattern_by_hand():
    hand = dict(local=dict(block_size=4, lookback=2))
    m = mask_of("local", 12, True, **hand)[0, 0]
    assert keys(m[5]) == [2, 3, 4, 5]                        # block 1 = [4, 8): lookback 2 -> from 2, causal
    assert keys(m[7]) == [2, 3, 4, 5, 6, 7]
    assert keys(m[8]) == [6, 7, 8]
    m = mask_of("local", 12, False, **hand)[0, 0]
    assert keys(m[5]) == [2, 3, 4, 5, 6, 7]                  # the whole memory block, no causal mask
    assert keys(m[0]) == [0, 1, 2, 3]


def test_local2d_pattern_by_hand():
    hand = dict(local=dict(grid=(4, 4), query_shape=(2, 2), memory_flange=(1, 1)))
    m = mask_of("local2d", 16, False, **hand)[0, 0]
    # query (2, 2) = 10: rectangle rows 2-3 cols 2-3; memory rows 1-3, cols 1-3 (col 4 is off the grid)
    assert keys(m[10]) == [r * 4 + c for r in (1, 2, 3) for c in (1, 2, 3)]
    assert not m[10, 2] and not m[10, 8] and m[10, 5]
    m = mask_of("local2d", 16, True, **hand)[0, 0]
    assert keys(m[10]) == [5, 6, 7, 9, 10]                   # raster order: nothing after 10
    assert keys(m[0]) == [0]


def test_strided_pattern_by_hand():
    m = mask_of("strided-split", 12, True)[0]
    assert keys(m[0, 7]) == [4, 5, 6, 7]                     # head 0: A1 = {max(0, i - l), ..., i}, l = 3
    assert keys(m[1, 7]) == [1, 4, 7]                        # head 1: A2 = {j : (i - j) mod l = 0}
    assert keys(m[2, 7]) == [4, 5, 6, 7] and keys(m[3, 7]) == [1, 4, 7]
    merged = mask_of("strided-merged", 12, False)[0, 0]
    assert keys(merged[5]) == [2, 3, 4, 5, 6, 7, 8, 11]
    layer1 = mask_of("strided-interleaved", 12, True, layer=1)[0, 0]
    assert keys(layer1[7]) == [1, 4, 7]                      # interleaved: odd layers use A2


def test_fixed_pattern_by_hand():
    m = mask_of("fixed-split", 12, True)[0]                  # l = 4, c = 1
    assert keys(m[0, 6]) == [4, 5, 6]                        # A1: own block, causal
    assert keys(m[1, 9]) == [3, 7, 9]                        # A2: last cell of each block (+ itself)
    assert keys(m[1, 1]) == [1]                              # before the first summary: only itself
    merged = mask_of("fixed-merged", 12, False)[0, 0]        # l = 4, c = 2
    assert keys(merged[1]) == [0, 1, 2, 3, 6, 7, 10, 11]


def test_blockwise_pattern_by_hand():
    m = mask_of("blockwise", 8, False, sparse=dict(n_blocks=2))[0]
    assert keys(m[0, 1]) == [0, 1, 2, 3]                     # head 0: identity permutation
    assert keys(m[1, 1]) == [4, 5, 6, 7]                     # head 1: blocks swapped
    assert keys(m[1, 6]) == [0, 1, 2, 3]
    m = mask_of("blockwise", 11, False)[0]                   # n = 3 over 11 keys: blocks of 4, 4, 3
    assert keys(m[0, 0]) == [0, 1, 2, 3] and keys(m[1, 0]) == [4, 5, 6, 7] and keys(m[2, 0]) == [8, 9, 10]
    assert keys(m[3, 0]) == [0, 1, 2, 3]                     # 4 heads, 3 shifts: head 3 = identity again
    seeded = mask_of("blockwise-seeded", 12, False)[0]       # random permutations: every key block used once
    for h in range(H):
        blocks = [keys(seeded[h, 3 * a])[0] // 3 for a in range(4)]
        assert sorted(blocks) == [0, 1, 2, 3]


def test_longformer_pattern_by_hand():
    hand = dict(global_local=dict(window=1, dilation=2, dilated_heads=1, global_positions=(0,)))
    m = mask_of("longformer", 10, False, **hand)[0]
    assert keys(m[0, 6]) == [0, 4, 6, 8]                     # dilated head: i +- 2, plus global 0
    assert keys(m[1, 6]) == [0, 5, 6, 7]                     # normal head: i +- 1, plus global 0
    assert keys(m[1, 0]) == list(range(10))                  # the global token attends everywhere
    m = mask_of("longformer", 10, True, n_mem=3, **hand)[0]  # globals count from the segment start
    assert keys(m[1, 0]) == [0, 1, 2, 3]                     # query 0 of the segment (index 3) is global
    assert keys(m[1, 5]) == [3, 7, 8]
    cfg = config("longformer", True, **CASES["longformer"])
    assert module(cfg, 0).window == 1 and module(cfg, 1).window == 3


def test_rows_replaced_linear_is_the_linear_of_the_patched_output():
    """Longformer's output projection with the global rows written in (no merged copy kept): the values of
    linear(merge_heads(out with rows replaced)) and gradcheck of every input, float64."""
    from rlformer.attention.base import merge_heads
    from rlformer.attention.global_local import _RowsReplacedLinear, rows_replaced_linear
    torch.manual_seed(0)
    out = torch.randn(2, 3, 7, 4, dtype=torch.float64, requires_grad=True)
    rows = torch.tensor([0, 3, 4])
    rows_out = torch.randn(2, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    linear = torch.nn.Linear(12, 12).double()
    want = linear(merge_heads(out.index_copy(2, rows, rows_out)))
    torch.testing.assert_close(rows_replaced_linear(out, rows, rows_out, linear), want)
    assert torch.autograd.gradcheck(lambda o, r, w, b: _RowsReplacedLinear.apply(o, rows, r, w, b),
                                    (out, rows_out, linear.weight, linear.bias))


def test_bigbird_pattern_by_hand():
    hand = dict(global_local=dict(block_size=2, window_blocks=1, n_random=1, global_positions=(), seed=7))
    m = mask_of("bigbird", 12, False, **hand)[0]
    attn = module(config("bigbird", False, **hand))
    for h in range(H):
        for a in range(6):
            rand = attn._random_block(h, a, 0, 6, False)
            blocks = sorted({a - 1, a, a + 1, rand} & set(range(6)))
            expected = [j for c in blocks for j in (2 * c, 2 * c + 1)]
            assert keys(m[h, 2 * a]) == expected == keys(m[h, 2 * a + 1])
    causal = mask_of("bigbird", 12, True, **hand)[0]
    for h in range(H):
        for a in range(1, 6):
            assert attn._random_block(h, a, 0, 6, True) < a  # causal random blocks precede the query block
        assert keys(causal[h, 1]) == [0, 1]
    assert any(not torch.equal(m[0], m[h]) for h in range(1, H))   # random blocks differ by head
    # the same seed and layer give the same pattern; another layer another one
    cfg = config("bigbird", False, **CASES["bigbird"])
    ctx = context(30, 0, False)
    d = [dense_mask(module(cfg, layer).pattern(ctx, 30), ctx.q_index, ctx.k_index, H, False, None)
         for layer in (0, 0, 1)]
    assert torch.equal(d[0], d[1]) and not torch.equal(d[0], d[2])


def test_etc_pattern_by_hand():
    cfg = config("etc", False, **CASES["etc"])
    attn = module(cfg)
    ctx = context(8, 0, False)
    k_index = torch.cat([torch.arange(-6, 0), ctx.k_index])             # keys [u (3); x_g (3, unused); local (8)]
    m = dense_mask(attn.pattern(ctx, 14), ctx.q_index, k_index, H, False, None)[0, 0]
    assert keys(m[4]) == [0, 1, 2, 6 + 2, 6 + 3, 6 + 4, 6 + 5, 6 + 6]   # l2g (3 globals) + l2l radius 2
    assert keys(m[0]) == [0, 1, 2, 6, 7, 8]


def full_attention(q, k, v, ctx):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.allowed())


@pytest.mark.parametrize("name,family,causal", [
    ("local", dict(local=dict(block_size=16, lookback=0)), True),
    ("local", dict(local=dict(block_size=3, lookback=32)), True),
    ("local", dict(local=dict(block_size=32, lookback=0)), False),
    ("strided", dict(sparse=dict(stride=16, mode="merged")), True),
    ("strided", dict(sparse=dict(stride=16, mode="merged")), False),
    ("fixed", dict(sparse=dict(stride=16, summary=1, mode="merged")), True),
    ("fixed", dict(sparse=dict(stride=16, summary=3, mode="merged")), False),
    ("blockwise", dict(sparse=dict(n_blocks=1)), False),
    ("longformer", dict(global_local=dict(window=16, dilation=1, global_positions=())), True),
    ("longformer", dict(global_local=dict(window=0, global_positions=tuple(range(16)))), False),
    ("bigbird", dict(global_local=dict(block_size=4, window_blocks=4, n_random=0)), True),
    ("bigbird", dict(global_local=dict(block_size=16, window_blocks=0, n_random=1)), False),
])
def test_degenerate_settings_are_full_attention(name, family, causal):
    cfg = config(name, causal, **family)
    attn = module(cfg)
    for n_mem, pad in ((0, False), (4, True)):
        t = 16 - n_mem
        ctx = context(t, n_mem, causal, pad)
        torch.manual_seed(2)
        q = torch.randn(2, H, t, D // H, dtype=torch.float64)
        k, v = (torch.randn(2, H, 16, D // H, dtype=torch.float64) for _ in range(2))
        torch.testing.assert_close(attn.attend(q, k, v, ctx)[0], full_attention(q, k, v, ctx))


def extra_keys(case, cfg) -> int:
    """Keys before the sequence in the attention's key tensor: ETC's [u; x_g] rows (2 n_g), none elsewhere."""
    return 2 * cfg.global_local.n_global_tokens if case == "etc" else 0


@pytest.mark.parametrize("case", list(CASES))
def test_flex_mask_mod_is_the_dense_mask(case):
    """The mask_mod FlexAttention compiles into a BlockMask, evaluated densely (vmap) on CPU."""
    from torch.nn.attention.flex_attention import create_mask
    causal = lookup("attention", variant(case)).supports_causal
    n_mem = 5 if lookup("attention", variant(case)).supports_memory else 0
    t = seq_len(case)
    cfg = config(variant(case), causal, **CASES[case])
    attn = module(cfg, 1)
    ctx = context(t, n_mem, causal, pad=True)
    n_extra = extra_keys(case, cfg)
    k_index = torch.cat([torch.arange(-n_extra, 0), ctx.k_index])
    valid = torch.cat([torch.ones(2, n_extra, dtype=torch.bool), ctx.key_valid], 1)
    pattern = attn.pattern(ctx, n_extra + n_mem + t)
    dense = dense_mask(pattern, ctx.q_index, k_index, H, causal, valid)
    mod = flex_mask_mod(pattern, n_mem, n_extra, causal, valid, torch.device("cpu"))
    flex = create_mask(mod, 2, H, t, n_extra + n_mem + t, device="cpu")
    if pattern.key_order is not None:                        # Flex sees the keys in this order
        assert sorted(pattern.key_order.tolist()) == list(range(k_index.shape[0]))
        dense = dense[..., pattern.key_order]
    if pattern.query_order is not None:                      # and the queries in this one
        assert sorted(pattern.query_order.tolist()) == list(range(t))
        dense = dense[..., pattern.query_order, :]
    assert torch.equal(flex, dense.expand_as(flex))
    assert dense.sum() < dense.numel()                       # it is a real restriction


# ops whose Triton lowering inside a FlexAttention kernel is known to break or is avoidable: the old
# in-kernel BigBird hash (int64 casts, multiply, xor, shift, tensor modulo) failed to compile on CUDA
FORBIDDEN_IN_MASK_MODS = ("_to_copy", "bitwise_xor", "rshift", "lshift", "remainder.Tensor", "clamp")


@pytest.mark.parametrize("case", [c for c in CASES if c != "local2d"])
def test_mask_mods_use_only_simple_integer_ops(case):
    """Trace each mask_mod as Flex calls it (int32 indices) and check it holds no hash arithmetic:
    BigBird's random blocks come from a precomputed int32 table that the mask_mod only indexes."""
    from torch.fx.experimental.proxy_tensor import make_fx
    cls = lookup("attention", variant(case))
    causal = cls.supports_causal
    attn = module(config(variant(case), causal, **CASES[case]), 1)
    ctx = context(11, 0, causal, pad=True)
    pattern = attn.pattern(ctx, 11)
    if case == "bigbird":
        rand = attn.random_blocks(4, True)
        assert torch.equal(pattern.tables["rand"], rand.permute(2, 0, 1))
        assert rand.dtype == torch.int32 and rand.shape == (H, 4, 2)
        for h in range(H):                                     # the table is the hash the reference uses
            assert rand[h, 0].tolist() == [-1, -1]             # causal query block 0: no earlier block
            for a in range(1, 4):
                assert rand[h, a].tolist() == [attn._random_block(h, a, t, 4, True) for t in range(2)]
    mod = flex_mask_mod(pattern, 0, 0, causal, ctx.key_valid, torch.device("cpu"))
    z = torch.zeros(1, dtype=torch.int32)
    graph = make_fx(mod)(z, z, z, z).graph
    ops = {str(n.target) for n in graph.nodes if n.op == "call_function"}
    assert "aten.index.Tensor" in ops                          # key validity lookup (and BigBird's table)
    assert not [op for op in ops if any(bad in op for bad in FORBIDDEN_IN_MASK_MODS)], ops


@pytest.mark.parametrize("bad,match", [
    (dict(attention="blockwise", causal=True), "cannot be causal"),
    (dict(attention="etc", causal=True), "cannot be causal"),
    (dict(attention="local", local=rlformer.LocalConfig(block_size=0)), "block_size >= 1"),
    (dict(attention="local2d", local=rlformer.LocalConfig(grid=(3, 0))), "local.grid"),
    (dict(attention="local2d", local=rlformer.LocalConfig(query_shape=(0, 2))), "query_shape"),
    (dict(attention="local2d", memory="xl"), "memory='xl'"),
    (dict(attention="fixed", sparse=rlformer.SparseConfig(stride=4, summary=5)), "summary"),
    (dict(attention="strided", n_heads=1, d_model=8, sparse=rlformer.SparseConfig(mode="split")), "n_heads >= 2"),
    (dict(attention="strided", n_layers=1, sparse=rlformer.SparseConfig(mode="interleaved")), "n_layers >= 2"),
    (dict(attention="strided", sparse=rlformer.SparseConfig(stride=0)), "stride >= 1"),
    (dict(attention="longformer", global_local=rlformer.GlobalLocalConfig(layer_windows=(4,))), "one window"),
    (dict(attention="longformer", global_local=rlformer.GlobalLocalConfig(dilated_heads=9)), "dilated_heads"),
    (dict(attention="longformer", global_local=rlformer.GlobalLocalConfig(global_positions=(-1,))), "global_positions"),
    (dict(attention="bigbird", global_local=rlformer.GlobalLocalConfig(block_size=0)), "block_size >= 1"),
    (dict(attention="etc", causal=False, position="alibi"), "hook"),
    (dict(attention="etc", causal=False, global_local=rlformer.GlobalLocalConfig(n_global_tokens=0)), "n_global_tokens"),
])
def test_invalid_settings_raise_at_build(bad, match):
    kw = dict(d_model=16, n_heads=4, n_layers=2, position="none", causal=False)
    cfg = rlformer.EncoderConfig(**{**kw, **bad})
    with pytest.raises(ValueError, match=match):
        rlformer.build_encoder(cfg)


def test_local2d_grid_mismatch_raises_in_forward():
    cfg = config("local2d", True, local=dict(grid=(4, 4), query_shape=(2, 2)))
    enc = rlformer.build_encoder(cfg)
    enc(torch.randn(1, 16, D))
    with pytest.raises(ValueError, match="local.grid=\\(4, 4\\)"):
        enc(torch.randn(1, 15, D))
    square = rlformer.build_encoder(config("local2d", False, local=dict(grid=(0, 0), query_shape=(2, 2))))
    assert square(torch.randn(1, 9, D)).output.shape == (1, 9, D)
    with pytest.raises(ValueError, match="perfect square"):
        square(torch.randn(1, 10, D))


def test_blockwise_needs_enough_keys():
    attn = module(config("blockwise", False, sparse=dict(n_blocks=4)))
    q = torch.randn(1, H, 3, D // H, dtype=torch.float64)
    with pytest.raises(ValueError, match="n_blocks=4"):
        attn.attend(q, q, q, context(3, 0, False, b=1))


@pytest.mark.parametrize("case", list(CASES))
def test_encoder_with_xl_memory_runs_in_segments(case):
    """Through the encoder: XL memory, padding, several segments, finite outputs and gradients."""
    cls = lookup("attention", variant(case))
    causal = cls.supports_causal
    cfg = config(variant(case), causal, **CASES[case])
    if cls.supports_memory:
        cfg.memory, cfg.mem_len = "xl", 6
    torch.manual_seed(0)
    enc = rlformer.build_encoder(cfg)
    t = seq_len(case)
    state = None
    for _ in range(2):
        x = torch.randn(2, t, D, requires_grad=True)
        mask = torch.ones(2, t, dtype=torch.bool)
        mask[1, :3] = False
        out = enc(x, state=state, mask=mask)
        out.output.square().mean().backward()
        assert torch.isfinite(out.output).all() and torch.isfinite(x.grad).all()
        state = out.state


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention fast path needs CUDA")
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("pad", [False, True])
def test_flex_equals_dense_on_cuda(case, pad):
    cls = lookup("attention", variant(case))
    causal = cls.supports_causal
    n_mem = 37 if cls.supports_memory else 0
    t = 15 * 9 if variant(case) == "local2d" else 200
    fam = dict(CASES[case])
    if variant(case) == "local2d":
        fam = dict(local=dict(grid=(15, 9), query_shape=(4, 4), memory_flange=(2, 3)))
    cfg = config(variant(case), causal, d_model=4 * 16, **fam)          # d_head 16: Triton's smallest tile
    position = "alibi" if pad and case != "etc" else None               # ALiBi through Flex's score_mod
    cfg.position = position or "none"
    attn = module(cfg, 1, position, dtype=torch.float32).cuda()
    assert isinstance(attn, PatternAttention)
    assert attn.use_flex(torch.zeros(1, device="cuda"))                  # the real dispatch picks Flex
    ctx = context(t, n_mem, causal, pad)
    ctx = dataclasses.replace(ctx, q_index=ctx.q_index.cuda(), k_index=ctx.k_index.cuda(), q_pos=ctx.q_pos.cuda(),
                              key_valid=None if ctx.key_valid is None else ctx.key_valid.cuda())
    torch.manual_seed(0)
    x = torch.randn(2, n_mem + t, cfg.d_model, device="cuda")
    outs, grads = [], []
    for flex in (True, False):
        attn.use_flex = (lambda q, flex=flex: flex)
        xi = x.clone().requires_grad_()
        out = attn(xi[:, n_mem:], xi, ctx)[0]
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append(xi.grad)
    torch.testing.assert_close(outs[0], outs[1], rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(grads[0], grads[1], rtol=5e-3, atol=5e-3)


def eager_flex(monkeypatch):
    """Run the Flex path uncompiled (CPU: forward only)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    import rlformer.attention.flex as fx
    monkeypatch.setitem(fx._COMPILED, "flex", flex_attention)
    monkeypatch.setitem(fx._COMPILED, "create_block_mask", lambda *a, _compile=False, **k: create_block_mask(*a, **k))


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("case", list(CASES))
def test_flex_path_forward_matches_dense_on_cpu(case, monkeypatch):
    """The whole Flex path (BlockMask from the pattern, block sparsity, ALiBi score_mod) run eagerly on
    CPU, forward only (FlexAttention has no CPU backward), against the dense SDPA path."""
    eager_flex(monkeypatch)
    cls = lookup("attention", variant(case))
    causal = cls.supports_causal
    n_mem = 9 if cls.supports_memory else 0
    fam, t = dict(CASES[case]), 130
    if variant(case) == "local2d":
        fam, t = dict(local=dict(grid=(15, 9), query_shape=(4, 4), memory_flange=(2, 3))), 135
    position = None if case == "etc" else "alibi"
    cfg = config(variant(case), causal, **fam)
    cfg.position = position or "none"
    attn = module(cfg, 1, position, dtype=torch.float32).eval()
    for pad in (True,) if case.endswith(("merged", "split", "seeded")) else (False, True):
        ctx = context(t, n_mem, causal, pad)
        x = torch.randn(2, n_mem + t, D)
        outs = []
        for flex in (True, False):
            attn.use_flex = (lambda q, flex=flex: flex)
            with torch.no_grad():
                outs.append(attn(x[:, n_mem:], x, ctx)[0])
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["local2d", "fixed-merged", "fixed-split"])
def test_flex_path_permutations_give_dense_gradients(case, monkeypatch):
    """Patterns whose Flex path permutes positions (local2d: queries and keys in rectangle order; fixed:
    summary keys first): outputs and input / parameter gradients of the Flex path equal the dense path's, with
    a differentiable dense stand-in for the kernel (``flex_stand_in``), so the permutations' backward passes
    (``flex.permute_positions``: gathers with the inverse permutation) are checked on CPU, float64."""
    from flex_stand_in import dense_flex
    eager_flex(monkeypatch)
    import rlformer.attention.flex as fx
    monkeypatch.setitem(fx._COMPILED, "flex", dense_flex)
    fam, t = dict(CASES[case]), 130
    if case == "local2d":
        fam, t = dict(local=dict(grid=(15, 9), query_shape=(4, 4), memory_flange=(2, 3))), 135
    cls = lookup("attention", variant(case))
    cfg = config(variant(case), cls.supports_causal, **fam)
    attn = module(cfg, 1, None, dtype=torch.float64).eval()
    ctx = context(t, 0, cls.supports_causal, False)
    x0 = torch.randn(2, t, D, dtype=torch.float64)
    results = []
    for flex in (True, False):
        attn.use_flex = (lambda q, flex=flex: flex)
        attn.zero_grad()
        x = x0.clone().requires_grad_()
        out = attn(x, x, ctx)[0]
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        results.append((out.detach(), x.grad, attn.q_proj.weight.grad.clone()))
    for name, a, b in zip(("out", "dx", "dWq"), *results):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention fast path needs CUDA")
@pytest.mark.parametrize("name,family", [("local", dict(local=dict(block_size=128, lookback=128))),
                                         ("bigbird", dict(global_local=dict(block_size=64, n_random=2))),
                                         ("strided", dict(sparse=dict(stride=128, mode="split"))),
                                         ("fixed", dict(sparse=dict(stride=128, summary=8, mode="merged")))])
def test_flex_path_has_no_quadratic_memory(name, family):
    """T = 32768: a dense bool mask alone would be 1 GiB per head; the Flex step stays far below."""
    t = 32768
    cfg = config(name, True, d_model=64, **family)
    attn = module(cfg, 0, dtype=torch.bfloat16).cuda()
    x = torch.randn(1, t, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    index = torch.arange(t, device="cuda")
    ctx = AttentionContext(causal=True, q_index=index, k_index=index, q_pos=index[None])
    attn(x, x, ctx)[0].sum().backward()                                  # compile and cache the BlockMask
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    attn(x, x, ctx)[0].sum().backward()
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < 256 * 2 ** 20


# ------------------------------------------------------------------ Sparse Transformer fast paths

@pytest.mark.parametrize("stride", [1, 4, 7, 20])
@pytest.mark.parametrize("causal", [True, False])
def test_column_attention_equals_naive_reference(stride, causal):
    """strided A^(2) as attention inside the stride columns (reshape, one SDPA call) == the loop-built
    mask + dense attention, outputs and gradients: strides dividing N or not, longer than N, XL memory,
    padding and empty memory slots."""
    from rlformer.attention.masks import loop_mask
    from rlformer.attention.reference import dense_attention
    from rlformer.attention.sparse import column_attention
    for t, n_mem, pad in ((13, 0, False), (12, 8, False), (13, 5, True), (16, 4, True)):
        ctx = context(t, n_mem, causal, pad)
        mask = loop_mask(lambda h, i, j: (i - j) % stride == 0, ctx.q_index, ctx.k_index, 1, causal, ctx.key_valid)
        torch.manual_seed(t + n_mem)
        q = torch.randn(2, 3, t, 5, dtype=torch.float64)
        k, v = (torch.randn(2, 3, n_mem + t, 5, dtype=torch.float64) for _ in range(2))
        results = []
        for fn in (lambda q, k, v: column_attention(q, k, v, stride, causal, ctx.key_valid, 0.3),
                   lambda q, k, v: dense_attention(q, k, v, mask, 0.3)):
            qi, ki, vi = (z.clone().requires_grad_() for z in (q, k, v))
            out = fn(qi, ki, vi)
            out.backward(torch.linspace(-1, 1, out.numel()).view_as(out).to(out))
            results.append((out.detach(), qi.grad, ki.grad, vi.grad))
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # reference softmax is float32


@pytest.mark.parametrize("mode", ["split", "interleaved"])
def test_strided_fast_path_runs_columns_and_band(mode, monkeypatch):
    """split / interleaved strided: A^(2) heads (layers) go through column_attention, the A^(1) heads
    (layers) through the pattern path with the band alone; merged and score positions do not."""
    import rlformer.attention.sparse as sp
    calls = {"columns": [], "patterns": []}
    columns, attend_pattern = sp.column_attention, PatternAttention.attend_pattern

    def spy_columns(q, *a, **kw):
        calls["columns"].append(q.shape[1])
        return columns(q, *a, **kw)

    def spy_pattern(self, q, k, v, ctx, pattern, *a, **kw):
        calls["patterns"].append((q.shape[1], pattern.key[-1]))
        return attend_pattern(self, q, k, v, ctx, pattern, *a, **kw)

    monkeypatch.setattr(sp, "column_attention", spy_columns)
    monkeypatch.setattr(PatternAttention, "attend_pattern", spy_pattern)
    cfg = config("strided", True, sparse=dict(stride=3, mode=mode))
    ctx = context(11, 5, True, True)
    q = torch.randn(2, H, 11, D // H, dtype=torch.float64)
    k = v = torch.randn(2, H, 16, D // H, dtype=torch.float64)
    for layer in (0, 1):
        module(cfg, layer).attend(q, k, v, ctx)
    if mode == "split":
        assert calls == {"columns": [H // 2] * 2, "patterns": [(H // 2, "A1")] * 2}
    else:
        assert calls == {"columns": [H], "patterns": [(H, "A1")]}
    calls["columns"].clear()
    module(config("strided", True, sparse=dict(stride=3, mode="merged"))).attend(q, k, v, ctx)
    cfg = config("strided", True, sparse=dict(stride=3, mode=mode))
    cfg.position = "alibi"
    module(cfg, 1, "alibi").attend(q, k, v, ctx)
    assert calls["columns"] == []


def block_mask_sparsity(attn, t, causal):
    """Percentage of (128 x 128) blocks FlexAttention skips for this layer's pattern at length t."""
    from torch.nn.attention.flex_attention import create_block_mask
    ctx = context(t, 0, causal, b=1)
    pattern = attn.pattern(ctx, t)
    mod = flex_mask_mod(pattern, 0, 0, causal, None, torch.device("cpu"))
    return create_block_mask(mod, None, H if pattern.per_head else None, t, t, device="cpu").sparsity()


@pytest.mark.parametrize("mode,causal", [("split", True), ("merged", True), ("merged", False),
                                         ("interleaved", True)])
def test_fixed_summary_first_order_makes_the_block_mask_sparse(mode, causal):
    """In sequence order the summary columns touch every key block (as dense as causal full attention);
    with the summary keys gathered first, Flex skips nearly all blocks (T = 2048, l = 128, c = 8:
    16 query blocks, own block + 1 summary block each)."""
    import dataclasses as dc
    attn = module(config("fixed", causal, sparse=dict(stride=128, summary=8, mode=mode)), 1)
    t = 2048
    order = attn.summary_first(t)
    assert order[:128].tolist() == [x for x in range(t) if x % 128 >= 120]
    assert sorted(order.tolist()) == list(range(t))
    permuted = block_mask_sparsity(attn, t, causal)
    natural_pattern = attn.pattern
    attn.pattern = lambda ctx, tk: dc.replace(natural_pattern(ctx, tk), key_order=None)
    natural = block_mask_sparsity(attn, t, causal)
    dense = 50 if causal else 1                              # causal full attention skips < 50 %
    if mode == "split":                                      # half the heads: A^(1), block-diagonal anyway
        dense = (dense + 15 / 16 * 100) / 2
    assert natural < dense and permuted > 80, (natural, permuted)
    interleaved_a1 = module(config("fixed", causal, sparse=dict(stride=128, summary=8, mode=mode)), 0)
    if mode == "interleaved":                                # A^(1) alone: block-diagonal as it is
        assert interleaved_a1.pattern(context(t, 0, causal, b=1), t).key_order is None


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("case,causal", [("strided-split", True), ("strided-split", False),
                                         ("strided-interleaved", True), ("fixed-split", True),
                                         ("fixed-merged", False), ("fixed-interleaved", True)])
def test_factorized_fast_paths_forward_with_flex_on_cpu(case, causal, monkeypatch):
    """The CUDA dispatch (Flex for the band / the summary-first keys, columns for A^(2)), run with eager
    Flex on CPU, forward only, == the CPU path (dense mask, itself == the naive reference above);
    XL memory and padding."""
    eager_flex(monkeypatch)
    cfg = config(variant(case), causal, **CASES[case])
    for layer in (0, 1):
        attn = module(cfg, layer, dtype=torch.float32).eval()
        for pad in (False, True):
            ctx = context(130, 9, causal, pad)
            torch.manual_seed(layer)
            q = torch.randn(2, H, 130, D // H)
            k, v = (torch.randn(2, H, 139, D // H) for _ in range(2))
            outs = []
            for flex in (True, False):
                attn.use_flex = (lambda q, flex=flex: flex)
                outs.append(attn.attend(q, k, v, ctx)[0])
            torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_strided_split_with_odd_head_count(causal):
    """3 heads: heads 0, 2 use A^(1), head 1 A^(2); the fast path puts them back in order."""
    cfg = config("strided", causal, d_model=24, sparse=dict(stride=3, mode="split"))
    cfg.n_heads = 3
    attn = module(cfg)
    ctx = context(10, 4, causal, True)
    torch.manual_seed(3)
    q = torch.randn(2, 3, 10, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 3, 14, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    fast, ref = attn.attend(q, k, v, ctx)[0], attn.reference(q, k, v, ctx)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)
    grads = [torch.autograd.grad(out.square().sum(), (q, k, v)) for out in (fast, ref)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore")
def test_compiled_block_masks_on_cpu():
    """The production BlockMask builder (torch.compile'd create_block_mask, as on CUDA) traces BigBird's
    random-block table, fixed's summary-first key order and a plain pattern one after another (different
    integer constants, each its own compile), and its blocks are those of the dense mask."""
    from rlformer.attention.flex import block_mask_for
    for case in ("bigbird", "fixed-split", "local"):
        attn = module(config(variant(case), True, **CASES[case]), 1)
        ctx = context(200, 5, True, pad=True)
        pattern = attn.pattern(ctx, 205)
        bm = block_mask_for(pattern, 2, H, 200, 205, 5, 0, True, ctx.key_valid, torch.device("cpu"))
        dense = dense_mask(pattern, ctx.q_index, ctx.k_index, H, True, ctx.key_valid)
        if pattern.key_order is not None:
            dense = dense[..., pattern.key_order]
        dense = F.pad(dense, (0, 256 - 205, 0, 256 - 200)).expand(2, H, 256, 256)
        blocks = dense.unflatten(2, (2, 128)).unflatten(4, (2, 128)).any(-1).any(-2)
        assert torch.equal(bm.to_dense().bool().expand_as(blocks), blocks), case


def test_local2d_rectangle_order_makes_the_block_mask_sparse():
    """A 128 x 128 image, 16 x 16 rectangles with 16-cell flanges (the benchmark's local2d), causal: in raster
    order a 128-query block (one image row) touches ~32 key blocks, none of them whole; in rectangle order
    (``tile_order``) a block is half a rectangle and needs at most the 6 rectangles around it (12 key blocks),
    the 3 above it whole. Same pairs either way (test_flex_mask_mod_is_the_dense_mask)."""
    import dataclasses as dc

    from rlformer.attention.flex import evaluated_block_mask
    from rlformer.attention.local import tile_order
    t = 128 * 128
    attn = module(config("local2d", True, local=dict(grid=(128, 128), query_shape=(16, 16),
                                                      memory_flange=(16, 16))), 1)
    ctx = context(t, 0, True, b=1)
    order = attn.pattern(ctx, t).query_order
    assert torch.equal(order, tile_order(128, 128, 16, 16))
    assert order[:20].tolist() == list(range(16)) + [128, 129, 130, 131]
    counts = {}
    for name, strip in (("tiles", lambda p: p), ("raster", lambda p: dc.replace(p, key_order=None, query_order=None))):
        pattern = strip(attn.pattern(ctx, t))
        mod = flex_mask_mod(pattern, 0, 0, True, None, torch.device("cpu"))
        partial, full = block_sets(evaluated_block_mask(mod, None, t, t, torch.device("cpu")))
        counts[name] = (partial.sum(-1).max().item(), full.sum(-1).max().item())
    assert counts["tiles"][0] + counts["tiles"][1] <= 12 and counts["tiles"][1] >= 6, counts
    assert counts["raster"][0] >= 24 and counts["raster"][1] == 0, counts


def block_sets(bm) -> tuple[torch.Tensor, torch.Tensor]:
    """(partial, full) bool (B, H, NQ, NK) block tables of a BlockMask, from its count / index tables."""
    out = []
    for count, index in ((bm.kv_num_blocks, bm.kv_indices), (bm.full_kv_num_blocks, bm.full_kv_indices)):
        nk = index.shape[-1]
        chosen = torch.arange(nk) < count[..., None]
        table = torch.zeros(*index.shape, dtype=torch.bool)
        table.scatter_(-1, index.long(), chosen)
        out.append(table)
    return out[0], out[1]


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("case", list(CASES))
def test_evaluated_block_mask_equals_create_block_mask(case):
    """The cached BlockMask builder (the mask_mod evaluated eagerly band by band, no compile) gives the same
    partial and full blocks as torch's create_block_mask, for every pattern, with XL memory, extra global keys,
    lengths that are not multiples of the block, and bands of one query block (a tiny evaluation budget)."""
    from torch.nn.attention.flex_attention import create_block_mask

    from rlformer.attention.flex import evaluated_block_mask
    cls = lookup("attention", variant(case))
    causal = cls.supports_causal
    n_mem = 37 if cls.supports_memory else 0
    fam, t = dict(CASES[case]), 300
    if variant(case) == "local2d":
        fam, t = dict(local=dict(grid=(20, 15), query_shape=(4, 4), memory_flange=(2, 3))), 300
    cfg = config(variant(case), causal, **fam)
    attn = module(cfg, 1)
    ctx = context(t, n_mem, causal, b=1)
    n_extra = extra_keys(case, cfg)
    tk = n_extra + n_mem + t
    pattern = attn.pattern(ctx, tk)
    mod = flex_mask_mod(pattern, n_mem, n_extra, causal, None, torch.device("cpu"))
    heads = H if pattern.per_head else None
    want = block_sets(create_block_mask(mod, None, heads, t, tk, device="cpu"))
    for budget in (1, 1 << 25):
        got = block_sets(evaluated_block_mask(mod, heads, t, tk, torch.device("cpu"), budget=budget))
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (case, budget)
    assert want[0].any() or want[1].any()

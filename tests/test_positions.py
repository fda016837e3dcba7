"""Reference tests: full attention's fast path against the dense reference, and every position
encoding against an explicit-loop implementation of its paper's formula."""
from __future__ import annotations

import math

import pytest
import torch

from rlformer.attention.full import FullAttention
from rlformer.attention.reference import dense_attention
from rlformer.context import AttentionContext
from rlformer.registry import available, lookup
from variants import base_config

torch.set_num_threads(1)
torch.manual_seed(0)

B, H, DH, T, M = 2, 4, 8, 6, 3            # batch, heads, head dim, queries, memory slots
D = H * DH
F64 = torch.float64


def cfg(**kw):
    return base_config(d_model=D, n_heads=H, **kw)


def make_position(name, **kw):
    return lookup("position", name)(cfg(position=name, **kw)).double()


def qkv(tq=T, tk=T + M, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, n, DH, dtype=F64, generator=g).requires_grad_(True) for n in (tq, tk, tk)]


def context(causal: bool, n_mem: int, padding: bool, tq: int = T) -> AttentionContext:
    index = torch.arange(n_mem + tq)
    valid = None
    if padding:                                   # row 1: two empty memory slots / padded tokens
        valid = torch.ones(B, n_mem + tq, dtype=torch.bool)
        valid[1, :2] = False
    return AttentionContext(causal=causal, q_index=index[n_mem:], k_index=index,
                            q_pos=torch.arange(tq).expand(B, tq), key_valid=valid)


def grads(out, tensors, seed=1):
    w = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad((out * w).sum(), tensors, retain_graph=True)


# dense_attention (and full's dense path) take the softmax in float32 even for float64 inputs,
# so comparisons with it hold to ~1e-7, not to float64 precision.
SOFTMAX_ATOL = 1e-6


def assert_same(out_a, out_b, params, atol=SOFTMAX_ATOL, rtol=1e-5):
    torch.testing.assert_close(out_a, out_b, rtol=rtol, atol=atol)
    for ga, gb in zip(grads(out_a, params), grads(out_b, params)):
        torch.testing.assert_close(ga, gb, rtol=rtol, atol=atol)


def loop_attention(q, k, v, ctx: AttentionContext, score_fn, value_fn=None):
    """softmax_j(score_fn(b, h, i, j)) over allowed keys, then sum_j a_ij (v_j + value_fn(h, i, j)).

    Masking follows ctx: causal keys k_index <= q_index, invalid keys hidden except a query's own.
    """
    b_, h_, tq, _ = q.shape
    rows = []
    for b in range(b_):
        heads = []
        for h in range(h_):
            outs = []
            for i in range(tq):
                qi = int(ctx.q_index[i])
                scores, vals = [], []
                for j in range(k.shape[2]):
                    kj = int(ctx.k_index[j])
                    if ctx.causal and kj > qi:
                        continue
                    if ctx.key_valid is not None and not bool(ctx.key_valid[b, j]) and kj != qi:
                        continue
                    scores.append(score_fn(b, h, i, j))
                    vals.append(v[b, h, j] + (value_fn(h, i, j) if value_fn is not None else 0))
                alpha = torch.softmax(torch.stack(scores), 0)
                outs.append((alpha[:, None] * torch.stack(vals)).sum(0))
            heads.append(torch.stack(outs))
        rows.append(torch.stack(heads))
    return torch.stack(rows)


# ----------------------------------------------------------------- full attention fast path


@pytest.mark.parametrize("position", [None, "alibi"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("n_mem", [0, M], ids=["nomem", "mem"])
@pytest.mark.parametrize("padding", [False, True], ids=["dense", "padded"])
def test_full_sdpa_equals_dense_reference(position, causal, n_mem, padding):
    """full's SDPA paths (is_causal, bool mask, float ALiBi mask) == dense_attention: outputs and grads."""
    pos = make_position(position) if position else None
    att = FullAttention(cfg(), 0, pos).double().eval()
    ctx = context(causal, n_mem, padding)
    q, k, v = qkv(tk=T + n_mem)
    fast, _ = att.attend(q, k, v, ctx)
    ref = dense_attention(q, k, v, ctx.allowed(), att.scale, pos, ctx.q_index, ctx.k_index)
    assert_same(fast, ref, (q, k, v))
    # SDPA runs in float64 throughout: it matches the explicit float64 loop to rounding
    bias = (lambda h, i, j: 0.0) if pos is None else (lambda h, i, j: pos.bias(ctx.q_index, ctx.k_index)[h, i, j])
    loop = loop_attention(q, k, v, ctx, lambda b, h, i, j: q[b, h, i] @ k[b, h, j] * att.scale + bias(h, i, j))
    assert_same(fast, loop, (q, k, v), atol=1e-12, rtol=0)


# ----------------------------------------------------------------- score-based positions


def run_position(name, causal, params, **kw):
    """Position ``name`` with its ``params`` drawn from N(0, 1) (not the tiny init, so every term
    matters), run as the encoder runs it: full attention's attend on random q, k, v with memory
    and padding. Returns (pos, ctx, (q, k, v), out, scale)."""
    pos = make_position(name, **kw)
    with torch.no_grad():
        for p in params:
            getattr(pos, p).normal_()
    ctx = context(causal, M, padding=True)
    q, k, v = qkv()
    att = FullAttention(cfg(), 0, pos).double()
    return pos, ctx, (q, k, v), att.attend(q, k, v, ctx)[0], att.scale


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_shaw_equals_eqs_3_to_5(causal):
    """e_ij = q_i (k_j + a^K_ij)^T / sqrt(d); z_i = sum_j a_ij (v_j + a^V_ij); a_ij = w[clip(j - i, k)]."""
    clip = 2
    pos, ctx, (q, k, v), out, scale = run_position("shaw", causal, ("w_k", "w_v"), shaw_clip=clip)

    def rel(i, j):
        return max(-clip, min(clip, int(ctx.k_index[j]) - int(ctx.q_index[i]))) + clip

    loop = loop_attention(q, k, v, ctx, lambda b, h, i, j: q[b, h, i] @ (k[b, h, j] + pos.w_k[rel(i, j)]) * scale,
                          lambda h, i, j: pos.w_v[rel(i, j)])
    assert_same(out, loop, (q, k, v, pos.w_k, pos.w_v))
    assert pos.w_k.shape == (2 * clip + 1, DH)        # 2k + 1 relative vectors, shared by the heads


def sinusoid_loop(p: int, d: int) -> torch.Tensor:
    """Vaswani et al. 2017, sec. 3.5: PE(p, 2i) = sin(p / 10000^(2i/d)), PE(p, 2i+1) = cos(p / 10000^(2i/d))."""
    return torch.tensor([math.sin(p / 10000 ** (2 * (c // 2) / d)) if c % 2 == 0 else
                         math.cos(p / 10000 ** (2 * (c // 2) / d)) for c in range(d)], dtype=F64)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_xl_equals_the_four_terms(causal):
    """A_ij = q_i^T k_j + q_i^T W_kR R_{i-j} + u^T k_j + v^T W_kR R_{i-j} (Dai et al. 2019, sec. 3.3)."""
    pos, ctx, (q, k, v), out, scale = run_position("xl", causal, ("u", "v"))
    w = pos.w_kr.weight                                                  # (D, D): W_kR R = w @ R
    rk = {}

    def wkr_r(h, i, j):                                                  # W_kR R_{i-j}, head h
        dist = int(ctx.q_index[i]) - int(ctx.k_index[j])
        if dist not in rk:
            rk[dist] = (w @ sinusoid_loop(dist, D)).view(H, DH)
        return rk[dist][h]

    def score(b, h, i, j):
        a = q[b, h, i] @ k[b, h, j]                                      # (a) content
        bb = q[b, h, i] @ wkr_r(h, i, j)                                 # (b) content-dependent position
        c = pos.u[h] @ k[b, h, j]                                        # (c) global content bias
        d = pos.v[h] @ wkr_r(h, i, j)                                    # (d) global position bias
        return (a + bb + c + d) * scale

    loop = loop_attention(q, k, v, ctx, score)
    assert_same(out, loop, (q, k, v, pos.u, pos.v, w))               # R, too, is computed in float32


@pytest.mark.parametrize("n_heads,expected", [(8, [2.0 ** -e for e in range(1, 9)]),
                                              (4, [2.0 ** -e for e in (2, 4, 6, 8)])])
def test_alibi_slopes(n_heads, expected):
    """m_h = 2^(-8h/n), h = 1..n (Press et al. 2022: for 8 heads 1/2, 1/4, ..., 1/256)."""
    pos = lookup("position", "alibi")(base_config(d_model=8 * n_heads, n_heads=n_heads, position="alibi"))
    torch.testing.assert_close(pos.slopes.double(), torch.tensor(expected, dtype=F64), rtol=0, atol=0)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_alibi_equals_linear_bias(causal):
    """score_ij = q_i k_j / sqrt(d) - m_h |i - j|, through full attention's SDPA float-mask path."""
    pos = make_position("alibi")
    ctx = context(causal, M, padding=True)
    q, k, v = qkv()
    att = FullAttention(cfg(), 0, pos).double()
    out = att.attend(q, k, v, ctx)[0]                                    # SDPA, float64 throughout
    slopes = [2.0 ** (-8.0 * h / H) for h in range(1, H + 1)]
    bias = pos.bias(ctx.q_index, ctx.k_index)
    for h in range(H):
        for i in range(T):
            for j in range(T + M):
                assert float(bias[h, i, j]) == -slopes[h] * abs(int(ctx.q_index[i]) - int(ctx.k_index[j]))
    loop = loop_attention(q, k, v, ctx, lambda b, h, i, j: q[b, h, i] @ k[b, h, j] * att.scale
                          - slopes[h] * abs(int(ctx.q_index[i]) - int(ctx.k_index[j])))
    assert_same(out, loop, (q, k, v), atol=1e-12, rtol=0)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_da_equals_relu_reweighted_scores(causal):
    """DA-Transformer (Wu et al. 2021): R_h = w_h |i - j|, R^ = (1 + e^v_h) / (1 + e^(v_h - R_h)),
    A = softmax(ReLU(q_i k_j) * R^ / sqrt(d))."""
    pos, ctx, (q, k, v), out, scale = run_position("da", causal, ("w", "v"))

    def score(b, h, i, j):
        r = pos.w[h] * abs(int(ctx.q_index[i]) - int(ctx.k_index[j]))
        rhat = (1 + torch.exp(pos.v[h])) / (1 + torch.exp(pos.v[h] - r))
        return torch.relu(q[b, h, i] @ k[b, h, j]) * rhat * scale

    loop = loop_attention(q, k, v, ctx, score)
    assert_same(out, loop, (q, k, v, pos.w, pos.v))


# ----------------------------------------------------------------- rotary / absolute


def test_rope_scores_depend_only_on_offsets():
    pos = make_position("rope")
    q, k, _ = qkv(tq=T, tk=T)
    qi, ki = torch.arange(T) + 2, torch.arange(T) * 3                   # arbitrary query/key positions
    rq, rk = pos.rotate(q, k, qi, ki)
    base = rq @ rk.transpose(-1, -2)
    for shift in (1, 17, 1000):
        sq, sk = pos.rotate(q, k, qi + shift, ki + shift)
        torch.testing.assert_close(sq @ sk.transpose(-1, -2), base, rtol=0, atol=1e-9)
    assert not torch.allclose(base, q @ k.transpose(-1, -2))             # positions do change scores


@pytest.mark.parametrize("name", [n for n in available()["position"] if "rotary" in lookup("position", n).hooks])
def test_rotate_one_is_rotate_of_a_query(name):
    """``rotate_one`` (shared-QK heads: routing's routed heads rotate their queries once) equals ``rotate``'s
    rotated query, at arbitrary positions, for every registered rotary encoding."""
    pos = make_position(name)
    q, _, _ = qkv(tq=T, tk=T)
    idx = torch.arange(T) * 2 + 3
    torch.testing.assert_close(pos.rotate_one(q, idx), pos.rotate(q, q, idx, idx)[0], rtol=0, atol=0)


def test_rope_is_the_pairwise_rotation():
    """Su et al. 2021 eq. 34: feature pair m (here features m and m + d/2) rotated by p * base^(-2m/d)."""
    pos = make_position("rope")
    q, k, _ = qkv(tq=T, tk=T)
    idx = torch.arange(T) + 5
    rq, _ = pos.rotate(q, k, idx, idx)
    half = DH // 2
    for p in range(T):
        for m in range(half):
            a = (p + 5) * 10000.0 ** (-2 * m / DH)
            x1, x2 = q[..., p, m], q[..., p, m + half]
            torch.testing.assert_close(rq[..., p, m], x1 * math.cos(a) - x2 * math.sin(a), rtol=0, atol=1e-6)
            torch.testing.assert_close(rq[..., p, m + half], x1 * math.sin(a) + x2 * math.cos(a), rtol=0, atol=1e-6)


@pytest.mark.parametrize("d", [D, 7])
def test_sinusoidal_matches_vaswani(d):
    pos = lookup("position", "sinusoidal")(base_config(d_model=d, n_heads=1, position="sinusoidal"))
    p = torch.tensor([[0, 1, 2, 7, 50, 199]])
    out = pos.embed_input(torch.zeros(1, 6, d, dtype=F64), p)
    ref = torch.stack([sinusoid_loop(int(x), d) for x in p[0]])[None]
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)              # computed in float32


def test_learned_positions_keep_counting_across_segments_and_restart_on_reset():
    import rlformer
    enc = rlformer.build_encoder(cfg(position="learned", memory="none")).eval()
    seen = []
    original = enc.input_position.embed_input

    def spy(x, p):
        seen.append(p.clone())
        return original(x, p)

    enc.input_position.embed_input = spy
    x = torch.randn(2, 9, D)
    s = enc(x[:, :5]).state
    s = enc(x[:, 5:8], state=s).state
    enc(x[:, 8:], state=s, reset=torch.tensor([True, False]))
    assert seen[0].tolist() == [[0, 1, 2, 3, 4]] * 2
    assert seen[1].tolist() == [[5, 6, 7]] * 2
    assert seen[2].tolist() == [[0], [8]]
    table = enc.input_position.table.weight                             # and the vector is the row's own
    torch.testing.assert_close(original(torch.zeros(1, 1, D), torch.tensor([[7]])), table[7][None, None])


@pytest.mark.parametrize("base", [0.0, -10_000.0])
def test_rope_rejects_a_non_positive_base(base):
    """base <= 0 gives inf/NaN frequencies (0^(-x), (-b)^(-x)): refused at build time."""
    import rlformer
    with pytest.raises(ValueError, match="rope_base"):
        rlformer.build_encoder(cfg(position="rope", rope_base=base))

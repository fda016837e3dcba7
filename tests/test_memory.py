"""Compressive (Rae et al. 2020) and kNN (Wu et al. 2022) memories: layout, order, references, training."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from variants import D_MODEL, small_config

import rlformer
from rlformer.memory import compressive as cm
from rlformer.memory import knn as km

torch.set_num_threads(1)


def compressive_config(fn="max_pool", rate=2, cmem_len=3, mem_len=4, **kw):
    cfg = small_config("memory", "compressive", mem_len=mem_len, **kw)
    cfg.compressive = rlformer.CompressiveConfig(cmem_len=cmem_len, rate=rate, fn=fn)
    return cfg


def knn_config(capacity=12, topk=3, mix="gate", chunk=5, layer=-2, mem_len=4, **kw):
    cfg = small_config("memory", "knn", mem_len=mem_len, **kw)
    cfg.knn = rlformer.KNNConfig(capacity=capacity, topk=topk, mix=mix, chunk=chunk, layer=layer)
    return cfg


def build(cfg, seed=0):
    torch.manual_seed(seed)
    return rlformer.build_encoder(cfg)


# ================================================================ compressive


class RowSim:
    """Per-row reference of Algorithm 1: FIFO list, pending group, compressed FIFO (plain Python)."""

    def __init__(self, mem_len, cmem_len, rate, f):
        self.mem_len, self.cmem_len, self.rate, self.f = mem_len, cmem_len, rate, f
        self.fifo, self.pending, self.cmem = [], [], []

    def reset(self):
        self.fifo = [(torch.zeros_like(v), False) for v, _ in self.fifo]
        self.pending, self.cmem = [], []

    def step(self, xs, valid):
        self.fifo += list(zip(xs, valid))
        evicted, self.fifo = self.fifo[:-self.mem_len], self.fifo[-self.mem_len:]
        for vec, ok in evicted:
            if ok:
                self.pending.append(vec)
            if len(self.pending) == self.rate:
                self.cmem = (self.cmem + [self.f(torch.stack(self.pending))])[-self.cmem_len:]
                self.pending = []


SCHEDULE = [  # (segment length, padded positions, reset rows) for 3 rows
    (3, [], []), (2, [(1, 0)], []), (5, [], []), (1, [(0, 0)], [2]), (4, [(2, 1), (2, 2)], []), (6, [], [0]),
    (2, [], []), (7, [(1, 6)], [1]), (3, [], []),
]


@pytest.mark.parametrize("fn,f", [("max_pool", lambda g: g.amax(0)), ("avg_pool", lambda g: g.mean(0))])
@pytest.mark.parametrize("rate", [1, 2, 3])
def test_compressive_sizes_and_fifo_order_match_reference(fn, f, rate):
    """Layer 0 stores its inputs x; mem / cmem / pending must hold exactly what Algorithm 1 says."""
    mem_len, cmem_len = 4, 3
    enc = build(compressive_config(fn, rate, cmem_len, mem_len)).eval()
    sims = [RowSim(mem_len, cmem_len, rate, f) for _ in range(3)]
    state, token = None, 0
    for t, pads, resets in SCHEDULE:
        x = torch.randn(3, t, D_MODEL)
        x[..., 0] = torch.arange(token, token + t, dtype=torch.float32) + 100 * torch.arange(3)[:, None]
        token += t
        mask = torch.ones(3, t, dtype=torch.bool)
        for r, p in pads:
            mask[r, p] = False
        reset = torch.tensor([r in resets for r in range(3)])
        for r in resets:
            sims[r].reset()
        out = enc(x, state=state, reset=reset if resets else None, mask=mask)
        state = out.state
        slot = state.slots[0]["memory"]
        for r, sim in enumerate(sims):
            sim.step(list(x[r]), mask[r].tolist())
            assert slot["mem"].shape[1] == len(sim.fifo) <= mem_len
            assert slot["mem_valid"][r].tolist() == [ok for _, ok in sim.fifo]
            for j, (vec, ok) in enumerate(sim.fifo):
                if ok:
                    torch.testing.assert_close(slot["mem"][r, j], vec)
            got_c = slot["cmem"][r][slot["cmem_valid"][r]] if "cmem" in slot else torch.zeros(0, D_MODEL)
            assert slot.get("cmem", got_c).shape[1 if "cmem" in slot else 0] <= cmem_len
            assert got_c.shape[0] == len(sim.cmem)
            for got, want in zip(got_c, sim.cmem):
                torch.testing.assert_close(got, want)
            if "cmem" in slot:  # right-aligned: valid compressed memories are the newest slots
                n = len(sim.cmem)
                assert slot["cmem_valid"][r].tolist() == [False] * (slot["cmem"].shape[1] - n) + [True] * n
            got_p = slot["pending"][r][slot["pending_valid"][r]] if "pending" in slot else torch.zeros(0, D_MODEL)
            assert got_p.shape[0] == len(sim.pending) < max(rate, 2)
            for got, want in zip(got_p, sim.pending):
                torch.testing.assert_close(got, want)
    assert any(len(s.cmem) == cmem_len for s in sims)  # the schedule filled and rolled the compressed memory


def test_compressive_read_is_cmem_then_mem():
    enc = build(compressive_config("avg_pool", rate=2, cmem_len=2, mem_len=3)).eval()
    x = torch.arange(10, dtype=torch.float32)[None, :, None].expand(1, 10, D_MODEL)
    slot = enc(x).state.slots[0]["memory"]
    mem, valid = enc.memory.read(slot)
    # tokens 0..6 evicted -> groups (0,1) (2,3) (4,5) -> cmem keeps the last 2: 2.5, 4.5; pending 6; mem 7, 8, 9
    assert mem[0, :, 0].tolist() == [2.5, 4.5, 7.0, 8.0, 9.0] and valid.all()
    assert slot["pending"][0, :, 0].tolist() == [6.0]


def test_compressors_match_naive_formulas():
    torch.manual_seed(0)
    groups = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)     # (B, G, c, D)
    conv = cm.Conv(5, 4).double()
    w, bias = conv.conv.weight, conv.conv.bias                                    # (D_out, D_in, c)
    naive = torch.einsum("bgcd,edc->bge", groups, w) + bias
    torch.testing.assert_close(conv(groups), naive)
    dil = cm.DilatedConv(5, 3).double()                                           # layers with dilation 1, 2
    g3 = groups[:, :, :3]

    def causal_conv(seq, layer):                                                  # seq: list of (D,) vectors
        d = layer.dilation[0]
        return [layer.weight[:, :, 1] @ seq[t] + (layer.weight[:, :, 0] @ seq[t - d] if t >= d else 0) + layer.bias
                for t in range(len(seq))]

    want = torch.zeros(2, 3, 5, dtype=torch.float64)
    for b in range(2):
        for g in range(3):
            seq = list(g3[b, g])
            seq = [torch.relu(v) for v in causal_conv(seq, dil.convs[0])]
            want[b, g] = causal_conv(seq, dil.convs[1])[-1]
    got = dil(g3)
    torch.testing.assert_close(got, want)
    (ga,) = torch.autograd.grad(got.square().sum(), groups)
    (gb,) = torch.autograd.grad(want.square().sum(), groups)
    torch.testing.assert_close(ga, gb)


def test_most_used_keeps_highest_usage_in_time_order():
    x = torch.arange(8, dtype=torch.float32)[None, :, None].repeat(2, 1, 1)
    usage = torch.tensor([[0.1, 0.9, 0.3, 0.2, 0.8, 0.7, 0.0, 5.0],
                          [0.5, 0.4, 0.3, 0.2, 0.1, 0.0, 9.0, 9.0]])
    kept, valid = cm.most_used(x, usage, torch.tensor([3, 2]), 4)                 # c = 2
    assert valid.tolist() == [[True] * 3 + [False], [True, True, False, False]]
    assert kept[0, :3, 0].tolist() == [1.0, 4.0, 5.0]       # top-3 of the first 6 (not 7: group 4 incomplete)
    assert kept[1, :2, 0].tolist() == [0.0, 1.0]


def test_most_used_compressed_memories_are_past_states():
    enc = build(compressive_config("most_used", rate=2, cmem_len=4, mem_len=4, position="rope")).eval()
    xs = torch.randn(2, 15, D_MODEL)
    state = None
    for seg in xs.split([5, 3, 7], dim=1):
        state = enc(seg, state=state).state
    slot = state.slots[0]["memory"]
    for r in range(2):
        kept = slot["cmem"][r][slot["cmem_valid"][r]]
        assert kept.shape[0] == 4
        idx = [int((xs[r] - k).abs().sum(-1).argmin()) for k in kept]
        assert all(torch.equal(xs[r, i], k) for i, k in zip(idx, kept))
        assert idx == sorted(idx) and idx[-1] < 11                       # time order; only evicted states


def naive_recon(block, h, old_rows, comp_rows):
    """Mean over rows' queries and heads of the squared error of attention over old vs compressed memories."""
    att = block.attention
    errs = []
    for b, (old, comp) in enumerate(zip(old_rows, comp_rows)):
        if old.shape[0] == 0:
            continue
        q = att.q_proj(block.attn_input(h[b])).view(-1, att.n_heads, att.d_head)
        ko, vo = att.kv_proj(block.attn_input(old)).chunk(2, -1)
        kc, vc = att.kv_proj(block.attn_input(comp)).chunk(2, -1)
        for i in range(h.shape[1]):
            for hd in range(att.n_heads):
                sl = slice(hd * att.d_head, (hd + 1) * att.d_head)
                a = torch.softmax(ko[:, sl] @ q[i, hd] * att.scale, 0) @ vo[:, sl]
                c = torch.softmax(kc[:, sl] @ q[i, hd] * att.scale, 0) @ vc[:, sl]
                errs.append((a.detach() - c).square().mean())
    return torch.stack(errs).mean()


def test_reconstruction_loss_matches_naive_reference_and_trains_only_f_c():
    cfg = compressive_config("conv", rate=2, cmem_len=4, mem_len=3, block="gtrxl")
    enc = build(cfg).double().train()
    x = torch.randn(2, 7, D_MODEL, dtype=torch.float64)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, :5] = False                               # row 1: 2 valid states, only one evicted -> pending only
    out = enc(x, mask=mask)
    loss = out.aux_loss
    block = enc.depth.blocks[0]
    conv = enc.memory.compressors["0"]
    # row 1 evicts only padding -> contributes nothing; row 0 compresses x[0, :4] into 2 memories per layer
    want = naive_recon(block, x[:1], [x[0, :4]], [conv(x[0, :4].reshape(1, 2, 2, D_MODEL))[0]])
    h1 = enc.depth.blocks[0](x, None, _ctx(x))[0]           # layer-1 input (no memory on the first segment)
    comp1 = enc.memory.compressors["1"](h1[0, :4].reshape(1, 2, 2, D_MODEL))[0]
    want = want + naive_recon(enc.depth.blocks[1], h1[:1], [h1[0, :4].detach()], [comp1])
    torch.testing.assert_close(loss, want.float())                    # aux_loss is reported in float32
    params = dict(enc.named_parameters())
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    wgrads = torch.autograd.grad(want, [p for n, p in params.items() if "compressors" in n])
    for (name, _), g in zip(params.items(), grads):
        if "compressors" not in name:
            assert g is None or not g.any(), f"reconstruction loss reached {name}"
    torch.testing.assert_close([g for (n, _), g in zip(params.items(), grads) if "compressors" in n], list(wgrads))


def _ctx(x):
    from rlformer.context import AttentionContext
    idx = torch.arange(x.shape[1])
    return AttentionContext(causal=True, q_index=idx, k_index=idx, q_pos=idx[None].expand(x.shape[0], -1))


@pytest.mark.parametrize("fn", ["conv", "dilated_conv"])
def test_reconstruction_loss_decreases_when_training_compression(fn):
    enc = build(compressive_config(fn, rate=2, cmem_len=4, mem_len=4)).train()
    opt = torch.optim.Adam(enc.memory.compressors.parameters(), lr=1e-2)
    torch.manual_seed(1)
    data = torch.randn(4, 12, D_MODEL)
    losses = []
    for _ in range(40):
        loss = enc(data).aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 0
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses[::8]


@pytest.mark.parametrize("fn", ["max_pool", "conv", "most_used"])
@pytest.mark.parametrize("position", ["rope", "xl", "learned"])
def test_compressive_reset_clears_exactly_the_named_rows(fn, position):
    enc = build(compressive_config(fn, rate=2, cmem_len=3, mem_len=3, position=position)).eval()
    history, x = torch.randn(3, 14, D_MODEL), torch.randn(3, 9, D_MODEL)
    state = enc(history).state
    assert state.slots[0]["memory"]["cmem_valid"].all()
    reset = torch.tensor([True, False, True])
    fresh_state = enc(x[:, :4]).state
    out = enc(x[:, :4], state=state, reset=reset)
    kept = enc(x[:, :4], state=state)
    torch.testing.assert_close(out.output[reset], enc(x[:, :4]).output[reset], rtol=0, atol=1e-5)
    torch.testing.assert_close(out.output[~reset], kept.output[~reset], rtol=0, atol=1e-6)
    # continue: the reset rows compress exactly as a fresh run (same groups, same compressed values)
    cont, fresh = enc(x[:, 4:], state=out.state), enc(x[:, 4:], state=fresh_state)
    torch.testing.assert_close(cont.output[reset], fresh.output[reset], rtol=0, atol=1e-5)
    torch.testing.assert_close(cont.output[~reset], enc(x[:, 4:], state=kept.state).output[~reset], rtol=0, atol=1e-6)
    a, b = cont.state.slots[1]["memory"], fresh.state.slots[1]["memory"]
    for r in (0, 2):
        torch.testing.assert_close(a["cmem"][r][a["cmem_valid"][r]], b["cmem"][r][b["cmem_valid"][r]], atol=1e-5, rtol=0)


@pytest.mark.parametrize("splits", [(5, 1, 10), (1,) * 16], ids=["uneven", "steps"])
def test_compressive_without_eviction_equals_full_pass(splits):
    """mem_len >= total length: nothing is evicted, so segments == one pass (as memory='xl')."""
    enc = build(compressive_config("conv", rate=2, cmem_len=64, mem_len=64, position="rope")).eval()
    x = torch.randn(2, sum(splits), D_MODEL)
    full = enc(x).output
    state, outs = None, []
    for seg in x.split(list(splits), dim=1):
        out = enc(seg, state=state)
        state, _ = out.state, outs.append(out.output)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=0, atol=1e-5)
    assert "cmem" not in state.slots[0]["memory"]


@pytest.mark.parametrize("fn", ["max_pool", "avg_pool", "conv", "dilated_conv", "most_used"])
def test_compressive_every_function_trains_through_segments(fn):
    enc = build(compressive_config(fn, rate=3, cmem_len=2, mem_len=4, block="gtrxl")).train()
    state = None
    for t in (5, 7, 2):
        out = enc(torch.randn(2, t, D_MODEL), state=state)
        (out.output.square().mean() + out.aux_loss).backward()
        state = out.state.detach()
        assert torch.isfinite(out.output).all() and torch.isfinite(out.aux_loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in enc.parameters())


@pytest.mark.parametrize("bad,match", [
    (dict(mem_len=0), "mem_len"),
    (dict(cmem_len=0), "cmem_len"),
    (dict(rate=0), "rate"),
    (dict(fn="mean"), "compression function"),
])
def test_compressive_invalid_settings_raise_at_build(bad, match):
    cfg = compressive_config()
    if "mem_len" in bad:
        cfg.mem_len = bad.pop("mem_len")
    cfg.compressive = dataclasses.replace(cfg.compressive, **bad)
    with pytest.raises(ValueError, match=match):
        rlformer.build_encoder(cfg)


# ================================================================ kNN


def brute_force_nearest(q, keys, valid, k):
    """Indices of the k nearest valid keys by L2 distance (normalized vectors), per query."""
    b, h = q.shape[:2]
    out = []
    for bi in range(b):
        cand = valid[bi].nonzero().squeeze(1)
        for hi in range(h):
            d = torch.cdist(q[bi, hi], keys[bi, hi, cand])                     # (T, n)
            top = d.topk(min(k, cand.numel()), largest=False).indices
            out.append([sorted(cand[row].tolist()) for row in top])
    return out


def random_store(b=3, h=2, s=23, dh=8, seed=0):  # row 1 empty, row 2 two valid keys
    g = torch.Generator().manual_seed(seed)
    keys = F.normalize(torch.randn(b, h, s, dh, generator=g, dtype=torch.float64), dim=-1)
    valid = torch.rand(b, s, generator=g) > 0.3
    valid[1] = False                                                            # an empty row
    valid[2, :] = False
    valid[2, [4, s - 3]] = True                                                  # fewer valid keys than k
    q = F.normalize(torch.randn(b, h, 5, dh, generator=g, dtype=torch.float64), dim=-1)
    return q, keys, valid


@pytest.mark.parametrize("chunk", [4, 7, 100])
def test_knn_search_returns_true_nearest_keys(chunk):
    q, keys, valid = random_store()
    idx, ok = km.topk_search(q, keys, valid, 4, chunk)
    want = brute_force_nearest(q, keys, valid, 4)
    got = [sorted(row[o].tolist()) for bh_i, bh_o in zip(idx.flatten(0, 1), ok.flatten(0, 1))
           for row, o in zip(bh_i, bh_o)]
    assert got == [row for rows in want for row in rows]
    assert not ok[1].any() and ok[2].sum(-1).eq(2).all() and ok[0].all()


@pytest.mark.skipif(km._faiss() is None, reason="faiss not installed")
def test_faiss_search_matches_batched_search():
    q, keys, valid = random_store()
    i1, o1 = km.topk_search(q, keys, valid, 4, 5)
    i2, o2 = km.faiss_search(q, keys, valid, 4)
    assert torch.equal(o1, o2)
    assert torch.equal(torch.where(o1, i1, -1).sort(-1).values, torch.where(o2, i2, -1).sort(-1).values)


def test_knn_attention_matches_naive_reference_outputs_and_gradients():
    q, keys, valid = random_store(b=3, s=11)
    values = torch.randn(3, 2, 11, 8, dtype=torch.float64)
    q.requires_grad_(True)
    temp = torch.tensor([2.0, 3.0], dtype=torch.float64, requires_grad=True)
    idx, ok = km.topk_search(q.detach(), keys, valid, 3, 4)
    fast, has = km.retrieved_attention(q, keys, values, idx, ok, temp)
    ref = km.knn_reference(q, keys, values, valid, 3, temp)
    torch.testing.assert_close(fast, ref)
    assert not has[1].any() and has[0].all()
    w = torch.randn_like(fast)
    ga = torch.autograd.grad((fast * w).sum(), [q, temp])
    gb = torch.autograd.grad((ref * w).sum(), [q, temp])
    torch.testing.assert_close(ga, gb)


def test_store_keeps_capacity_oldest_out_first_with_wraparound_and_resets():
    cap, b, h, dh = 7, 2, 1, 1
    store, written = {}, [[], []]
    for t in (3, 2, 4, 1, 9, 5):
        ids = torch.arange(len(written[0]), len(written[0]) + t, dtype=torch.float32)
        k = (ids[None, None, :, None] + torch.tensor([0.0, 1000.0])[:, None, None, None]).expand(b, h, t, dh)
        store = km.write_store(store, k, -k, torch.ones(b, t, dtype=torch.bool), cap)
        for r in range(b):
            written[r] += (ids + 1000 * r).tolist()
        assert store["keys"].shape[2] == min(cap, len(written[0]))
        for r in range(b):
            order = (torch.arange(store["keys"].shape[2]) + store["ptr"][r]) % store["keys"].shape[2]
            kept = store["keys"][r, 0, order, 0][store["valid"][r, order]].tolist()
            assert kept == written[r][-cap:]                                   # ring order = insertion order
            assert torch.equal(store["values"][r, 0, :, 0], -store["keys"][r, 0, :, 0])
    # reset row 1 through the generic zeroing rule: it refills from scratch, row 0 is untouched
    state = rlformer.EncoderState(torch.zeros(2, dtype=torch.long), [{"store": store}])
    store = state.reset(torch.tensor([False, True])).slots[0]["store"]
    assert not store["valid"][1].any() and store["ptr"][1] == 0
    before = store["keys"][0].clone()
    k = torch.full((b, h, 3, dh), 5000.0)
    store = km.write_store(store, k, k, torch.ones(b, 3, dtype=torch.bool), cap)
    assert store["valid"][1].tolist() == [True] * 3 + [False] * 4
    assert store["keys"][0].ne(before).sum() == 3


def test_knn_store_holds_the_layers_normalized_keys():
    cfg = knn_config(capacity=10, layer=0, block="pre_ln", position="rope")
    enc = build(cfg).eval()
    xs = torch.randn(2, 13, D_MODEL)
    state = None
    for seg in xs.split([4, 6, 3], dim=1):
        state = enc(seg, state=state).state
    store = state.slots[0]["attention"]["store"]
    att = enc.depth.blocks[0].attention.inner
    k, v = att.kv_proj(enc.depth.blocks[0].norm1(xs)).chunk(2, dim=-1)         # un-rotated content keys
    k = F.normalize(k.view(2, 13, 4, -1).transpose(1, 2), dim=-1)
    v = v.view(2, 13, 4, -1).transpose(1, 2)
    assert store["valid"].all() and store["keys"].shape[2] == 10
    order = (torch.arange(10) + store["ptr"][:, None]) % 10                   # oldest first
    for r in range(2):
        torch.testing.assert_close(store["keys"][r][:, order[r]], k[r, :, -10:])
        torch.testing.assert_close(store["values"][r][:, order[r]], v[r, :, -10:])


def test_knn_retrieval_is_causal_across_segments():
    """A query never sees its own segment's future through the store (keys are written afterwards)."""
    enc = build(knn_config(capacity=64, topk=4)).double().eval()
    first = torch.randn(2, 9, D_MODEL, dtype=torch.float64)
    state = enc(first).state
    x = torch.randn(2, 8, D_MODEL, dtype=torch.float64)
    base = enc(x, state=state).output
    for t in (0, 3, 6):
        y = x.clone()
        y[:, t + 1:] += 3 * torch.randn_like(y[:, t + 1:])
        out = enc(y, state=state).output
        torch.testing.assert_close(out[:, :t + 1], base[:, :t + 1], rtol=0, atol=1e-9)
    # retrieval is used: closing the gate (g -> 0) changes the output; other chunkings give the same output
    with torch.no_grad():
        enc.depth.blocks[0].attention.gate_bias.fill_(-1e4)
    assert not torch.allclose(base, enc(x, state=state).output)
    with torch.no_grad():
        enc.depth.blocks[0].attention.gate_bias.zero_()
    enc_big = build(knn_config(capacity=64, topk=4, chunk=10_000)).double().eval()
    torch.testing.assert_close(enc_big(x, state=enc_big(first).state).output, base)


@pytest.mark.parametrize("mix", ["gate", "spalm"])
def test_knn_reset_clears_exactly_the_named_rows(mix):
    enc = build(knn_config(capacity=8, mix=mix, position="rope")).eval()
    history, x = torch.randn(3, 14, D_MODEL), torch.randn(3, 5, D_MODEL)
    state = enc(history).state
    reset = torch.tensor([True, False, True])
    out = enc(x, state=state, reset=reset)
    kept = enc(x, state=state)
    torch.testing.assert_close(out.output[reset], enc(x).output[reset], rtol=0, atol=1e-5)
    torch.testing.assert_close(out.output[~reset], kept.output[~reset], rtol=0, atol=1e-6)
    y = torch.randn(3, 4, D_MODEL)
    torch.testing.assert_close(enc(y, state=out.state).output[reset], enc(y, state=enc(x).state).output[reset],
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("mix", ["gate", "spalm"])
def test_knn_both_mix_modes_train(mix):
    enc = build(knn_config(capacity=32, topk=4, mix=mix)).train()
    gate = [p for n, p in enc.named_parameters() if "gate" in n or "log_temperature" in n]
    assert gate
    opt = torch.optim.Adam(enc.parameters(), lr=3e-3)
    torch.manual_seed(2)
    segs = torch.randn(2, 3, 6, D_MODEL)
    target = segs.flip(0)
    losses = []
    for _ in range(25):
        state, loss = None, 0.0
        for i in range(3):
            out = enc(segs[:, i], state=state)
            loss = loss + (out.output - target[:, i]).square().mean()
            state = out.state
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gate)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize("bad,match", [
    (dict(layer=2), "knn.layer"), (dict(layer=-3), "knn.layer"), (dict(topk=0), ">= 1"),
    (dict(mix="sum"), "mixing mode"), (dict(capacity=0), ">= 1"),
])
def test_knn_invalid_settings_raise_at_build(bad, match):
    cfg = knn_config()
    cfg.knn = dataclasses.replace(cfg.knn, **bad)
    with pytest.raises(ValueError, match=match):
        rlformer.build_encoder(cfg)


def test_knn_refuses_attention_with_its_own_forward():
    if "adaptive_span" not in rlformer.available()["attention"]:
        pytest.skip("no attention variant overrides forward")
    cfg = knn_config()
    cfg.attention = "adaptive_span"
    with pytest.raises(ValueError, match="own forward"):
        rlformer.build_encoder(cfg)


def test_knn_use_faiss_without_faiss_raises_at_build(monkeypatch):
    monkeypatch.setattr(km, "_faiss", lambda: None)
    cfg = knn_config()
    cfg.knn.use_faiss = True
    with pytest.raises(ValueError, match="faiss"):
        rlformer.build_encoder(cfg)


@pytest.mark.skipif(km._faiss() is None, reason="faiss not installed")
def test_knn_faiss_encoder_matches_batched_encoder():
    cfg = knn_config(capacity=64, topk=4)
    enc = build(cfg).double().eval()
    x1, x2 = torch.randn(2, 2, 9, D_MODEL, dtype=torch.float64)
    want = enc(x2, state=enc(x1).state).output
    enc.cfg.knn.use_faiss = True
    try:
        got = enc(x2, state=enc(x1).state).output
    finally:
        enc.cfg.knn.use_faiss = False
    torch.testing.assert_close(got, want)

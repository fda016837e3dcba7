"""Encoder-decoder with cross-attention (Vaswani et al. 2017): shapes, causality, bidirectional
source, padding, gradients, a learnable task, incremental decoding, build-time errors."""
from __future__ import annotations

import time

import pytest
import torch
from torch import nn

import rlformer
from rlformer.attention.full import FullAttention
from rlformer.registry import _REGISTRY
from variants import D_MODEL, T, all_variants, small_config

torch.set_num_threads(1)

BLOCKS = ["pre_ln", "post_ln"]


def build(cfg, seed=0, **kw):
    torch.manual_seed(seed)
    return rlformer.build_encoder_decoder(cfg, **kw)


def rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, D_MODEL, dtype=dtype)


@pytest.mark.parametrize("block", BLOCKS)
def test_shapes_state_and_aux(block):
    model = build(small_config("block", block, memory="xl", position="rope"))
    src, tgt = rand(3, 5), rand(3, 7)
    out = model(src, tgt)
    assert isinstance(out, rlformer.EncoderOutput)
    assert out.output.shape == (3, 7, D_MODEL) and torch.isfinite(out.output).all()
    assert out.state is not None and out.state.offset.tolist() == [7, 7, 7]
    assert out.aux_loss.dim() == 0 and float(out.aux_loss) == 0.0
    assert out.info["encoder"] == {}
    out2 = model(src, rand(3, 2), tgt_state=out.state)
    assert out2.output.shape == (3, 2, D_MODEL) and out2.state.offset.tolist() == [9, 9, 9]
    # source and target lengths are independent
    assert model(rand(3, 1), rand(3, 11)).output.shape == (3, 11, D_MODEL)


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("position", ["rope", "learned", "xl"])
def test_decoder_is_causal(block, position):
    model = build(small_config("block", block, position=position)).double().eval()
    src, tgt = rand(2, 6, dtype=torch.float64), rand(2, 10, dtype=torch.float64)
    base = model(src, tgt).output
    for t in (0, 4, 8):
        y = tgt.clone()
        y[:, t + 1:] += torch.randn_like(y[:, t + 1:]) * 3
        out = model(src, y).output
        torch.testing.assert_close(out[:, :t + 1], base[:, :t + 1], rtol=0, atol=1e-10)
        assert not torch.allclose(out[:, t + 1:], base[:, t + 1:])


@pytest.mark.parametrize("block", BLOCKS)
def test_encoder_is_bidirectional(block):
    """Perturbing any source position changes every encoder output and every decoder output."""
    model = build(small_config("block", block, position="rope")).double().eval()
    src, tgt = rand(2, 6, dtype=torch.float64), rand(2, 5, dtype=torch.float64)
    enc, dec = model.encode(src).output, model(src, tgt).output
    for j in range(6):
        s = src.clone()
        s[:, j] += torch.randn(2, D_MODEL, dtype=torch.float64)   # (a constant shift is invisible to LayerNorm)
        enc2, dec2 = model.encode(s).output, model(s, tgt).output
        assert ((enc2 - enc).abs().amax(-1) > 1e-6).all(), f"source {j} does not reach every encoder position"
        assert ((dec2 - dec).abs().amax(-1) > 1e-6).all(), f"source {j} does not reach every decoder position"


@pytest.mark.parametrize("block", BLOCKS)
def test_src_padding_mask_hides_padded_tokens(block):
    model = build(small_config("block", block, position="rope")).double().eval()
    src, tgt = rand(3, 6, dtype=torch.float64), rand(3, 4, dtype=torch.float64)
    lengths = [6, 4, 1]
    src_mask = torch.arange(6)[None, :] < torch.tensor(lengths)[:, None]   # right padding
    out = model(src, tgt, src_mask=src_mask).output
    noisy = torch.where(src_mask[..., None], src, torch.randn_like(src) * 10)
    torch.testing.assert_close(model(noisy, tgt, src_mask=src_mask).output, out, rtol=0, atol=1e-10)
    for row, n in enumerate(lengths):                   # == the same source without its padding
        alone = model(src[row:row + 1, :n], tgt[row:row + 1]).output
        torch.testing.assert_close(out[row:row + 1], alone, rtol=0, atol=1e-8)
    assert not torch.allclose(out, model(src, tgt).output)


def test_all_padded_source_reads_nothing():
    """A row with no valid source token gets finite outputs that ignore the source entirely."""
    model = build(small_config("block", "pre_ln", position="rope")).double().eval()
    src, tgt = rand(2, 5, dtype=torch.float64), rand(2, 4, dtype=torch.float64)
    mask = torch.tensor([[True] * 5, [False] * 5])
    out = model(src, tgt, src_mask=mask).output
    assert torch.isfinite(out).all()
    out2 = model(torch.randn_like(src), tgt, src_mask=mask).output
    torch.testing.assert_close(out2[1], out[1], rtol=0, atol=1e-12)
    assert not torch.allclose(out2[0], out[0])


@pytest.mark.parametrize("block", BLOCKS)
def test_gradients_reach_every_parameter(block):
    model = build(small_config("block", block, memory="xl", position="xl", dropout=0.1)).train()
    src, tgt = rand(2, 5), rand(2, 6)
    src_mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    out = model(src, tgt, src_mask=src_mask)
    out2 = model(src, rand(2, 3), src_mask=src_mask, tgt_state=out.state)   # parameters used via memory
    (out.output.square().mean() + out2.output.square().mean() + out.aux_loss).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
               or p.grad.abs().sum() == 0]
    assert not missing, f"parameters without a (finite, nonzero) gradient: {missing}"


def test_checkpointing_gives_the_same_gradients():
    """ctx.extra (the source) survives activation recomputation."""
    cfg = small_config("block", "post_ln", position="shaw")
    a = build(cfg).double().train()
    b = build(small_config("block", "post_ln", position="shaw", checkpointing=True)).double().train()
    b.load_state_dict(a.state_dict())
    src, tgt = rand(2, 5, dtype=torch.float64), rand(2, 6, dtype=torch.float64)
    for m in (a, b):
        (m(src, tgt).output * torch.linspace(-1, 1, D_MODEL, dtype=torch.float64)).sum().backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=name)


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("position", rlformer.available()["position"])
def test_step_by_step_decoding_equals_full_pass(block, position):
    """memory='xl' (mem_len >= target length): one target step at a time == one pass."""
    model = build(small_config("block", block, position=position, memory="xl", mem_len=32)).eval()
    src, tgt = rand(3, 5), rand(3, 9)
    src_mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2, [True] + [False] * 4])
    full = model(src, tgt, src_mask=src_mask).output
    src_out = model.encode(src, src_mask).output                 # encode once ...
    state, steps = None, []
    for t in range(tgt.shape[1]):                                 # ... decode one token at a time
        out = model.decode(tgt[:, t:t + 1], src_out, src_mask, state=state)
        state = out.state
        steps.append(out.output)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-5)
    state, segs = None, []                                        # the public forward, uneven segments
    for seg in tgt.split([4, 1, 4], dim=1):
        out = model(src, seg, src_mask=src_mask, tgt_state=state)
        state = out.state
        segs.append(out.output)
    torch.testing.assert_close(torch.cat(segs, 1), full, rtol=0, atol=1e-5)


def test_tgt_reset_restarts_the_named_rows():
    model = build(small_config("block", "pre_ln", position="learned", memory="xl", mem_len=32)).eval()
    src, hist, tgt = rand(2, 4), rand(2, 6), rand(2, 3)
    state = model(src, hist).state
    reset = torch.tensor([True, False])
    out = model(src, tgt, tgt_state=state, tgt_reset=reset).output
    torch.testing.assert_close(out[0], model(src, tgt).output[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[1], model(src, tgt, tgt_state=state).output[1], rtol=0, atol=1e-6)


def test_reverse_task_learns():
    """Reverse a sequence of 6 tokens from a vocabulary of 8 with teacher forcing: the loss falls clearly."""
    vocab, length, d = 8, 6, D_MODEL
    cfg = small_config("block", "pre_ln", position="sinusoidal", n_layers=2)
    torch.manual_seed(0)
    model = rlformer.build_encoder_decoder(cfg)
    embed, head = nn.Embedding(vocab + 1, d), nn.Linear(d, vocab)           # token vocab + BOS
    params = [*model.parameters(), *embed.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    losses, t0 = [], time.perf_counter()
    for _ in range(200):
        src = torch.randint(0, vocab, (32, length), generator=gen)
        target = src.flip(1)
        tgt_in = torch.cat([torch.full((32, 1), vocab), target[:, :-1]], 1)
        logits = head(model(embed(src) * d ** 0.5, embed(tgt_in) * d ** 0.5).output)
        loss = nn.functional.cross_entropy(logits.reshape(-1, vocab), target.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    print(f"reverse task: loss {first:.3f} -> {last:.3f} in {time.perf_counter() - t0:.1f} s")
    assert first > 1.8                       # ~ln(8) = 2.08 at the start
    assert last < 0.5 * first, (first, last)


@pytest.mark.parametrize("block", ["gtrxl", "reversible"])
def test_unsupported_block_is_refused_at_build(block):
    with pytest.raises(ValueError, match="block='pre_ln'"):
        rlformer.build_encoder_decoder(small_config("block", block))


class _CausalOnly(FullAttention):
    """Test-only attention that declares itself causal-only."""

    supports_bidirectional = False


def test_causal_only_attention_is_refused_for_the_encoder(monkeypatch):
    monkeypatch.setitem(_REGISTRY["attention"], "causal_only_test", _CausalOnly)
    with pytest.raises(ValueError, match=r"bidirectionally.*'full'"):
        rlformer.build_encoder_decoder(small_config("attention", "causal_only_test", causal=True))
    # a bidirectional encoder config of its own makes it buildable
    cfg = small_config("attention", "causal_only_test", causal=True)
    model = rlformer.build_encoder_decoder(cfg, encoder_cfg=small_config("attention", "full", causal=False))
    assert model(rand(1, 3), rand(1, 4)).output.shape == (1, 4, D_MODEL)


@pytest.mark.parametrize("bad,match", [
    (dict(d_model=30), "not divisible"),
    (dict(memory="xl", mem_len=0), "mem_len"),
    (dict(position="nope"), "unknown position"),
])
def test_invalid_configs_raise_at_build(bad, match):
    with pytest.raises(ValueError, match=match):
        rlformer.build_encoder_decoder(small_config("block", "pre_ln", **bad))


def test_encoder_cfg_must_be_bidirectional_and_same_width():
    cfg = small_config("block", "pre_ln")
    with pytest.raises(ValueError, match="causal must be False"):
        rlformer.build_encoder_decoder(cfg, encoder_cfg=small_config("block", "pre_ln", causal=True))
    with pytest.raises(ValueError, match="d_model"):
        rlformer.build_encoder_decoder(cfg, encoder_cfg=small_config("block", "pre_ln", causal=False, d_model=16))


def _buildable(cfg) -> bool:
    try:
        rlformer.build_encoder_decoder(cfg)
        return True
    except ValueError:
        return False


REGISTRY_CASES = [(k, n) for k, n in all_variants() if k != "block" and _buildable(small_config(k, n))]


@pytest.mark.parametrize("kind,name", REGISTRY_CASES, ids=[f"{k}={n}" for k, n in REGISTRY_CASES])
def test_every_registered_variant_works_in_the_decoder(kind, name):
    """The decoder reuses the registry: every variant it accepts runs forward and backward."""
    model = build(small_config(kind, name)).train()
    src, tgt = rand(2, T), rand(2, T)       # T fits every variant's small config (e.g. local2d's grid)
    out = model(src, tgt)
    assert out.output.shape == (2, T, D_MODEL) and torch.isfinite(out.output).all()
    (out.output.square().mean() + out.aux_loss).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)

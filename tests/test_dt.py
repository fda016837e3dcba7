"""Decision Transformer: windows/masks/RTG/normalization, model causality and padding, training lowers the
loss, parallel evaluation (one episode per env, autoreset not counted), exact resume, CLI backbone swaps,
baselines, offline error. Tiny backbones keep it CPU-fast."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

import rlformer
from agents.dt.config import DTConfig, default_backbone, resolve_preset
from agents.dt.data import OfflineData, WindowSampler, load_offline_data, returns_to_go
from agents.dt.evaluate import evaluate
from agents.dt.model import DecisionTransformer, masked_action_loss
from agents.dt.train import Updater, build_model, make_optimizer, train, train_concurrently

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


def tiny_backbone(**kw) -> rlformer.EncoderConfig:
    return dataclasses.replace(default_backbone(), d_model=32, n_layers=1, **kw)


def tiny_cfg(tmp_path, **kw) -> DTConfig:
    base = dict(env="hopper-medium", train_steps=30, warmup_steps=10, batch_size=16, context_len=5,
                eval_episodes=0, log_every=10, checkpoint_every=0, device="cpu", out_dir=str(tmp_path / "run"),
                tensorboard=False, download=False, backbone=tiny_backbone())
    base.update(kw)
    return DTConfig(**base)


def load_cli():
    spec = importlib.util.spec_from_file_location("train_dt_cli", REPO / "scripts" / "train_dt.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def tiny_cli_args(tmp_path, *extra: str) -> list[str]:
    return ["--env", "hopper-medium", "--device", "cpu", "--train-steps", "12", "--warmup-steps", "4",
            "--batch-size", "8", "--context-len", "4", "--log-every", "4", "--eval-episodes", "0",
            "--no-tensorboard", "--no-download", "--out-dir", str(tmp_path / "cli"),
            "--backbone.d-model", "32", "--backbone.n-layers", "1", *extra]


# ------------------------------------------------------------------ data on a hand-made dataset


def hand_made() -> OfflineData:
    # episode 0: 3 steps, episode 1: 5 steps; state = [global step, 10 * episode]
    eps = []
    step = 0
    for e, n in enumerate((3, 5)):
        obs = np.array([[step + i, 10.0 * e] for i in range(n + 1)])  # Minari's extra final observation
        eps.append((obs, np.arange(step, step + n, dtype=np.float32)[:, None] * [1.0, -1.0],
                    np.arange(1, n + 1, dtype=np.float64) * (e + 1)))
        step += n
    return OfflineData.from_episodes(eps, dataset_id="hand/made-v0")


def test_offline_data_and_returns_to_go():
    d = hand_made()
    assert d.n_steps == 8 and d.state_dim == 2 and d.act_dim == 2
    assert d.episode_lengths.tolist() == [3, 5]
    assert d.observations[:, 0].tolist() == list(range(8))  # final observations dropped
    np.testing.assert_allclose(d.episode_returns, [6.0, 30.0])
    # ep0 rewards 1,2,3 -> 6,5,3 ; ep1 rewards 2,4,6,8,10 -> 30,28,24,18,10
    np.testing.assert_allclose(returns_to_go(d.rewards, d.episode_lengths), [6, 5, 3, 30, 28, 24, 18, 10])


def test_windows_left_padding_masks_rtg_normalization():
    d = hand_made()
    s = WindowSampler(d, context_len=4, return_scale=10.0, max_ep_len=4)
    mean, std = d.observations.mean(0), d.observations.std(0) + 1e-6
    np.testing.assert_allclose(s.state_mean, mean)
    np.testing.assert_allclose(s.state_std, std)
    b = s.windows(torch.tensor([1, 3, 6]))
    # start 1 (ep0, t=1): steps 1,2 then the episode ends -> 2 pads on the left
    assert b.mask.tolist() == [[False, False, True, True], [True, True, True, True], [False, False, True, True]]
    assert b.timesteps.tolist() == [[0, 0, 1, 2], [0, 1, 2, 3], [0, 0, 3, 3]]  # ep1 t=4 clamps to max_ep_len-1
    torch.testing.assert_close(b.returns_to_go[0], torch.tensor([0, 0, 0.5, 0.3]))
    torch.testing.assert_close(b.returns_to_go[1], torch.tensor([3.0, 2.8, 2.4, 1.8]))
    torch.testing.assert_close(b.returns_to_go[2], torch.tensor([0, 0, 1.8, 1.0]))
    expect_state = torch.tensor(((d.observations[[6, 7]] - mean) / std), dtype=torch.float32)
    torch.testing.assert_close(b.states[2, 2:], expect_state)
    assert (b.states[0, :2] == 0).all() and (b.actions[0, :2] == 0).all()
    torch.testing.assert_close(b.actions[1, :, 0], torch.tensor([3.0, 4, 5, 6]))
    torch.testing.assert_close(b.actions[1, :, 1], -torch.tensor([3.0, 4, 5, 6]))


def test_sampling_is_proportional_to_length_with_uniform_starts():
    d = hand_made()
    s = WindowSampler(d, context_len=4)
    torch.manual_seed(0)
    b = s.sample(40_000)
    first_valid = b.timesteps.gather(1, (~b.mask).sum(1, keepdim=True)).squeeze(1)
    ep1 = b.states[:, -1, 1] > 0  # second state feature is 10 * episode (normalized: >0 for ep1)
    assert abs(ep1.float().mean().item() - 5 / 8) < 0.01
    counts = torch.bincount(first_valid[ep1], minlength=5).float() / ep1.sum()
    assert torch.allclose(counts[:4], torch.full((4,), 0.2), atol=0.015)  # start uniform over ep1's 5 steps


# ------------------------------------------------------------------ model


def test_model_causal_and_padding_invariant():
    torch.manual_seed(0)
    m = DecisionTransformer(3, 2, tiny_backbone(dropout=0.0)).eval()
    B, K = 2, 6
    s, a, r = torch.randn(B, K, 3), torch.randn(B, K, 2), torch.randn(B, K)
    t = torch.arange(K).expand(B, K)
    mask = torch.ones(B, K, dtype=torch.bool)
    mask[1, :2] = False
    out = m(s, a, r, t, mask)
    assert out.shape == (B, K, 2) and out.abs().max() <= 1.0
    a2 = a.clone()
    a2[:, 3] += 5.0  # a_3 comes after s_3: predictions up to step 3 must not change
    s2 = s.clone()
    s2[:, 4] += 5.0
    for mod in ((s, a2), (s2, a)):
        out2 = m(mod[0], mod[1], r, t, mask)
        torch.testing.assert_close(out2[:, :4], out[:, :4])
    assert not torch.allclose(m(s, a2, r, t, mask)[:, 4:], out[:, 4:])
    s3, r3 = s.clone(), r.clone()  # padded tokens are never attended to
    s3[1, :2] = 100.0
    r3[1, :2] = -7.0
    torch.testing.assert_close(m(s3, a, r3, t, mask)[1, 2:], out[1, 2:])


def test_masked_loss_and_non_causal_backbone_refused():
    pred, tgt = torch.zeros(1, 3, 2), torch.ones(1, 3, 2)
    tgt[0, 0] = 100.0
    assert masked_action_loss(pred, tgt, torch.tensor([[False, True, True]])).item() == 1.0
    with pytest.raises(ValueError, match="causal backbone"):
        DecisionTransformer(3, 2, tiny_backbone(causal=False))
    with pytest.raises(ValueError, match="n_heads"):
        DecisionTransformer(3, 2, tiny_backbone(n_heads=3))


# ------------------------------------------------------------------ training on the real small dataset


@pytest.fixture(scope="module")
def small_data(hopper_medium_small):
    return load_offline_data(hopper_medium_small.name, download=False)


def test_training_lowers_loss(small_data, tmp_path):
    s = train(tiny_cfg(tmp_path, train_steps=300, warmup_steps=30, log_every=25, lr=1e-3), data=small_data)
    losses = [h["train/loss"] for h in s["loss_history"]]
    assert len(losses) == 12 and all(np.isfinite(losses))
    assert np.mean(losses[-2:]) < 0.75 * losses[0], losses
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["updates"] == 300 and summary["updates_per_s"] > 0 and summary["config"]["model"] == "dt"
    assert summary["config"]["backbone"]["d_model"] == 32
    assert (tmp_path / "run" / "checkpoints" / "ckpt_000000300.pt").exists()


def test_resume_continues_at_same_step_with_same_loss(small_data, tmp_path):
    kw = dict(log_every=1, train_steps=6, warmup_steps=4)
    straight = train(tiny_cfg(tmp_path / "a", **kw), data=small_data)
    first = train(tiny_cfg(tmp_path / "b", **{**kw, "train_steps": 3}), data=small_data)
    resumed = train(tiny_cfg(tmp_path / "b", **kw, resume=True, seed=99), data=small_data)  # seed comes from file
    assert first["updates"] == 3 and resumed["resumed_from_step"] == 3 and resumed["updates_this_run"] == 3
    assert [h["step"] for h in resumed["loss_history"]] == [4, 5, 6]
    want = [h["train/loss"] for h in straight["loss_history"][3:]]
    got = [h["train/loss"] for h in resumed["loss_history"]]
    assert got == pytest.approx(want, rel=1e-6, abs=1e-7)


def test_train_concurrently_isolates_runs_and_failures(small_data, tmp_path):
    """Threads share the data; a run that fails during setup (non-causal backbone) releases the
    setup lock and is reported in its slot while the others finish."""
    kw = dict(train_steps=6, warmup_steps=2, log_every=2)
    bad = tiny_cfg(tmp_path / "bad", **kw, backbone=tiny_backbone(causal=False))
    cfgs = [tiny_cfg(tmp_path / "a", seed=0, **kw), bad, tiny_cfg(tmp_path / "b", seed=1, model="bc", **kw)]
    res = train_concurrently(cfgs, data=small_data)
    assert isinstance(res[1], ValueError) and "causal" in str(res[1])
    for r, sub, model in ((res[0], "a", "dt"), (res[2], "b", "bc")):
        assert isinstance(r, dict) and r["updates"] == 6 and r["model"] == model
        assert json.loads((tmp_path / sub / "run" / "summary.json").read_text())["updates"] == 6
        assert all(np.isfinite(h["train/loss"]) for h in r["loss_history"])
    with pytest.raises(ValueError, match="same --env"):
        train_concurrently([cfgs[0], dataclasses.replace(cfgs[2], env="walker2d-medium")])


def test_init_choices():
    """gpt2 init: every embedding N(0, 0.02); authors' code: PyTorch defaults (timestep table N(0, 1))."""
    torch.manual_seed(0)
    gpt2 = DecisionTransformer(11, 3, dataclasses.replace(tiny_backbone(), d_model=64), init="gpt2")
    authors = DecisionTransformer(11, 3, dataclasses.replace(tiny_backbone(), d_model=64), init="authors")
    assert gpt2.embed_timestep.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert authors.embed_timestep.weight.std().item() == pytest.approx(1.0, rel=0.05)
    assert gpt2.embed_state.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert torch.all(gpt2.predict_action[0].bias == 0)
    with pytest.raises(ValueError, match="gpt2"):
        DecisionTransformer(11, 3, tiny_backbone(), init="xavier")


# ------------------------------------------------------------------ evaluation


def _manual_return(seed: int, action: float, max_steps: int) -> tuple[float, int]:
    env = gym.make("Hopper-v5")
    env.reset(seed=seed)
    total, n = 0.0, 0
    for _ in range(max_steps):
        _, r, te, tr, _ = env.step(np.full(3, action, dtype=np.float32))
        total, n = total + r, n + 1
        if te or tr:
            break
    env.close()
    return total, n


@pytest.mark.parametrize("vector", ["sync", "async"])
def test_evaluate_parallel_one_episode_per_env(vector):
    seen = []

    def policy(states, actions, rtg, timesteps, mask):  # target 3600 -> action 1 (falls at ~22 steps)
        seen.append((states.shape, mask[0].sum().item(), timesteps[0, -1].item()))
        act = torch.where(rtg[:, -1:] > 2.5, 1.0, 0.5)
        return act[:, :, None].expand(states.shape[0], states.shape[1], 3)

    res = evaluate(policy, "Hopper-v5", [3600.0, 1800.0], 2, state_mean=np.zeros(11), state_std=np.ones(11),
                   return_scale=1000.0, context_len=4, max_steps=40, vector=vector, seed=7)
    assert [r.target for r in res] == [3600.0, 1800.0]
    for r, action in zip(res, (1.0, 0.5)):
        for j in range(2):  # episode j uses seed 7 + j; autoreset steps after the end are not counted
            ret, n = _manual_return(7 + j, action, 40)
            assert r.lengths[j] == n < 40
            assert r.returns[j] == pytest.approx(ret, rel=1e-9)
    assert seen[0] == ((4, 4, 11), 1, 0) and seen[5][1:] == (4, 5)  # context grows, then slides


# ------------------------------------------------------------------ CLI, backbones, baselines, errors


@pytest.mark.usefixtures("hopper_medium_small")
def test_cli_backbone_swaps_and_baselines(tmp_path):
    main = load_cli()
    variants = [["--backbone.memory", "xl", "--backbone.mem-len", "8", "--backbone.position", "rope"],
                ["--model", "bc"]]
    if "performer" in rlformer.available()["attention"]:
        variants.append(["--backbone.attention", "performer"])
    for extra in variants:
        s = main(tiny_cli_args(tmp_path, *extra))
        assert s["updates"] == 12 and np.isfinite(s["final_loss"]), extra
    cfg = json.loads((tmp_path / "cli" / "summary.json").read_text())["config"]
    assert cfg["model"] in ("bc", "dt")
    s = main(tiny_cli_args(tmp_path, "--model", "bc", "--eval-episodes", "1", "--eval-max-steps", "5",
                           "--eval-vector", "sync", "--train-steps", "4"))
    assert set(s["normalized_score"]) == {"3600", "1800"} and s["reference_scores"]["source"] == "minari metadata"


def test_results_in_process_training_then_evaluation_processes(hopper_medium_small, tmp_path):
    """run_dt_results --in-process: runs train as threads, then each final checkpoint is evaluated by its own
    --resume process (no further updates) and the evaluation is merged into the training summary."""
    spec = importlib.util.spec_from_file_location("run_dt_results", REPO / "scripts" / "run_dt_results.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod                     # dataclasses look their module up there
    spec.loader.exec_module(mod)
    extra = ("--train-steps 6 --warmup-steps 2 --batch-size 8 --context-len 4 --log-every 2 --eval-episodes 2 "
             "--eval-max-steps 5 --no-tensorboard --backbone.d-model 32 --backbone.n-layers 1")
    mod.main(["--in-process", "--models", "dt", "bc", "--seeds", "0", "--preset", "quick", "--device", "cpu",
              "--dataset-root", str(hopper_medium_small.root), f"--extra={extra}",
              "--out-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "table.md")])
    runs = json.loads((tmp_path / "table.json").read_text())["runs"]
    assert [(r["model"], r["rc"]) for r in runs] == [("dt", 0), ("bc", 0)]
    for r in runs:
        s = r["summary"]
        assert s["updates_this_run"] == 6 and s["updates_per_s"] > 0           # the training thread's numbers
        assert set(s["normalized_score"]) == {"3600", "1800"} and s["eval_episodes_per_target"] == 2
        log = (tmp_path / "runs" / f"{r['model']}-seed0" / "eval_log.txt").read_text()
        assert "at update 6" in log and "0 updates" in log                     # evaluation only, same weights
        on_disk = json.loads((tmp_path / "runs" / f"{r['model']}-seed0" / "summary.json").read_text())
        assert on_disk["normalized_score"] == s["normalized_score"] and on_disk["updates_this_run"] == 6
        assert on_disk["config"]["train_steps"] == 6 and on_disk["config"]["model"] == r["model"]
    assert "| dt | 1/1 |" in (tmp_path / "table.md").read_text()


def test_cli_non_causal_backbone_exits_cleanly(hopper_medium_small, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        load_cli()(tiny_cli_args(tmp_path, "--backbone.no-causal"))
    assert e.value.code != 0 and "causal backbone" in capsys.readouterr().err


def test_offline_error_message_and_exit(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "empty"))
    with pytest.raises(SystemExit) as e:
        load_cli()(tiny_cli_args(tmp_path))
    err = capsys.readouterr().err
    assert e.value.code != 0 and "scripts/collect_dataset.py --env hopper-medium" in err
    assert "Traceback" not in err


def test_presets():
    q = resolve_preset(DTConfig())
    p = resolve_preset(DTConfig(preset="paper"))
    assert (p.train_steps, p.warmup_steps, p.eval_episodes) == (100_000, 10_000, 100)
    assert q.train_steps < p.train_steps and q.eval_targets == p.eval_targets == (3600.0, 1800.0)
    assert resolve_preset(DTConfig(train_steps=7)).train_steps == 7
    b = p.backbone
    assert (b.n_layers, b.d_model, b.n_heads, b.dropout, b.block, b.position, b.activation, b.ff_width) == \
        (3, 128, 1, 0.1, "pre_ln", "none", "relu", 512)


def test_hf_baseline_same_signature(tmp_path):
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tiny_cfg(tmp_path, model="hf")
    m = build_model(cfg, 3, 2)
    d = hand_made()
    s = WindowSampler(OfflineData(np.random.randn(8, 3), np.random.rand(8, 2).astype(np.float32), d.rewards,
                                  d.episode_lengths), context_len=4)
    opt, sched = make_optimizer(m, cfg.resolved(), torch.device("cpu"))
    up = Updater(m, s, opt, sched, batch_size=8, grad_clip=0.25, device=torch.device("cpu"))
    for _ in range(5):
        up.step()
    loss, gn = up.pop_means(5)
    assert torch.isfinite(loss) and gn > 0
    assert m(*s.sample(3).as_tuple()).shape == (3, 4, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a GPU")
def test_cuda_graph_update_matches_eager():
    """The captured update (replayed) computes what the eager update computes, batch for batch."""
    d = hand_made()
    rng = np.random.default_rng(0)
    data = OfflineData(rng.standard_normal((8, 3)), rng.random((8, 2)).astype(np.float32), d.rewards,
                       d.episode_lengths)
    dev = torch.device("cuda")
    plan = torch.randint(0, 8, (8, 8), generator=torch.Generator().manual_seed(0)).to(dev)
    losses = {}
    for graph in (False, True):
        torch.manual_seed(1)
        cfg = tiny_cfg(Path("/tmp"), backbone=tiny_backbone(dropout=0.0)).resolved()
        m = build_model(cfg, 3, 2).to(dev)
        s = WindowSampler(data, context_len=4, device=dev)
        starts = torch.zeros(8, dtype=torch.long, device=dev)  # static buffer: the graph reads it on replay
        s.sample = lambda batch_size, generator=None, s=s, starts=starts: s.windows(starts)
        opt, sched = make_optimizer(m, cfg, dev, capturable=graph)
        up = Updater(m, s, opt, sched, 8, 0.25, dev, graph=graph, warmup=2)
        out = []
        for i in range(8):
            starts.copy_(plan[i])
            up.step()
            out.append(up.pop_means(1)[0].item())
        assert (up.graph is not None) == graph
        losses[graph] = out
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-4)


@pytest.mark.parametrize("backbone_kw", [dict(depth="act"), dict(attention="adaptive_span")])
def test_backbone_aux_loss_reaches_training(backbone_kw, tmp_path, monkeypatch):
    """ACT's ponder cost / adaptive span's penalty are part of the training loss, not dropped."""
    torch.manual_seed(0)
    backbone = dataclasses.replace(default_backbone(), d_model=32, n_layers=2, dropout=0.0, **backbone_kw)
    model = DecisionTransformer(3, 2, backbone, max_ep_len=50)
    b, k = 2, 5
    args = (torch.randn(b, k, 3), torch.randn(b, k, 2), torch.randn(b, k), torch.arange(k).expand(b, k),
            torch.ones(b, k, dtype=torch.bool))
    pred, aux = model(*args, return_aux=True)
    torch.testing.assert_close(pred, model(*args))
    assert aux.requires_grad and float(aux) > 0
    # With the action loss zeroed, any gradient an update produces comes from the aux loss.
    import agents.dt.train as train_module
    monkeypatch.setattr(train_module, "masked_action_loss", lambda pred, target, mask: pred.sum() * 0)
    d = hand_made()
    s = WindowSampler(OfflineData(np.random.randn(8, 3), np.random.rand(8, 2).astype(np.float32), d.rewards,
                                  d.episode_lengths), context_len=4)
    opt, sched = make_optimizer(model, tiny_cfg(tmp_path).resolved(), torch.device("cpu"))
    up = Updater(model, s, opt, sched, batch_size=4, grad_clip=0.25, device=torch.device("cpu"))
    up.step()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())

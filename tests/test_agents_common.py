"""agents.common: run dir, TensorBoard logger, checkpoints (exact resume), summary.json, seeding, device."""
from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from agents.common import (
    RunLogger,
    gpu_memory_mb,
    latest_checkpoint,
    load_checkpoint,
    make_run_dir,
    progress,
    resolve_device,
    save_checkpoint,
    seed_everything,
    to_jsonable,
    write_summary,
)

torch.set_num_threads(1)


def test_make_run_dir(tmp_path):
    assert make_run_dir(tmp_path / "x") == tmp_path / "x" and (tmp_path / "x").is_dir()
    d = make_run_dir(None, name="abc", root=tmp_path / "runs")
    assert d == tmp_path / "runs" / "abc" and d.is_dir()
    auto = make_run_dir(None, root=tmp_path / "runs")
    assert auto.name.startswith("run-")


def test_run_logger_writes_event_file_and_reads_tensors_once(tmp_path):
    with RunLogger(tmp_path) as log:
        out = log.scalars({"loss": torch.tensor(0.5), "lr": 1e-4, "n": torch.tensor(3)}, step=7, prefix="train/")
        log.scalar("eval/return", np.float32(12.5), step=7)
    assert out == {"train/loss": 0.5, "train/lr": 1e-4, "train/n": 3.0}
    assert log.last["eval/return"] == 12.5
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"train/loss", "train/lr", "train/n", "eval/return"}
    (ev,) = acc.Scalars("train/loss")
    assert ev.step == 7 and ev.value == pytest.approx(0.5)


def test_disabled_logger_and_progress(tmp_path):
    log = RunLogger(tmp_path / "off", enabled=False)
    assert log.scalar("a", 1.0, 0) == 1.0 and not (tmp_path / "off" / "tb").exists()
    bar = progress(5, initial=2, disable=True)
    assert list(bar) == [2, 3, 4]
    assert gpu_memory_mb("cpu") == {}


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 2)
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.lin(x))


def _train_steps(net, opt, sched, n):
    losses = []
    for _ in range(n):
        x = torch.randn(8, 4)
        loss = net(x).pow(2).mean() + random.random() * 0 + float(np.random.rand()) * 1e-3
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def _fresh(seed=0):
    seed_everything(seed)
    net = _Net()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5))
    return net, opt, sched


def test_checkpoint_resume_is_exact(tmp_path):
    net, opt, sched = _fresh()
    _train_steps(net, opt, sched, 3)
    save_checkpoint(tmp_path, 3, net, opt, sched, extra={"obs_mean": np.arange(3.0)})
    expected = _train_steps(net, opt, sched, 4)  # continues from the same RNG state

    net2, opt2, sched2 = _fresh(seed=123)  # different init and RNG: everything must come from the file
    info = load_checkpoint(tmp_path, net2, opt2, sched2)
    assert info["step"] == 3 and np.array_equal(info["extra"]["obs_mean"], np.arange(3.0))
    assert sched2.last_epoch == 3
    assert _train_steps(net2, opt2, sched2, 4) == expected


def test_checkpoint_keep_latest_atomic_and_compiled_names(tmp_path):
    net = _Net()
    for step in (1, 20, 300):
        save_checkpoint(tmp_path, step, net, keep=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["ckpt_000000020.pt", "ckpt_000000300.pt"]  # no temp files left, oldest pruned
    assert latest_checkpoint(tmp_path).name == "ckpt_000000300.pt"
    assert latest_checkpoint(tmp_path / "ckpt_000000020.pt").name == "ckpt_000000020.pt"
    assert latest_checkpoint(tmp_path / "missing") is None
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing", net)

    class Wrapped(torch.nn.Module):  # what torch.compile returns: the real module under _orig_mod
        def __init__(self, m):
            super().__init__()
            self._orig_mod = m

    save_checkpoint(tmp_path / "w", 5, Wrapped(net))
    payload = torch.load(latest_checkpoint(tmp_path / "w"), weights_only=False)
    assert set(payload["model"]) == {"lin.weight", "lin.bias"}


@dataclasses.dataclass
class _Inner:
    d: int = 3
    t: tuple = (1, 2)


@dataclasses.dataclass
class _Cfg:
    name: str = "x"
    path: Path = Path("/tmp/a")
    inner: _Inner = dataclasses.field(default_factory=_Inner)


def test_summary_json(tmp_path):
    res = {"final_return": {3600: np.float64(1.5)}, "scores": np.array([1.0, 2.0]), "nan": float("nan"),
           "t": torch.tensor(2.5)}
    path = write_summary(tmp_path, res, _Cfg())
    data = json.loads(path.read_text())
    assert data == {"final_return": {"3600": 1.5}, "scores": [1.0, 2.0], "nan": None, "t": 2.5,
                    "config": {"name": "x", "path": "/tmp/a", "inner": {"d": 3, "t": [1, 2]}}}
    assert to_jsonable(_Inner) == str(_Inner)  # a class is not an instance


def test_seed_everything_repeats():
    def draw():
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    seed_everything(5)
    a = draw()
    seed_everything(5)
    assert draw() == a


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="use 'auto'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")

"""Checkpoints that resume a run exactly: model, optimizer, scheduler, RNG states, step, extra state.

    save_checkpoint(run_dir / "checkpoints", step, model, opt, sched, extra={"obs_mean": m})
    ckpt = latest_checkpoint(run_dir / "checkpoints")          # None when there is none
    info = load_checkpoint(ckpt, model, opt, sched)          # -> {"step": ..., "extra": {...}}

Files are ``ckpt_<step>.pt``, written to a temporary file and renamed (a crash never leaves
a half-written checkpoint); ``keep`` newest are kept. Compiled models (``torch.compile``)
are saved by their underlying module, so compiled and eager runs share checkpoints.
"""
from __future__ import annotations

import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

_CKPT_RE = re.compile(r"^ckpt_(\d+)\.pt$")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module under ``torch.compile``'s wrapper (``_orig_mod``), or ``model`` itself."""
    return getattr(model, "_orig_mod", model)


def get_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and (when present) every CUDA device's generator state."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``get_rng_state`` returned (CUDA states only when the device count matches)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


def checkpoint_step(path: str | os.PathLike) -> Optional[int]:
    m = _CKPT_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """``ckpt_<step>.pt`` files in ``directory``, oldest step first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if checkpoint_step(p) is not None]
    return sorted(found, key=lambda p: checkpoint_step(p))


def latest_checkpoint(path: str | os.PathLike) -> Optional[Path]:
    """``path`` itself if it is a file; else the highest-step checkpoint in the directory (None if none)."""
    p = Path(path)
    if p.is_file():
        return p
    found = list_checkpoints(p)
    return found[-1] if found else None


def save_checkpoint(directory: str | os.PathLike, step: int, model: nn.Module,
                    optimizer: Optional[torch.optim.Optimizer] = None, scheduler: Any = None,
                    extra: Optional[dict] = None, keep: int = 2) -> Path:
    """Write ``directory/ckpt_<step>.pt`` atomically; delete all but the ``keep`` newest (``keep<=0``: none)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    payload = {
        "step": int(step),
        "model": unwrap_model(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": get_rng_state(),
        "extra": extra or {},
    }
    path = d / f"ckpt_{int(step):09d}.pt"
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".ckpt_", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if keep > 0:
        for old in list_checkpoints(d)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | os.PathLike, model: Optional[nn.Module] = None,
                    optimizer: Optional[torch.optim.Optimizer] = None, scheduler: Any = None,
                    restore_rng: bool = True, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint (a file, or the latest in a directory) into the given objects.

    Returns ``{"step", "extra", "path"}``. Raises FileNotFoundError when there is none.
    """
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoint (ckpt_<step>.pt) found at {path}")
    payload = torch.load(ckpt, map_location=map_location, weights_only=False)
    if model is not None:
        unwrap_model(model).load_state_dict(payload["model"])
    if optimizer is not None and payload.get("optimizer") is not None:
        optimizer.load_state_dict(payload["optimizer"])
    if scheduler is not None and payload.get("scheduler") is not None:
        scheduler.load_state_dict(payload["scheduler"])
    if restore_rng and payload.get("rng") is not None:
        set_rng_state(payload["rng"])
    return {"step": payload["step"], "extra": payload.get("extra", {}), "path": ckpt}

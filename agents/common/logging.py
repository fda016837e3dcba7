"""Run directory, TensorBoard scalars, progress bar, GPU memory.

    run_dir = make_run_dir(cfg.out_dir, name="dt-hopper-medium-seed0")   # runs/<name>/ or --out-dir
    with RunLogger(run_dir) as log:
        for step in progress(total, initial=start, desc="train"):
            ...
            if step % log_every == 0:
                log.scalars({"train/loss": loss, **gpu_memory_mb(device)}, step)

Values may be tensors: they are read (one host sync) only when logged, so a training loop
syncs once per logging interval, not once per step.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import torch


def make_run_dir(out_dir: Optional[str | os.PathLike] = None, name: Optional[str] = None,
                 root: str | os.PathLike = "runs") -> Path:
    """``out_dir`` when given, else ``root/name`` (``name`` default: ``run-<date>-<time>``); created."""
    if out_dir is not None and str(out_dir) != "":
        path = Path(out_dir)
    else:
        path = Path(root) / (name or time.strftime("run-%Y%m%d-%H%M%S"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _to_float(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().item())
    return float(value)


class RunLogger:
    """TensorBoard ``SummaryWriter`` under ``run_dir/tb`` with float/tensor scalars.

    ``last`` keeps the latest value of every tag (handy for summaries and tests).
    ``enabled=False`` makes every call a no-op except ``last`` bookkeeping.
    """

    def __init__(self, run_dir: str | os.PathLike, enabled: bool = True, subdir: str = "tb"):
        self.run_dir = Path(run_dir)
        self.last: dict[str, float] = {}
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter  # lazy: tensorboard import is slow

            self.writer = SummaryWriter(log_dir=str(self.run_dir / subdir))

    def scalar(self, tag: str, value: Any, step: int) -> float:
        v = _to_float(value)
        self.last[tag] = v
        if self.writer is not None:
            self.writer.add_scalar(tag, v, global_step=int(step))
        return v

    def scalars(self, values: Mapping[str, Any], step: int, prefix: str = "") -> dict[str, float]:
        """Log every ``prefix + tag: value``; tensors are stacked and read with one host sync."""
        tags = [prefix + k for k in values]
        vals = list(values.values())
        tensor_idx = [i for i, v in enumerate(vals) if isinstance(v, torch.Tensor)]
        if tensor_idx:  # one device->host copy for all tensor values
            host = torch.stack([vals[i].detach().float().reshape(()) for i in tensor_idx]).cpu().tolist()
            for i, h in zip(tensor_idx, host):
                vals[i] = h
        return {t: self.scalar(t, v, step) for t, v in zip(tags, vals)}

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, global_step=step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def __enter__(self) -> "RunLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(total: int, initial: int = 0, desc: str = "", disable: Optional[bool] = None,
             unit: str = "it", **kwargs) -> "Iterable[int]":
    """A tqdm bar over ``range(initial, total)`` (``bar.set_postfix(...)`` works on the result).

    ``disable=None`` hides it when stderr is not a terminal and ``RLFORMER_PROGRESS`` is unset, so
    logs of batch jobs stay readable; ``RLFORMER_PROGRESS=1`` forces it on, ``0`` off.
    """
    from tqdm.auto import tqdm

    if disable is None:
        env = os.environ.get("RLFORMER_PROGRESS")
        disable = (env == "0") if env is not None else None  # tqdm: None = off when not a tty
    return tqdm(range(initial, total), total=total, initial=initial, desc=desc, disable=disable,
                unit=unit, dynamic_ncols=True, mininterval=1.0, **kwargs)


def gpu_memory_mb(device: torch.device | str | None = None, prefix: str = "gpu/") -> dict[str, float]:
    """``{gpu/mem_allocated_mb, gpu/max_mem_allocated_mb, gpu/mem_reserved_mb}`` on CUDA; ``{}`` otherwise."""
    dev = torch.device(device) if device is not None else None
    if dev is None or dev.type != "cuda" or not torch.cuda.is_available():
        return {}
    mb = 1024.0 ** 2
    return {
        f"{prefix}mem_allocated_mb": torch.cuda.memory_allocated(dev) / mb,
        f"{prefix}max_mem_allocated_mb": torch.cuda.max_memory_allocated(dev) / mb,
        f"{prefix}mem_reserved_mb": torch.cuda.memory_reserved(dev) / mb,
    }

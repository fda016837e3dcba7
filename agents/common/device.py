"""``--device auto|cpu|cuda|cuda:N`` -> a torch.device, with a clear error when CUDA is missing."""
from __future__ import annotations

import torch


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto``: the first CUDA GPU when one is usable, else CPU. ``cuda`` without a GPU raises ValueError."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError as e:
        raise ValueError(f"unknown device {spec!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r} was asked for but CUDA is not available on this machine "
                             f"(torch {torch.__version__}); use --device cpu or --device auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {spec!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    elif dev.type != "cpu":
        raise ValueError(f"device {spec!r} is not supported; use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    return dev

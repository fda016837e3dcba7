"""Offline dataset names, local-first resolution, and reference scores.

Users type D4RL-style short names (``hopper-medium``) or full Minari ids
(``mujoco/hopper/medium-v0``). Resolution looks in Minari's local store first; Minari's
hub is tried only when ``download`` is true and the hub answers a quick connect, so an
offline machine fails in about two seconds with a message that says how to build the
dataset locally (``python scripts/collect_dataset.py --env NAME``).
"""
from __future__ import annotations

import difflib
import math
import os
import re
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, NoReturn
from urllib.parse import urlparse

import numpy as np

if TYPE_CHECKING:  # minari is imported lazily: `import envs` stays light.
    import minari

# Minari's `mujoco` namespace as published on its hub (checked against the hub's
# namespace listing). Only combinations known to exist are listed: the locomotion tasks
# have simple/medium/expert, except walker2d (medium/expert only as far as we can
# verify); the pendulums, pusher, reacher and swimmer have medium/expert only;
# humanoidstandup is left out (no dataset published when this was written). Any other
# dataset can still be named by its full Minari id.
_MUJOCO_LEVELS: dict[str, tuple[str, ...]] = {
    "ant": ("simple", "medium", "expert"),
    "halfcheetah": ("simple", "medium", "expert"),
    "hopper": ("simple", "medium", "expert"),
    "humanoid": ("simple", "medium", "expert"),
    "walker2d": ("medium", "expert"),
    "inverteddoublependulum": ("medium", "expert"),
    "invertedpendulum": ("medium", "expert"),
    "pusher": ("medium", "expert"),
    "reacher": ("medium", "expert"),
    "swimmer": ("medium", "expert"),
}

#: short name -> Minari dataset id, e.g. ``"hopper-medium" -> "mujoco/hopper/medium-v0"``.
SHORT_NAMES: dict[str, str] = {
    f"{env}-{level}": f"mujoco/{env}/{level}-v0" for env, levels in _MUJOCO_LEVELS.items() for level in levels
}

#: Minari env folder -> the Gymnasium environment its datasets were collected on.
GYM_ENV_IDS: dict[str, str] = {
    "ant": "Ant-v5",
    "halfcheetah": "HalfCheetah-v5",
    "hopper": "Hopper-v5",
    "humanoid": "Humanoid-v5",
    "humanoidstandup": "HumanoidStandup-v5",
    "walker2d": "Walker2d-v5",
    "inverteddoublependulum": "InvertedDoublePendulum-v5",
    "invertedpendulum": "InvertedPendulum-v5",
    "pusher": "Pusher-v5",
    "reacher": "Reacher-v5",
    "swimmer": "Swimmer-v5",
}

#: D4RL's reference returns (random, expert) from d4rl/infos.py, per task family.
D4RL_REF_SCORES: dict[str, tuple[float, float]] = {
    "hopper": (-20.272305, 3234.3),
    "halfcheetah": (-280.178953, 12135.0),
    "walker2d": (1.629008, 4592.3),
    "ant": (-325.6, 3879.7),
}

COLLECT_SCRIPT = "scripts/collect_dataset.py"
_HUB_TIMEOUT_S = 2.0
_ID_RE = re.compile(r"^[\w.-]+(/[\w.-]+)*-v\d+$")


class DatasetError(Exception):
    """Base of rlformer's dataset errors: each message says what was wrong and how to fix it."""


class UnknownDatasetError(DatasetError, ValueError):
    """A dataset name that is neither a known short name nor a Minari id."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """A known dataset with no local copy that could not (or may not) be downloaded."""


class RefScores(NamedTuple):
    """Reference returns for normalized scores and where they came from."""

    min: float
    max: float
    source: str  # "minari metadata" or "D4RL"


def known_names() -> list[str]:
    """All short names, sorted."""
    return sorted(SHORT_NAMES)


def dataset_id(name: str) -> str:
    """The Minari id for a short name or a full Minari id (returned as is); no I/O."""
    name = name.strip()
    if name in SHORT_NAMES:
        return SHORT_NAMES[name]
    if "/" in name and _ID_RE.match(name):
        return name
    candidates = known_names() + sorted(SHORT_NAMES.values())
    close = difflib.get_close_matches(name, candidates, n=4, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise UnknownDatasetError(
        f"unknown dataset {name!r}.{hint} Expected a short name ({', '.join(known_names())}) "
        "or a full Minari id such as 'mujoco/hopper/medium-v0'."
    )


def short_name(name_or_id: str) -> str | None:
    """The short name for a dataset id (or short name), or None if it has none."""
    did = dataset_id(name_or_id)
    return next((k for k, v in SHORT_NAMES.items() if v == did), None)


def env_family(name_or_id: str) -> str:
    """The task folder of a dataset id: ``mujoco/hopper/medium-v0`` -> ``hopper``."""
    parts = dataset_id(name_or_id).split("/")
    return parts[-2] if len(parts) >= 2 else parts[0].rsplit("-v", 1)[0]


def gym_env_id(name_or_id: str) -> str:
    """The Gymnasium id a dataset's data comes from (``hopper-medium`` -> ``Hopper-v5``)."""
    fam = env_family(name_or_id)
    if fam not in GYM_ENV_IDS:
        raise UnknownDatasetError(
            f"no Gymnasium environment is known for dataset {dataset_id(name_or_id)!r} "
            f"(task {fam!r}); known tasks: {sorted(GYM_ENV_IDS)}. Name the environment explicitly "
            "(collect_dataset.py --gym-env ID)."
        )
    return GYM_ENV_IDS[fam]


def local_root() -> Path:
    """Minari's local store: ``$MINARI_DATASETS_PATH`` or ``~/.minari/datasets`` (as minari computes it)."""
    from minari.storage import get_dataset_path

    return Path(get_dataset_path())


def local_path(name_or_id: str) -> Path:
    """Where Minari keeps (or would keep) this dataset locally."""
    from minari.storage import get_dataset_path

    return Path(get_dataset_path(dataset_id(name_or_id)))


def is_local(name_or_id: str) -> bool:
    """Whether the dataset has a local copy (the test minari.load_dataset itself uses)."""
    return (local_path(name_or_id) / "data").exists()


def build_command(name_or_id: str) -> str:
    """The command that builds this dataset locally."""
    return f"python {COLLECT_SCRIPT} --env {short_name(name_or_id) or dataset_id(name_or_id)}"


def _hub_host() -> str:
    remote = os.environ.get("MINARI_REMOTE", "hf://farama-minari")
    if remote.startswith("gcp://"):
        return "storage.googleapis.com"
    return urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"


def _hub_reachable(timeout: float = _HUB_TIMEOUT_S, host: str | None = None, port: int = 443) -> bool:
    """A TCP connect to Minari's hub (``host``: default the hub) within ``timeout`` s, DNS included."""
    import socket

    ok: list[bool] = []
    host = host or _hub_host()

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(ok)


def _download(did: str) -> None:
    """Minari's own download (kept separate so tests can replace it)."""
    import minari

    minari.download_dataset(did)


def _not_found(did: str, reason: str) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"dataset {did!r} is not available: {reason}\n"
        f"  looked for a local copy in: {local_path(did)}\n"
        f"  build it locally with:      {build_command(did)}\n"
        f"  (or point MINARI_DATASETS_PATH at a Minari store that holds it)"
    )


def resolve_dataset(name: str, download: bool = True) -> str:
    """The Minari id of ``name``, ensuring a local copy exists (downloading only if allowed)."""
    did = dataset_id(name)
    if is_local(did):
        return did
    if not download:
        raise _not_found(did, "no local copy, and downloading is off")
    if not _hub_reachable():
        raise _not_found(
            did, f"no local copy, and Minari's hub ({_hub_host()}) cannot be reached from this machine"
        )
    try:
        _download(did)
    except Exception as e:  # minari raises ValueError/HTTP/OS errors alike
        raise _not_found(did, f"no local copy, and the download failed ({type(e).__name__}: {e})") from e
    if not is_local(did):
        raise _not_found(did, "the download finished but left no local copy")
    return did


def load_dataset(name: str, download: bool = True) -> minari.MinariDataset:
    """The ``minari.MinariDataset`` for a short name or Minari id, local copy first."""
    import minari

    return minari.load_dataset(resolve_dataset(name, download=download))


def reference_scores(dataset: minari.MinariDataset | str) -> RefScores:
    """(min, max, source): the dataset's Minari ref scores when present, else D4RL's."""
    if isinstance(dataset, str):
        did = dataset_id(dataset)
        meta = {}
        if is_local(did):
            from minari.dataset.minari_storage import MinariStorage

            meta = MinariStorage.read_raw_metadata(str(local_path(did) / "data"))
    else:
        meta = dataset.storage.metadata
        did = meta.get("dataset_id") or dataset.spec.dataset_id
    lo, hi = meta.get("ref_min_score"), meta.get("ref_max_score")
    if lo is not None and hi is not None:
        return RefScores(float(lo), float(hi), "minari metadata")
    fam = env_family(did)
    if fam in D4RL_REF_SCORES:
        return RefScores(*D4RL_REF_SCORES[fam], "D4RL")
    raise DatasetError(
        f"no reference scores for {did!r}: its metadata has no ref_min_score/ref_max_score and "
        f"D4RL has none for task {fam!r} (known: {sorted(D4RL_REF_SCORES)}). Pass ref scores "
        "explicitly, or rebuild the dataset with --ref-min-score/--ref-max-score."
    )


def normalized_score(ret, ref: RefScores | tuple[float, float] | minari.MinariDataset | str):
    """D4RL-style score 100 * (R - R_min) / (R_max - R_min); ``ref`` is (min, max) or a dataset."""
    if isinstance(ref, tuple):
        lo, hi = float(ref[0]), float(ref[1])
    else:
        lo, hi, _ = reference_scores(ref)
    if not math.isfinite(hi - lo) or hi == lo:
        raise ValueError(f"reference scores must differ and be finite, got min={lo}, max={hi}")
    out = 100.0 * (np.asarray(ret, dtype=np.float64) - lo) / (hi - lo)
    return float(out) if out.ndim == 0 else out


def exit_with_message(err: BaseException | str, code: int = 2) -> NoReturn:
    """For scripts: print a user-actionable error without a traceback and exit."""
    print(f"error: {err}", file=sys.stderr, flush=True)
    raise SystemExit(code)

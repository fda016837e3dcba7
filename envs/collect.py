"""Build a Minari dataset locally with the recipe of Minari's own MuJoCo datasets.

Recipe: an SB3 SAC behaviour policy (loaded, or trained here to a target return), rolled
out with stochastic actions, episode i seeded ``seed_start + i``, until ``steps`` steps
are collected; written with ``minari.create_dataset_from_buffers``. Episodes are seeded
one by one, so the result does not depend on the number of workers, and for
``hopper-medium`` with the shipped policy it matches ``shared/datasets/rebuild_hopper_medium.py``.
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import shutil
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from envs.datasets import (
    D4RL_REF_SCORES,
    DatasetError,
    dataset_id,
    env_family,
    gym_env_id,
    short_name,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO_ROOT.parent / "shared" / "datasets"
#: Behaviour policies known for short names: file names looked up in policies/ then shared/.
DEFAULT_POLICY_FILES = {"hopper-medium": "hopper_medium_sac.zip"}


class DatasetExistsError(DatasetError, FileExistsError):
    """The dataset to build is already in the target store."""


@dataclass
class CollectConfig:
    """Build a Minari dataset locally: SB3 SAC behaviour policy, seeded stochastic rollouts."""

    env: str = "hopper-medium"
    """Short name (hopper-medium) or full Minari id of the dataset to build."""
    policy: str | None = None
    """SB3 SAC .zip to roll out; default: the shipped policy for the name, else train one."""
    steps: int = 1_000_000
    """Collect whole episodes until at least this many steps."""
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    """Parallel rollout processes (spawn; 1 torch thread each)."""
    seed_start: int = 123
    """Episode i is seeded seed_start + i (env reset, torch sampling)."""
    root: str | None = None
    """Minari store to write to; default: MINARI_DATASETS_PATH or ~/.minari/datasets."""
    overwrite: bool = False
    """Replace an existing dataset with the same id in the store."""
    train: bool = False
    """Train a new SAC policy even when one is shipped for this dataset."""
    gym_env: str | None = None
    """Gymnasium env id; default: the one Minari's dataset uses (e.g. Hopper-v5)."""
    train_steps: int = 1_000_000
    """When training a policy: most environment steps of SAC."""
    target_return: float | None = None
    """When training: stop once the deterministic evaluation mean reaches this return."""
    eval_every: int = 10_000
    """When training: evaluate every this many steps."""
    eval_episodes: int = 5
    """When training: episodes per evaluation."""
    train_seed: int = 0
    """When training: SAC seed."""
    save_policy: str | None = None
    """When training: where to save the policy; default runs/policies/<name>_sac.zip."""
    ref_min_score: float | None = None
    """Reference return for normalized score 0; default D4RL's random return when known."""
    ref_max_score: float | None = None
    """Reference return for normalized score 100; default D4RL's expert return when known."""
    author: str = "rlformer maintainers (local rebuild)"
    """Author recorded in the dataset metadata."""


@dataclass
class CollectResult:
    """What was built: id, store, size, per-episode returns, where, and how long it took."""

    dataset_id: str
    root: Path
    episodes: int
    steps: int
    returns: np.ndarray
    path: Path
    policy: Path
    seconds: float

    def summary(self) -> str:
        r = self.returns
        return (
            f"{self.dataset_id}: {self.episodes} episodes, {self.steps} steps, return mean {r.mean():.1f}, "
            f"median {np.median(r):.1f}, min {r.min():.1f}, max {r.max():.1f} "
            f"({self.seconds:.1f} s) -> {self.path}"
        )


def default_policy(name: str) -> Path | None:
    """The shipped behaviour policy for a dataset, if any (policies/ first, then ../shared)."""
    fname = DEFAULT_POLICY_FILES.get(short_name(name) or "")
    if fname is None:
        return None
    for p in (REPO_ROOT / "policies" / fname, SHARED_DATASETS / fname):
        if p.is_file():
            return p
    return None


@contextlib.contextmanager
def minari_root(root: str | os.PathLike | None) -> Iterator[Path]:
    """Point minari at ``root`` (None: leave as is) for the duration; yields the store path."""
    from minari.storage import get_dataset_path

    old = os.environ.get("MINARI_DATASETS_PATH")
    if root is not None:
        os.environ["MINARI_DATASETS_PATH"] = str(Path(root).expanduser().resolve())
    try:
        yield Path(get_dataset_path())
    finally:
        if root is not None:
            if old is None:
                os.environ.pop("MINARI_DATASETS_PATH", None)
            else:
                os.environ["MINARI_DATASETS_PATH"] = old


# ---------------------------------------------------------------- training


def train_policy(cfg: CollectConfig, env_id: str, out: Path) -> Path:
    """Train SB3 SAC on ``env_id``, evaluating periodically; stop at ``cfg.target_return``."""
    import gymnasium as gym
    import torch
    from stable_baselines3 import SAC
    from stable_baselines3.common.callbacks import EvalCallback, StopTrainingOnRewardThreshold
    from stable_baselines3.common.monitor import Monitor

    torch.set_num_threads(1)
    env = Monitor(gym.make(env_id))
    eval_env = Monitor(gym.make(env_id))
    eval_env.reset(seed=cfg.train_seed + 10_000)
    stop = None
    if cfg.target_return is not None:
        stop = StopTrainingOnRewardThreshold(reward_threshold=cfg.target_return, verbose=1)
    evaluator = EvalCallback(
        eval_env,
        callback_on_new_best=stop,
        n_eval_episodes=cfg.eval_episodes,
        eval_freq=cfg.eval_every,
        deterministic=True,
        verbose=1,
    )
    model = SAC("MlpPolicy", env, seed=cfg.train_seed, device="cpu", verbose=0)
    target = "no target" if cfg.target_return is None else f"target return {cfg.target_return}"
    print(f"training SAC on {env_id}: up to {cfg.train_steps} steps, {target}, "
          f"evaluating every {cfg.eval_every} steps", flush=True)
    model.learn(total_timesteps=cfg.train_steps, callback=evaluator)
    reached = cfg.target_return is not None and evaluator.best_mean_reward >= cfg.target_return
    print(f"trained {model.num_timesteps} steps; best evaluation {evaluator.best_mean_reward:.1f}"
          + ("" if cfg.target_return is None else f" ({'reached' if reached else 'did NOT reach'} {target})"),
          flush=True)
    if out.suffix != ".zip":
        out = out.with_name(out.name + ".zip")
    out.parent.mkdir(parents=True, exist_ok=True)
    model.save(out)
    print(f"saved policy to {out}", flush=True)
    return out


# ---------------------------------------------------------------- rollouts

_WORKER: dict = {}


def _init_worker(policy_path: str, env_id: str) -> None:
    import gymnasium as gym
    import torch
    from stable_baselines3 import SAC

    torch.set_num_threads(1)
    _WORKER["model"] = SAC.load(policy_path, device="cpu")
    _WORKER["env"] = gym.make(env_id)


def _rollout(seed: int):
    """One episode with stochastic actions, seeded like the shared rebuild script."""
    import torch

    model, env = _WORKER["model"], _WORKER["env"]
    torch.manual_seed(seed)
    obs, _ = env.reset(seed=seed)
    env.action_space.seed(seed)
    O, A, R, TE, TR = [obs], [], [], [], []
    while True:
        act, _ = model.predict(obs, deterministic=False)
        obs, r, te, tr, _ = env.step(act)
        O.append(obs); A.append(act); R.append(r); TE.append(te); TR.append(tr)
        if te or tr:
            break
    return seed, np.array(O), np.array(A, dtype=np.float32), np.array(R), np.array(TE), np.array(TR)


def rollout_episodes(policy: Path, env_id: str, steps: int, workers: int, seed_start: int) -> list[tuple]:
    """Episodes seeded seed_start, seed_start+1, ... in order, until at least ``steps`` steps."""
    episodes, total, next_seed = [], 0, seed_start
    batch = 8 * workers
    t0 = time.time()
    with mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(str(policy), env_id)) as pool:
        while total < steps:
            seeds = list(range(next_seed, next_seed + batch))
            next_seed += batch
            for ep in pool.map(_rollout, seeds, chunksize=1):
                if total >= steps:
                    break
                episodes.append(ep)
                total += len(ep[2])
            print(f"  {total:,}/{steps:,} steps, {len(episodes)} episodes, {time.time() - t0:.0f} s", flush=True)
    return episodes


# ---------------------------------------------------------------- building


def collect(cfg: CollectConfig) -> CollectResult:
    """Build the dataset named by ``cfg.env`` into ``cfg.root`` and return what was built."""
    if cfg.steps <= 0 or cfg.workers <= 0:
        raise ValueError(f"steps and workers must be positive, got steps={cfg.steps}, workers={cfg.workers}")
    did = dataset_id(cfg.env)
    name = short_name(did) or did
    env_id = cfg.gym_env or gym_env_id(did)
    t0 = time.time()

    with minari_root(cfg.root) as root:
        from minari.storage import get_dataset_path

        target = Path(get_dataset_path(did))
        if target.exists() and not cfg.overwrite:
            raise DatasetExistsError(
                f"dataset {did!r} already exists at {target}; pass --overwrite to replace it, "
                "or --root DIR to build into another Minari store."
            )

    policy = _choose_policy(cfg, did, name, env_id)
    print(f"collecting {did} on {env_id}: {cfg.steps:,} steps, {cfg.workers} workers, "
          f"episode i seeded {cfg.seed_start}+i, policy {policy}", flush=True)
    episodes = rollout_episodes(policy, env_id, cfg.steps, cfg.workers, cfg.seed_start)

    lo, hi = cfg.ref_min_score, cfg.ref_max_score
    if lo is None and hi is None and env_family(did) in D4RL_REF_SCORES:
        lo, hi = D4RL_REF_SCORES[env_family(did)]
        ref_note = f"Reference scores are D4RL's {env_family(did)} random/expert returns."
    elif lo is not None and hi is not None:
        ref_note = "Reference scores were given when building."
    else:
        lo = hi = None
        ref_note = "No reference scores (none known for this task; pass --ref-min-score/--ref-max-score)."
        print(f"note: {ref_note}", flush=True)

    rets = np.array([e[3].sum() for e in episodes])
    total = int(sum(len(e[2]) for e in episodes))
    description = (
        f"Local rebuild of {did} with the recipe of Minari's MuJoCo datasets (SB3 SAC behaviour policy "
        f"{policy.name} on {env_id}, stochastic actions, episode i seeded {cfg.seed_start}+i), built with "
        f"rlformer's scripts/collect_dataset.py. NOT the official Minari files. {ref_note} "
        f"{len(episodes)} episodes, {total} steps, return mean {rets.mean():.1f}, median {np.median(rets):.1f}, "
        f"min {rets.min():.1f}, max {rets.max():.1f}."
    )

    with minari_root(cfg.root) as root:
        import minari
        from minari.data_collector import EpisodeBuffer
        from minari.storage import get_dataset_path

        target = Path(get_dataset_path(did))
        if target.exists():
            if not cfg.overwrite:  # appeared while rolling out
                raise DatasetExistsError(f"dataset {did!r} appeared at {target} while collecting; "
                                         "pass --overwrite to replace it.")
            shutil.rmtree(target)
        buffers = [
            EpisodeBuffer(id=i, seed=s, observations=O, actions=A, rewards=list(R),
                          terminations=list(TE), truncations=list(TR))
            for i, (s, O, A, R, TE, TR) in enumerate(episodes)
        ]
        with warnings.catch_warnings():  # provenance is in the description; no permalink or email to give
            warnings.filterwarnings("ignore", message=r"`(code_permalink|author_email)` is set to None")
            minari.create_dataset_from_buffers(
                dataset_id=did, buffer=buffers, env=env_id, eval_env=env_id,
                algorithm_name="sb3/SAC", author=cfg.author,
                ref_min_score=lo, ref_max_score=hi,
                description=description, data_format="hdf5",
                requirements=["mujoco>=3", "gymnasium>=1.0"],
            )
    result = CollectResult(did, root, len(episodes), total, rets, target, policy, time.time() - t0)
    print(result.summary(), flush=True)
    return result


def _choose_policy(cfg: CollectConfig, did: str, name: str, env_id: str) -> Path:
    if cfg.policy is not None:
        if cfg.train:
            raise DatasetError("--policy and --train exclude each other: roll out the given policy, or train a new one.")
        p = Path(cfg.policy).expanduser()
        if not p.is_file():
            raise DatasetError(f"--policy {cfg.policy}: no such file; expected an SB3 SAC .zip saved by model.save().")
        print(f"using behaviour policy {p}", flush=True)
        return p
    p = None if cfg.train else default_policy(did)
    if p is not None:
        print(f"using the shipped behaviour policy for {name}: {p}", flush=True)
        return p
    out = Path(cfg.save_policy or Path("runs") / "policies" / f"{name.replace('/', '_').replace('-', '_')}_sac.zip")
    why = "--train given" if cfg.train else f"no behaviour policy given or shipped for {name}"
    print(f"{why}: training one (saved to {out})", flush=True)
    return train_policy(cfg, env_id, out)

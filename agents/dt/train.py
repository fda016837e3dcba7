"""Train a Decision Transformer (or a baseline) on a Minari dataset, evaluate it, write summary.json.

``train(DTConfig(...)) -> dict`` is the whole run; ``scripts/train_dt.py`` is its CLI. The
loop reads nothing back from the device except every ``log_every`` updates: batches are
sampled on the device (``agents.dt.data``), the loss and gradient norm are summed on the
device, and the learning-rate schedule writes into a device tensor. On CUDA the model runs
under bf16 autocast and ``torch.compile``, and the whole update (sample, forward, backward,
clip, fused AdamW) is captured once in a CUDA graph and replayed (the model is tiny, so
kernel-launch overhead, not arithmetic, decides the speed). The first few updates run
eagerly on a side stream (warm-up, compilation), as CUDA-graph capture requires.

``train_concurrently([cfg, ...])`` trains several runs (seeds, models) in threads of one process,
each on its own CUDA stream: the model is so small that one run leaves most of the GPU idle, and
graph replays on different streams overlap on the device (processes would only time-slice it).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

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
    unwrap_model,
    write_summary,
)
from agents.common.checkpoint import list_checkpoints
from agents.dt.config import DTConfig
from agents.dt.data import OfflineData, WindowSampler, load_offline_data
from agents.dt.evaluate import EvalResult, evaluate
from agents.dt.model import DecisionTransformer, masked_action_loss


def build_model(cfg: DTConfig, state_dim: int, act_dim: int) -> nn.Module:
    """``--model dt|bc|hf`` -> a module with the DT call signature."""
    if cfg.model == "dt":
        return DecisionTransformer(state_dim, act_dim, cfg.backbone, max_ep_len=cfg.max_ep_len, init=cfg.init)
    if cfg.model == "bc":
        from agents.baselines.bc import build_bc_model

        return build_bc_model(state_dim, act_dim, cfg.backbone, max_ep_len=cfg.max_ep_len, init=cfg.init)
    if cfg.model == "hf":
        from agents.baselines.hf_dt import HFDecisionTransformer

        return HFDecisionTransformer(state_dim, act_dim, cfg.backbone, max_ep_len=cfg.max_ep_len,
                                     context_len=cfg.context_len)
    raise ValueError(f"unknown model {cfg.model!r}; choose dt, bc or hf")


def make_optimizer(model: nn.Module, cfg: DTConfig, device: torch.device, capturable: bool = False):
    """AdamW (fused on CUDA; tensor lr when captured in a CUDA graph) + Chen et al.'s linear warm-up."""
    cuda = device.type == "cuda"
    lr: Any = torch.tensor(cfg.lr, device=device) if capturable else cfg.lr
    kw = {"fused": True, "capturable": capturable} if cuda else {"foreach": True}
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay, **kw)
    warmup = max(1, int(cfg.warmup_steps or 1))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, 1.0))
    return opt, sched


class Updater:
    """One gradient update per ``step()``; losses and grad norms are summed on the device.

    ``graph=True`` (CUDA only): after ``warmup`` eager updates on a side stream, the update is
    captured in a CUDA graph and replayed. Capture failures fall back to eager updates with a
    warning, as does a ``torch.compile`` failure on the first update.
    """

    def __init__(self, model: nn.Module, sampler: WindowSampler, opt, sched, batch_size: int, grad_clip: float,
                 device: torch.device, compile: bool = False, amp: bool = False, graph: bool = False,
                 warmup: int = 3, rng_lock: Optional[threading.Lock] = None):
        self.model, self.sampler, self.opt, self.sched = model, sampler, opt, sched
        # ``rng_lock``: other runs use the GPU from other threads. They share the CUDA generator, which
        # must not be advanced (by their replays) while this run captures, so captures and replays take
        # the lock, and the capture only forbids unsafe calls in this thread.
        self.rng_lock = rng_lock if rng_lock is not None else contextlib.nullcontext()
        self.capture_error_mode = "global" if rng_lock is None else "thread_local"
        self.batch_size, self.grad_clip, self.device = batch_size, grad_clip, device
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.fwd: Callable = torch.compile(model) if compile else model
        # rlformer models also return the backbone's aux loss, which training adds to the action loss
        self.fwd_kwargs = {"return_aux": True} if isinstance(unwrap_model(model), DecisionTransformer) else {}
        self.amp_dtype = torch.bfloat16 if amp else None
        self.graph_wanted, self.warmup = graph and device.type == "cuda", warmup
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.loss_sum = torch.zeros((), device=device)
        self.gn_sum = torch.zeros((), device=device)
        self.n = 0  # updates done by this Updater
        self._side = torch.cuda.Stream(device) if self.graph_wanted else None

    def _body(self) -> None:
        b = self.sampler.sample(self.batch_size)
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.bfloat16,
                            enabled=self.amp_dtype is not None):
            out = self.fwd(*b.as_tuple(), **self.fwd_kwargs)
        pred, aux = out if isinstance(out, tuple) else (out, None)
        loss = masked_action_loss(pred, b.actions, b.mask)
        (loss if aux is None else loss + aux).backward()
        gn = nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.opt.step()
        self.loss_sum.add_(loss.detach())
        self.gn_sum.add_(gn.detach().float())

    def _eager(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        if self.n == 0 and self.fwd is not self.model:
            try:
                self._body()
                return
            except Exception as e:  # a compiler failure must not kill the run: eager is always correct
                warnings.warn(f"torch.compile failed ({type(e).__name__}: {e}); training eagerly instead")
                self.fwd = self.model
                self.opt.zero_grad(set_to_none=True)
        self._body()

    def _capture(self) -> None:
        torch.cuda.synchronize(self.device)
        g = torch.cuda.CUDAGraph()
        self.opt.zero_grad(set_to_none=True)
        loss0, gn0 = self.loss_sum.clone(), self.gn_sum.clone()
        try:
            with torch.cuda.graph(g, capture_error_mode=self.capture_error_mode):
                self._body()
        except Exception as e:
            warnings.warn(f"CUDA graph capture failed ({type(e).__name__}: {e}); replaying eagerly instead")
            self.graph_wanted = False
            torch.cuda.synchronize(self.device)
            return
        self.loss_sum.copy_(loss0)  # capture records, it does not run: keep the sums untouched
        self.gn_sum.copy_(gn0)
        self.graph = g

    def step(self) -> None:
        if self.graph is not None:
            with self.rng_lock:  # held for the launch only: the replay itself runs asynchronously
                self.graph.replay()
        elif self.graph_wanted and self.n < self.warmup:
            self._side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._side):
                self._eager()
            torch.cuda.current_stream(self.device).wait_stream(self._side)
        elif self.graph_wanted:
            with self.rng_lock:
                self._capture()
                if self.graph is not None:
                    self.graph.replay()
            if self.graph is None:
                self._eager()
        else:
            self._eager()
        self.sched.step()
        self.n += 1

    def pop_means(self, n_updates: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean loss, mean grad norm) over the last ``n_updates`` updates, as device tensors; resets the sums."""
        out = self.loss_sum / max(n_updates, 1), self.gn_sum / max(n_updates, 1)
        out = out[0].clone(), out[1].clone()
        self.loss_sum.zero_()
        self.gn_sum.zero_()
        return out


def run_name(cfg: DTConfig) -> str:
    from envs.datasets import short_name

    env = short_name(cfg.env) or cfg.env.replace("/", "_")
    return f"{cfg.model}-{env}-{cfg.preset}-seed{cfg.seed}"


def evaluate_model(model: nn.Module, cfg: DTConfig, env_id: str, sampler: WindowSampler, device: torch.device,
                   amp: bool) -> list[EvalResult]:
    was_training = model.training
    model.eval()
    try:
        return evaluate(unwrap_model(model), env_id, cfg.eval_targets, cfg.eval_episodes,
                        state_mean=sampler.state_mean, state_std=sampler.state_std, return_scale=cfg.return_scale,
                        context_len=cfg.context_len, device=device, max_steps=cfg.eval_max_steps,
                        vector=cfg.eval_vector, seed=cfg.eval_seed, amp_dtype=torch.bfloat16 if amp else None)
    finally:
        model.train(was_training)


def _target_key(t: float) -> str:
    return str(int(t)) if float(t).is_integer() else str(t)


def _eval_summary(results: list[EvalResult], ref) -> dict[str, Any]:
    from envs.datasets import normalized_score

    out: dict[str, Any] = {"final_return": {}, "final_return_std": {}, "normalized_score": {},
                           "normalized_score_std": {}, "episode_length": {}}
    for r in results:
        k = _target_key(r.target)
        norm = np.asarray(normalized_score(r.returns, (ref.min, ref.max)), dtype=np.float64).reshape(-1)
        out["final_return"][k] = r.mean
        out["final_return_std"][k] = r.std
        out["normalized_score"][k] = float(norm.mean())
        out["normalized_score_std"][k] = float(norm.std())
        out["episode_length"][k] = float(np.mean(r.lengths))
    return out


@dataclass
class SharedDevice:
    """How runs in threads of one process share the GPU (``train_concurrently``).

    ``setup`` is held by one run at a time from seeding to its captured CUDA graph (model init
    stays seed-deterministic, ``torch.compile`` and graph capture never overlap); ``evaluation``
    bounds the evaluations running at once. The runs share the CUDA RNG (batches and dropout
    draw from one generator), so a seed's numbers differ from those of the same seed run alone.
    """

    setup: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    rng: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    """CUDA-generator users that must not overlap a capture: graph captures, replays, RNG-state saves"""
    evaluation: threading.Semaphore = dataclasses.field(default_factory=lambda: threading.Semaphore(3))


def train(cfg: DTConfig, data: Optional[OfflineData] = None, shared: Optional[SharedDevice] = None) -> dict[str, Any]:
    """The whole run. Returns the summary dict (also written to ``<run dir>/summary.json``).

    ``data``: already-loaded trajectories (tests); default: ``load_offline_data(cfg.env)``, which
    raises ``envs.datasets.DatasetNotFoundError`` (with build instructions) when it is missing.
    ``shared``: set by ``train_concurrently`` when other runs use the same GPU from other threads.
    """
    if shared is None:
        return _train(cfg, data, None, lambda: None)
    shared.setup.acquire()
    released = False

    def release_setup() -> None:
        nonlocal released
        if not released:
            released = True
            shared.setup.release()

    try:
        return _train(cfg, data, shared, release_setup)
    finally:
        release_setup()


def _train(cfg: DTConfig, data: Optional[OfflineData], shared: Optional[SharedDevice],
           release_setup: Callable[[], None]) -> dict[str, Any]:
    t_start = time.perf_counter()
    cfg = cfg.resolved()
    if cfg.dataset_root:
        os.environ["MINARI_DATASETS_PATH"] = str(Path(cfg.dataset_root).resolve())
    from envs.datasets import gym_env_id, reference_scores

    device = resolve_device(cfg.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    seed_everything(cfg.seed)
    if data is None:
        data = load_offline_data(cfg.env, download=cfg.download)
    ref = reference_scores(data.dataset_id or cfg.env)
    env_id = gym_env_id(cfg.env)

    run_dir = make_run_dir(cfg.out_dir, name=run_name(cfg))
    ckpt_dir = run_dir / "checkpoints"
    resume_from = latest_checkpoint(ckpt_dir) if cfg.resume else None
    if cfg.resume and resume_from is None:
        print(f"--resume: no checkpoint in {ckpt_dir}; starting from scratch", flush=True)
    if resume_from is None:
        for old in list_checkpoints(ckpt_dir):  # a fresh run owns its directory
            old.unlink()
    stats = None
    if resume_from is not None:  # normalization stats as saved (identical data gives identical stats)
        extra = torch.load(resume_from, map_location="cpu", weights_only=False)["extra"]
        stats = (np.asarray(extra["state_mean"]), np.asarray(extra["state_std"]))
    sampler = WindowSampler(data, cfg.context_len, cfg.return_scale, cfg.max_ep_len, device,
                            *(stats if stats else (None, None)))

    model = build_model(cfg, data.state_dim, data.act_dim).to(device)
    use_graph = cfg.cuda_graph and cuda
    opt, sched = make_optimizer(model, cfg, device, capturable=use_graph)
    start = 0
    if resume_from is not None:
        start = load_checkpoint(resume_from, model, opt, sched)["step"]
        print(f"resumed from {resume_from} at update {start}", flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    amp = cfg.amp and cuda
    updater = Updater(model, sampler, opt, sched, cfg.batch_size, cfg.grad_clip, device,
                      compile=cfg.compile and cuda, amp=amp, graph=use_graph,
                      rng_lock=shared.rng if shared else None)
    model.train()

    def ckpt_extra() -> dict:
        return {"state_mean": sampler.state_mean, "state_std": sampler.state_std, "config": dataclasses.asdict(cfg)}

    logger = RunLogger(run_dir, enabled=cfg.tensorboard)
    history: list[dict[str, float]] = []
    eval_history: list[dict[str, Any]] = []
    print(f"{cfg.model} on {data.dataset_id} ({data.n_steps} steps, {len(data.episode_lengths)} episodes), "
          f"{n_params / 1e3:.1f}k params, device {device}, run dir {run_dir}", flush=True)

    def run_eval(step: int) -> Optional[dict[str, Any]]:
        if not cfg.eval_episodes:
            return None
        t0 = time.perf_counter()
        with (shared.evaluation if shared else contextlib.nullcontext()):
            res = _eval_summary(evaluate_model(model, cfg, env_id, sampler, device, amp), ref)
        res["eval_wall_s"] = time.perf_counter() - t0
        for k in res["final_return"]:
            logger.scalar(f"eval/return_{k}", res["final_return"][k], step)
            logger.scalar(f"eval/normalized_score_{k}", res["normalized_score"][k], step)
        logger.flush()
        eval_history.append({"step": step, **res})
        return res

    train_time, last_log_t, last_log_step = 0.0, None, start
    loss_now = float("nan")
    bar = progress(cfg.train_steps, initial=start, desc=cfg.model, unit="upd")
    t_train = time.perf_counter()
    for step in bar:
        updater.step()
        if updater.n > updater.warmup:  # compiled and captured: the next run may set up
            release_setup()
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.train_steps:
            loss_t, gn_t = updater.pop_means(done - last_log_step)
            lr_now = sched.get_last_lr()[0]
            vals = logger.scalars({"train/loss": loss_t, "train/grad_norm": gn_t, "train/lr": lr_now}, done)
            now = time.perf_counter()
            if last_log_t is not None:
                vals["train/updates_per_s"] = logger.scalar("train/updates_per_s",
                                                            (done - last_log_step) / (now - last_log_t), done)
            logger.scalars(gpu_memory_mb(device), done)
            last_log_t, last_log_step = now, done
            loss_now = vals["train/loss"]
            history.append({"step": done, **vals})
            bar.set_postfix(loss=f"{loss_now:.4f}", refresh=False)
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done != cfg.train_steps:
            with updater.rng_lock:  # saves the CUDA RNG state
                save_checkpoint(ckpt_dir, done, model, opt, sched, extra=ckpt_extra())
        if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.train_steps:
            t_pause = time.perf_counter()
            run_eval(done)
            last_log_t = None if last_log_t is None else last_log_t + (time.perf_counter() - t_pause)
    release_setup()
    if cuda:  # this run's stream only: other runs may be training on other streams
        torch.cuda.current_stream(device).synchronize()
    train_time = time.perf_counter() - t_train
    bar.close()
    n_done = cfg.train_steps - start
    with updater.rng_lock:
        save_checkpoint(ckpt_dir, cfg.train_steps, model, opt, sched, extra=ckpt_extra())

    final = run_eval(cfg.train_steps)
    summary: dict[str, Any] = {
        "model": cfg.model, "env": cfg.env, "dataset_id": data.dataset_id, "gym_env_id": env_id,
        "final_return": final["final_return"] if final else {},
        "normalized_score": final["normalized_score"] if final else {},
        "final_return_std": final["final_return_std"] if final else {},
        "normalized_score_std": final["normalized_score_std"] if final else {},
        "episode_length": final["episode_length"] if final else {},
        "eval_episodes_per_target": cfg.eval_episodes,
        "reference_scores": {"min": ref.min, "max": ref.max, "source": ref.source},
        "updates": cfg.train_steps, "updates_this_run": n_done, "resumed_from_step": start,
        "updates_per_s": n_done / train_time if train_time > 0 and n_done else None,
        "train_wall_s": train_time, "eval_wall_s": final["eval_wall_s"] if final else 0.0,
        "wall_s": time.perf_counter() - t_start,
        "final_loss": loss_now, "loss_history": history, "eval_history": eval_history,
        "cuda_graph": updater.graph is not None, "compiled": updater.fwd is not model,
        "n_params": n_params, "device": str(device), "torch": torch.__version__,
        "dataset": {"steps": data.n_steps, "episodes": int(len(data.episode_lengths)),
                    "return_mean": float(data.episode_returns.mean())},
        "run_dir": str(run_dir),
    }
    if cuda:
        summary["gpu_max_mem_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        summary["gpu_name"] = torch.cuda.get_device_name(device)
    write_summary(run_dir, summary, cfg)
    logger.close()
    if final:
        parts = [f"target {k}: return {final['final_return'][k]:.1f} ± {final['final_return_std'][k]:.1f}, "
                 f"normalized {final['normalized_score'][k]:.1f}" for k in final["final_return"]]
        print(f"eval ({cfg.eval_episodes} episodes/target, reference scores: {ref.source}): " + "; ".join(parts))
    ups = summary["updates_per_s"]
    print(f"{n_done} updates in {train_time:.1f} s ({ups or math.nan:.1f} updates/s), total {summary['wall_s']:.1f} s; "
          f"summary: {run_dir / 'summary.json'}", flush=True)
    return summary


def train_concurrently(cfgs: list[DTConfig], data: Optional[OfflineData] = None) -> list[Any]:
    """Train ``cfgs`` at once, one thread and one CUDA stream per run, sharing one copy of the data.

    Returns, per run, its summary dict or the exception that stopped it. The runs must read the
    same dataset. On CPU they simply share the cores.
    """
    if not cfgs:
        return []
    if len({(c.env, c.dataset_root) for c in cfgs}) != 1:
        raise ValueError("train_concurrently: all runs must use the same --env and --dataset-root "
                         f"(got {sorted({(c.env, str(c.dataset_root)) for c in cfgs})}); start one call per dataset")
    if cfgs[0].dataset_root:
        os.environ["MINARI_DATASETS_PATH"] = str(Path(cfgs[0].dataset_root).resolve())
    if data is None:
        data = load_offline_data(cfgs[0].env, download=cfgs[0].download)
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):  # one compiled model per run
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 8 * len(cfgs)))
    shared = SharedDevice()
    results: list[Any] = [None] * len(cfgs)

    def work(i: int) -> None:
        device = resolve_device(cfgs[i].device)
        stream = torch.cuda.stream(torch.cuda.Stream(device)) if device.type == "cuda" else contextlib.nullcontext()
        try:
            with stream:
                results[i] = train(cfgs[i], data, shared)
        except BaseException as e:  # reported to the caller with the run it belongs to
            results[i] = e

    threads = [threading.Thread(target=work, args=(i,), name=f"dt-run-{i}") for i in range(len(cfgs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results

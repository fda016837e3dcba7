"""The issue's results: DT vs BC vs HF-DT, several seeds trained concurrently on one GPU.

    python scripts/run_dt_results.py --dataset-root /tmp/minari --out RESULTS_dt.md        # dt, bc, hf x 3 seeds
    python scripts/run_dt_results.py --dataset-root /tmp/minari --models dt bc --seeds 0 1 2
    python scripts/run_dt_results.py --dataset-root /tmp/minari --models hf --seeds 0

Each (model, seed) is one ``scripts/train_dt.py --preset paper`` process, all started at once
(or ``--max-parallel`` at a time) on the same device; they share the GPU (the model is tiny).
With ``--in-process`` all runs are threads of this process instead, each on its own CUDA stream
(``agents.dt.train.train_concurrently``): processes only time-slice a GPU, while graph replays
on separate streams overlap, so many small runs finish in little more than the time of one.
Evaluation uses ``--eval-vector sync`` by default so N concurrent runs do not start N x 200
environment processes. Every run writes ``<out-dir>/<model>-seed<seed>/`` (log.txt,
summary.json, TensorBoard, checkpoints). When all are done, a markdown table of the
normalized score per target (mean ± std over seeds of each seed's mean over its episodes) is
printed last and written to ``--out`` (and the raw numbers to ``--out`` with .json).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, not installed

import tyro

REPO = Path(__file__).resolve().parents[1]


@dataclass
class ResultsConfig:
    dataset_root: Optional[str] = None
    """Minari store with the dataset (passed to every run as --dataset-root)"""
    env: str = "hopper-medium"
    models: Tuple[str, ...] = ("dt", "bc", "hf")
    """dt, bc, hf, or a labelled variant ``LABEL=FLAGS`` whose label starts with the model, e.g.
    "dt_pos=--backbone.position learned --backbone.max-len 64" (FLAGS are added to that run's command)"""
    seeds: Tuple[int, ...] = (0, 1, 2)
    hf_seeds: Optional[Tuple[int, ...]] = None
    """seeds for --model hf (default: --seeds); HF-DT is the slowest, so fewer seeds may fit the budget"""
    preset: Literal["quick", "paper"] = "paper"
    device: str = "auto"
    eval_vector: Literal["async", "sync"] = "sync"
    max_parallel: int = 0
    """runs at the same time (0: all)"""
    out_dir: str = "runs/results"
    out: str = "RESULTS_dt.md"
    in_process: bool = False
    """train all runs as threads of this process, one CUDA stream each (they overlap on the GPU)"""
    eval_in_processes: bool = True
    """with --in-process: evaluate each run's final checkpoint in its own process afterwards (evaluations in
    threads queue on the interpreter lock)"""
    extra: str = ""
    """more train_dt.py flags for every run, one string: --extra="--train-steps 2000 --backbone.position rope" """


def parse_model(entry: str) -> tuple[str, str, list[str]]:
    """``"dt"`` -> ("dt", "dt", []); ``"dt_pos=--backbone.position learned"`` -> ("dt_pos", "dt", [flags])."""
    label, _, flags = entry.partition("=")
    model = label.split("_")[0]
    if model not in ("dt", "bc", "hf"):
        raise ValueError(f"--models entry {entry!r}: the label must be dt, bc or hf, optionally followed by _NAME "
                         "and =FLAGS, e.g. dt_pos=--backbone.position learned")
    return label, model, shlex.split(flags)


def job_list(cfg: ResultsConfig) -> list[tuple[str, int]]:
    """(models entry, seed) for every run; --hf-seeds applies to hf entries."""
    return [(e, s) for e in cfg.models
            for s in ((cfg.hf_seeds or cfg.seeds) if parse_model(e)[1] == "hf" else cfg.seeds)]


def run_args(cfg: ResultsConfig, entry: str, seed: int, run_dir: Path) -> list[str]:
    _, model, flags = parse_model(entry)
    args = [sys.executable, str(REPO / "scripts" / "train_dt.py"), "--env", cfg.env, "--preset", cfg.preset,
            "--model", model, "--seed", str(seed), "--device", cfg.device, "--out-dir", str(run_dir),
            "--eval-vector", cfg.eval_vector, "--no-download"]
    if cfg.dataset_root:
        args += ["--dataset-root", str(Path(cfg.dataset_root).resolve())]
    return args + shlex.split(cfg.extra) + flags


def run_dir_of(cfg: ResultsConfig, entry: str, seed: int) -> Path:
    return Path(cfg.out_dir) / f"{parse_model(entry)[0]}-seed{seed}"


def run_processes(cfg: ResultsConfig, jobs: list[tuple[str, int]], argv_of, log_name: str = "log.txt") -> list[dict]:
    """Run ``argv_of(entry, seed, run_dir)`` for every job as a subprocess, ``--max-parallel`` at a time."""
    limit = cfg.max_parallel or len(jobs)
    threads = str(max(1, (os.cpu_count() or 1) // max(1, min(limit, len(jobs)))))
    env = {**os.environ, "RLFORMER_PROGRESS": "0", "OMP_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1"}
    pending, running, done = list(jobs), [], []
    t0 = time.perf_counter()
    while pending or running:
        while pending and len(running) < limit:
            m, s = pending.pop(0)
            run_dir = run_dir_of(cfg, m, s)
            run_dir.mkdir(parents=True, exist_ok=True)
            log = open(run_dir / log_name, "w")
            proc = subprocess.Popen(argv_of(m, s, run_dir), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
            running.append({"model": m, "seed": s, "dir": run_dir, "proc": proc, "log": log,
                            "start": time.perf_counter()})
            print(f"[{time.perf_counter() - t0:6.0f} s] started {m} seed {s} (pid {proc.pid})", flush=True)
        time.sleep(2)
        for job in list(running):
            rc = job["proc"].poll()
            if rc is None:
                continue
            job["log"].close()
            running.remove(job)
            job["rc"], job["wall_s"] = rc, time.perf_counter() - job["start"]
            summary = job["dir"] / "summary.json"
            job["summary"] = json.loads(summary.read_text()) if rc == 0 and summary.exists() else None
            tail = (job["dir"] / log_name).read_text().strip().splitlines()[-3:]
            print(f"[{time.perf_counter() - t0:6.0f} s] {job['model']} seed {job['seed']} finished rc={rc}: "
                  + " | ".join(tail), flush=True)
            done.append(job)
    return done


def launch_all(cfg: ResultsConfig) -> list[dict]:
    """Every run as its own ``train_dt.py`` process (training and evaluation)."""
    return run_processes(cfg, job_list(cfg), lambda m, s, d: run_args(cfg, m, s, d))


def launch_in_process(cfg: ResultsConfig) -> list[dict]:
    """All runs trained as threads of this process (``train_concurrently``); the same records as ``launch_all``.

    Evaluation is CPU work in Python (environment steps), so N runs evaluating in threads of one process
    queue on one interpreter lock (a 7-run call spent 187 s in one evaluation that takes 44 s alone). With
    ``--eval-in-processes`` (default) the threads only train, and each run's final checkpoint is then
    evaluated by its own ``train_dt.py --resume`` process (nothing left to train, so it only evaluates);
    the evaluation fields are merged into the training summary.
    """
    from agents.common import write_summary
    from agents.dt.config import DTConfig
    from agents.dt.train import train_concurrently

    os.environ["RLFORMER_PROGRESS"] = "0"
    jobs = job_list(cfg)
    dirs = [run_dir_of(cfg, m, s) for m, s in jobs]
    run_cfgs = [tyro.cli(DTConfig, args=run_args(cfg, m, s, d)[2:]) for (m, s), d in zip(jobs, dirs)]
    if cfg.eval_in_processes:
        run_cfgs = [dataclasses.replace(c, eval_episodes=0, eval_every=0) for c in run_cfgs]
    t0 = time.perf_counter()
    print(f"training {len(jobs)} runs in threads of one process: {jobs}", flush=True)
    results = train_concurrently(run_cfgs)
    print(f"[{time.perf_counter() - t0:6.0f} s] training done", flush=True)
    done = []
    for (m, s), d, r in zip(jobs, dirs, results):
        ok = isinstance(r, dict)
        if not ok:
            print(f"{m} seed {s} failed: {type(r).__name__}: {r}", file=sys.stderr, flush=True)
        done.append({"model": m, "seed": s, "dir": d, "rc": 0 if ok else 1,
                     "wall_s": r["wall_s"] if ok else time.perf_counter() - t0, "summary": r if ok else None})
    trained = [j for j in done if j["rc"] == 0]
    if not cfg.eval_in_processes or not trained:
        return done
    evals = run_processes(cfg, [(j["model"], j["seed"]) for j in trained],
                          lambda m, s, d: run_args(cfg, m, s, d) + ["--resume"], log_name="eval_log.txt")
    by_run = {(e["model"], e["seed"]): e for e in evals}
    for job in trained:
        ev = by_run[(job["model"], job["seed"])]
        if ev["rc"] != 0 or not ev["summary"]:
            job["rc"] = ev["rc"] or 1
            print(f"{job['model']} seed {job['seed']}: evaluation failed, see {job['dir'] / 'eval_log.txt'}",
                  file=sys.stderr, flush=True)
            continue
        merged = {**job["summary"], **{k: ev["summary"][k] for k in EVAL_FIELDS if k in ev["summary"]}}
        merged["wall_s"] = job["summary"]["wall_s"] + ev["wall_s"]
        job["summary"], job["wall_s"] = merged, merged["wall_s"]
        # the run's config as the evaluation process read it (the training flags plus --resume)
        write_summary(job["dir"], merged, ev["summary"].get("config"))
    return done


EVAL_FIELDS = ("final_return", "normalized_score", "final_return_std", "normalized_score_std", "episode_length",
               "eval_episodes_per_target", "eval_wall_s", "eval_history")
"""summary fields that come from the evaluation process"""


def mean_std(xs: list[float]) -> str:
    if not xs:
        return "-"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.1f} ± {sd:.1f}"


def table(cfg: ResultsConfig, done: list[dict], total_s: float) -> str:
    targets: list[str] = []
    for j in done:
        for k in (j["summary"] or {}).get("normalized_score", {}):
            if k not in targets:
                targets.append(k)
    head = ["model", "seeds ok"] + [f"normalized @{t}" for t in targets] + [f"return @{t}" for t in targets[:1]] + \
        ["per-seed @" + (targets[0] if targets else "-"), "updates/s (per run)", "wall s (per run)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ref = None
    for m in cfg.models:
        ok = [j["summary"] for j in done if j["model"] == m and j["summary"]]
        n_all = sum(1 for j in done if j["model"] == m)
        label, _, flags = parse_model(m)
        m = label + (f" ({' '.join(flags)})" if flags else "")
        ref = ref or (ok[0]["reference_scores"] if ok else None)
        cells = [m, f"{len(ok)}/{n_all}"]
        cells += [mean_std([s["normalized_score"][t] for s in ok if t in s["normalized_score"]]) for t in targets]
        cells += [mean_std([s["final_return"][t] for s in ok if t in s["final_return"]]) for t in targets[:1]]
        cells.append(", ".join(f"{s['normalized_score'].get(targets[0], float('nan')):.1f}" for s in ok)
                     if targets else "-")
        cells.append(mean_std([s["updates_per_s"] for s in ok if s.get("updates_per_s")]))
        cells.append(mean_std([s["wall_s"] for s in ok]))
        lines.append("| " + " | ".join(cells) + " |")
    first = next((j["summary"] for j in done if j["summary"]), None)
    notes = [f"{cfg.env}, preset {cfg.preset}"]
    if first:
        notes += [f"{first['updates']} updates", f"{first['eval_episodes_per_target']} eval episodes per target",
                  f"dataset {first['dataset_id']} ({first['dataset']['steps']} steps, {first['dataset']['episodes']} "
                  f"episodes, return mean {first['dataset']['return_mean']:.1f})",
                  f"device {first['device']} {first.get('gpu_name', '')}".strip()]
    if ref:
        notes.append(f"normalized = 100 (R - {ref['min']}) / ({ref['max']} - {ref['min']}), reference: {ref['source']}")
    how = "threads of one process, one CUDA stream each" if cfg.in_process else "processes"
    notes.append(f"all runs concurrently ({len(done)} {how}), total {total_s:.0f} s")
    return "\n".join(lines) + "\n\n" + "; ".join(notes) + ".\n"


def main(argv: list[str] | None = None) -> str:
    cfg = tyro.cli(ResultsConfig, args=argv, description=__doc__)
    t0 = time.perf_counter()
    done = launch_in_process(cfg) if cfg.in_process else launch_all(cfg)
    total = time.perf_counter() - t0
    md = table(cfg, done, total)
    cmd = "python scripts/run_dt_results.py " + " ".join(sys.argv[1:] if argv is None else argv)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"<!-- {cmd} -->\n{md}")
    from agents.common import write_json

    write_json(out.with_suffix(".json"), {"command": cmd, "config": cfg, "total_s": total, "runs": [
        {"model": j["model"], "seed": j["seed"], "rc": j["rc"], "wall_s": j["wall_s"], "summary": j["summary"]}
        for j in done]})
    print("\n" + md, flush=True)
    if any(j["rc"] != 0 for j in done):
        print("some runs failed: see their log.txt", file=sys.stderr)
    return md


if __name__ == "__main__":
    main()

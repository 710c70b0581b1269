"""Running a study: every (cell, seed) as its own `loralab train` process (finished runs skipped),
or a table of estimates; then the report. A combine cell runs after the training cells, as its
own `python -m loralab.study.combine_cell` process (combine_cell.py); so does a staged cell (`after:`),
a `loralab train` whose model.adapter is the earlier cell's adapter of the same seed.

Folder layout (`--out`, default runs/studies/<name>-<scale>):
  study.json                      the expanded plan (so a report never needs the YAML again)
  cells/<cell>/seed-<s>/          one `loralab train` run: cell.yaml, train.log, run_info.json and
                                  everything run_training writes (summary.json marks it done)
  results.csv, report.md, report.html, plots/
Each run is a fresh `python -m loralab.cli train` process, so peak memory is that run's alone and
a crash cannot take the study down. Runs with a summary.json are skipped: rerunning the same
command after an interruption continues where it stopped. Where the process runs is the Runner's
business: here (subprocess_runner) or as a task on a Ray cluster (ray_runner.RayRunner, `--ray`).
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

from ..config import dump_yaml
from ..errors import UserError
from ..io.fileio import atomic_write_text, write_json
from . import reuse as reuse_mod
from .report import make_report
from .results import StudyResults, choose_point, collect, estimate_stats, load_json
from .spec import VALIDATION_ONLY, Study, describe, load_study, run_config, sources, study_plan, study_time
from .sweeps import chosen_path, read_chosen, run_dir

# (command, run folder, log file) -> exit code, or a one-line reason the run could not run at all
Runner = Callable[[list, Path, Path], "int | str"]


def subprocess_runner(cmd: list, run_dir: Path, log_path: Path) -> int:
    with open(log_path, "w") as log:
        return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode


def _last_error(log_path: Path) -> str:
    try:
        lines = [l.strip() for l in log_path.read_text(errors="replace").splitlines() if l.strip()]
    except OSError:
        return "no log"
    errors = [l for l in lines if "error" in l.lower()]
    return (errors or lines or ["no output"])[-1][:300]


def tracking_overrides(study: Study, cell_name: str, seed: int, out: Path) -> list[str]:
    """Every run of a study is tracked alike: tagged with the study, cell and seed, named
    `<cell>/seed-<s>`, in an MLflow experiment named after the study whose store (unless the user
    names one) is the study folder's mlruns/, so one MLflow UI compares every run."""
    text = lambda key, value: f"{key}={json.dumps(value)}"  # JSON is YAML: strings stay strings
    extra = [text("train.tags.study", study.name), text("train.tags.cell", cell_name), text("train.tags.seed", seed),
             text("train.run_name", f"{cell_name}/seed-{seed}"), text("train.experiment", study.name)]
    user_uri = os.environ.get("MLFLOW_TRACKING_URI") or any(o.startswith("train.mlflow_uri=") for o in study.overrides)
    if not user_uri:
        extra.append(text("train.mlflow_uri", (out / "mlruns").as_uri()))
    return extra


def write_json_rec(run_dir: Path, **rec) -> dict:
    write_json(run_dir / "run_info.json", rec)  # kept beside the run: a rerun's report still has its time
    return rec


def _fmt_s(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def run_study(study: Study, out: str | Path, *, parallel: int = 1, runner: Runner | None = None,
              threads: int | None = None, nproc: int = 1, log: Callable[[str], None] | None = None,
              reuse: bool = False) -> list[dict]:
    """Run every (cell, seed) not yet done; returns one record per run (status ok/failed/skipped).
    Three phases: plain cells and every sweep point (on its sweep seeds, validating only: the choice
    reads nothing else); then each swept cell at the point its sweep chose: its sweep runs there
    evaluated (resumed at their last step: no step trains twice) and its other seeds (sweeps.py);
    then combine and staged cells.
    threads: each run's train.threads (default: this machine's cores shared by the parallel runs);
    nproc: processes per run (> 1: each run is data parallel, `loralab train --nproc`).
    reuse: take a run whose training a study beside this one already made (reuse.py)."""
    out = Path(out).resolve()
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    runner = runner or subprocess_runner
    if parallel < 1:
        raise UserError(f"--parallel must be >= 1, got {parallel}")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "study.json", study_plan(study))
    extra = []
    if not any(o.startswith("train.threads=") for o in study.overrides):
        if threads:
            extra = [f"train.threads={threads}"]
        elif parallel > 1:
            extra = [f"train.threads={max(1, (os.cpu_count() or 1) // parallel)}"]  # no oversubscription
    records: list[dict] = []
    # jobs: (cell, seed, point, validate only)
    first = [(c, s, p, p is not None) for c in study.cells if not sources(c)
             for p in ([p for p, _ in c.points] if c.points else [None]) for s in (c.sweep_seeds if p else c.seeds)]
    n_rest = sum(len(c.seeds) for c in study.cells if c.points)
    n_later = sum(len(c.seeds) for c in study.cells if sources(c))
    progress = {"done": 0, "queued": 0, "later": 0, "durations": []}  # later: runs of phases not yet listed
    lock = threading.Lock()

    def pending(jobs, later: int):  # the jobs to run: those without a summary.json, or one that only validated
        todo = []                      # or whose last attempt failed (an evaluation stopped half way)
        for cell, seed, point, validate in jobs:
            where = run_dir(out, cell.name, seed, point)
            info = load_json(where / "run_info.json", {}) or {}
            if (where / "summary.json").exists() and (validate or not info.get("validate_only")
                                                      and info.get("status") != "failed"):
                records.append({"cell": cell.name, "seed": seed, "point": point, "status": "skipped"})
            else:
                todo.append((cell, seed, point, validate))
        progress["queued"] += len(todo)
        progress["later"] = later
        return todo

    def one(job):
        cell, seed, point, validate = job
        where = run_dir(out, cell.name, seed, point)
        before = load_json(where / "run_info.json", {}) or {}
        evaluates_sweep_run = not validate and before.get("validate_only")  # its training time is this run's too
        trained_s = (before.get("wall_s") or 0) if evaluates_sweep_run else 0
        label = f"{cell.name}/{point}" if point else cell.name
        where.mkdir(parents=True, exist_ok=True)
        stage = []
        if cell.after:  # the earlier cell's adapter of the same seed (at its chosen point) becomes the base
            first_dir = run_dir(out, cell.after, seed, read_chosen(out, cell.after)) / "adapter"
            stage = [f"model.adapter={json.dumps(str(first_dir))}"]
        cfg = run_config(study, cell, seed, where, extra + stage + tracking_overrides(study, label, seed, out)
                         + (VALIDATION_ONLY if validate else []), point=point)
        atomic_write_text(where / "cell.yaml", dump_yaml(cfg))
        taken = {"reused_from": before["reused_from"]} if before.get("reused_from") else {}
        found = reuse_mod.find(out, where, cfg, validate) \
            if reuse and not cell.combine and reuse_mod.adoptable(where, validate) else None
        if found:  # trained in a study beside this one: copied, whole or to resume and evaluate
            src, whole = found
            reuse_mod.copy_run(src, where)
            taken = {"reused_from": os.path.relpath(src, out.parent)}
            trained_s = (load_json(src / "run_info.json", {}) or {}).get("wall_s") or 0
            with lock:
                log(f"[{study.name}] {label} seed {seed}: " + (f"taken from {taken['reused_from']}" if whole else
                    f"training taken from {taken['reused_from']}; resumed there to evaluate"))
        what = dict(cell=cell.name, seed=seed, point=point, code=reuse_mod.code_fingerprint(), **taken,
                    **({"validate_only": True} if validate else {}))
        if found and found[1]:
            return done(write_json_rec(where, **what, status="ok", wall_s=trained_s, error=None), label, seed, where,
                        spent=0)
        with lock:
            log(f"[{study.name}] start {label} seed {seed}")
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "loralab.cli", "train", str(where / "cell.yaml")]
        cmd += ["--nproc", str(nproc)] if nproc > 1 else []
        if cell.combine:  # earlier cells' adapters of the same seed (a swept cell's at its chosen point)
            sources = [[str(run_dir(out, src, seed, read_chosen(out, src)) / "adapter"), w]
                       for src, w in zip(cell.combine["adapters"], cell.combine["weights"])]
            write_json(where / "combine.json", {**cell.combine, "adapters": sources, "seed": seed})
            cmd = [sys.executable, "-m", "loralab.study.combine_cell", str(where / "cell.yaml"),
                   str(where / "combine.json")]
        try:
            code = runner(cmd, where, where / "train.log")
        except OSError as e:
            code = f"could not start: {e}"
        except Exception as e:  # noqa: BLE001  a runner's own failure is this run's, never the study's
            code = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        wall = time.perf_counter() - t0 + trained_s
        ok = code == 0 and (where / "summary.json").exists()
        err = None if ok else (code if isinstance(code, str) else f"exit {code}: {_last_error(where / 'train.log')}")
        if not ok and evaluates_sweep_run and not found:  # its evaluation failed: the sweep run, only validated
            what, wall = {**what, "validate_only": True}, trained_s
        return done(write_json_rec(where, **what, status="ok" if ok else "failed", wall_s=round(wall, 1), error=err),
                    label, seed, where, spent=time.perf_counter() - t0)

    def done(rec: dict, label: str, seed: int, where: Path, spent: float) -> dict:
        wall, err = rec["wall_s"], rec["error"]
        with lock:
            progress["done"] += 1
            progress["durations"].append(spent)  # what this study waited for: the ETA's unit
            total = progress["queued"] + progress["later"]  # an upper bound while later phases may skip runs
            eta = sum(progress["durations"]) / len(progress["durations"]) * (total - progress["done"]) / parallel
            what = f"done in {wall:.0f} s" if rec["status"] == "ok" else \
                f"FAILED after {wall:.0f} s ({err}; log {where / 'train.log'})"
            log(f"[{study.name}] {progress['done']}/{total} {label} seed {seed} {what}; ETA {_fmt_s(eta)}")
        return rec

    def chosen_jobs():  # after the sweeps: each swept cell's seeds at the point it chose
        jobs = []
        for cell in (c for c in study.cells if c.points):
            choice = choose_point(out, asdict(cell), study.select)
            write_json(chosen_path(out, cell.name), choice)
            rest = [s for s in cell.seeds if s not in cell.sweep_seeds]
            if choice["point"] is None:
                records.extend({"cell": cell.name, "seed": s, "point": None, "status": "failed",
                                "error": "no sweep point finished"} for s in rest)
                log(f"[{study.name}] {cell.name}: no sweep point finished; its other seeds are not run")
                continue
            log(f"[{study.name}] {cell.name}: sweep chose {choice['point']} ({study.select} "
                + ", ".join(f"{p} {v:.4g}" if v is not None else f"{p} -" for p, v in choice["scores"].items()) + ")"
                + ("; at the end of its grid" if choice["edge"] else ""))
            jobs += [(cell, s, choice["point"], False) for s in cell.seeds]  # the sweep seeds': an evaluation
        return jobs

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        try:
            todo = pending(first, n_rest + n_later)
            if records:
                log(f"[{study.name}] {len(records)} runs already done, skipped; {len(todo)} to run first")
            records += list(pool.map(one, todo))
            records += list(pool.map(one, pending(chosen_jobs(), n_later)))
            later = [(c, s, None, False) for c in study.cells if sources(c) for s in c.seeds]
            records += list(pool.map(one, pending(later, 0)))  # after the cells whose adapters they use
        except KeyboardInterrupt:  # runs not started never start; a runner that can stop its runs does
            pool.shutdown(wait=False, cancel_futures=True)
            getattr(runner, "stop", lambda: None)()
            raise
    write_json(out / "runs.json", records)
    return records


def run_estimates(study: Study) -> tuple[list[dict], str | None]:
    """Each row through loralab.estimate; rows keep the article's numbers."""
    keys = ("method", "r", "targets", "seq", "batch", "grad_accum", "optimizer", "precision", "grad_checkpointing",
            "device", "stock_autograd")
    rows = [{**r, "settings": ", ".join(f"{k}={r[k]}" for k in keys if k in r)} for r in study.rows]
    from ..memory.arch import resolve_model_config
    from ..memory.estimate import estimate

    try:
        model_cfg = resolve_model_config(study.model)
    except UserError as e:  # an unknown model: the report says so
        return rows, f"resolve_model_config({study.model!r}) failed: {e}"
    for r in rows:
        args = {k: r[k] for k in keys if k in r}
        try:
            res = estimate(model_cfg, **args)
            r["peak_gb"] = round(res["peak_bytes"] / 1e9, 3)  # the article's GB are 10^9 bytes
            r["breakdown"] = {k: round(v / 1e9, 3) if isinstance(v, (int, float)) else v
                              for k, v in (res.get("breakdown") or {}).items()}
        except Exception as e:  # noqa: BLE001
            r["error"] = f"{type(e).__name__}: {e}"
    return rows, None


def build_report(study_dir: str | Path) -> dict:
    """(Re)write results.csv, report.md/.html and plots from whatever runs of the study are done."""
    study_dir = Path(study_dir)
    plan = load_json(study_dir / "study.json")
    if plan is None:
        raise UserError(f"{study_dir}: no readable study.json (not a study folder)")
    if plan.get("kind") == "estimate":
        return make_report(study_dir, plan, StudyResults(estimate_stats(plan), [], {}, {}))
    return make_report(study_dir, plan, collect(study_dir, plan))


@contextlib.contextmanager
def on_ray(address: str, *, cpus_per_run: int = 1, gpus_per_run: float = 0, name: str = "study",
           log: Callable[[str], None] = print):
    """Attached to a Ray cluster for the block (left attached if it already was): yields (a runner that
    launches each run as a Ray task, how many runs the cluster holds at once) for run_study."""
    from .ray_runner import RayRunner, connect, disconnect

    started = connect(address)
    try:
        ray_runner = RayRunner(cpus=cpus_per_run, gpus=gpus_per_run)
        slots = ray_runner.slots()
        log(f"[{name}] on Ray ({address}): {slots} runs at once, each {cpus_per_run} CPU(s)"
            + (f" and {gpus_per_run:g} GPU(s)" if gpus_per_run else ""))
        yield ray_runner, slots
    finally:
        if started:
            disconnect()


def _time_plan(study: Study, scale: str, parallel: int, ray: str | None,
               log: Callable[[str], None]) -> tuple[str | None, dict | None]:
    """(the plan's text, {first_s, round_s} on this machine or None). A GPU study's plan is the GPU's
    memory and time (a model it cannot read is the user's error); a CPU study's measures this CPU and
    is only advice: a model it cannot plan for leaves the run to say what is wrong."""
    from ..memory.cpu_time import RUN_START_S
    from . import sequential
    from .plan import plan_rows, plan_text, total_seconds

    if scale == "gpu":
        return plan_text(study), None
    if ray is not None:  # the runs happen on the cluster's CPUs, not this one's
        return None, None
    parallel = max(1, parallel)
    threads = max(1, (os.cpu_count() or 1) // parallel)
    try:
        rows = plan_rows(study, cpu_threads=threads)
    except UserError as e:
        log(f"[{study.name}] no time plan: {e}")
        return None, None
    planned: dict = {}  # {cell: [seconds of an evaluated run]}: what a round adds, as fit_looks costs it
    for r in rows:
        if r["evaluated"]:
            planned.setdefault(r["cell"].split(" @ ")[0], []).append(r["train_s"] + r["eval_s"] + RUN_START_S)
    _, round_s = sequential.round_seconds(study, planned, parallel)
    return (plan_text(study, cpu_threads=threads, parallel=parallel, rows=rows),
            {"first_s": total_seconds(rows, RUN_START_S) / parallel, "round_s": round_s})


def study_command(name: str, *, scale: str = "cpu", out: str | None = None, seeds: int | None = None,
                  parallel: int = 1, dry_run: bool = False, report_only: bool = False, overrides=(),
                  runner: Runner | None = None, ray: str | None = None, gpus_per_run: float = 0,
                  cpus_per_run: int = 1, log: Callable[[str], None] | None = None, until_decided: bool = False,
                  budget: str | None = None, max_seeds: int | None = None, reuse: bool = True) -> dict | str:
    """`loralab study`: load, then print (dry run), rebuild the report, or run and report.
    ray: run each (cell, seed) as a Ray task (auto, local or a cluster address; study.ray_runner).
    until_decided: then add seeds to the cells behind unclear claims (sequential.py) within `budget`.
    reuse: take runs the studies beside this one already trained (reuse.py)."""
    from . import sequential

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if ray is None and (gpus_per_run or cpus_per_run != 1):
        raise UserError("--gpus-per-run and --cpus-per-run place runs on a Ray cluster: add --ray auto|local|ADDRESS")
    if not until_decided and (budget is not None or max_seeds is not None):
        raise UserError("--budget and --max-seeds belong to --until-decided: add it")
    if until_decided and ray is not None:
        raise UserError("--until-decided runs its rounds on this machine: leave out --ray")
    study = load_study(name, scale=scale, seeds=seeds, overrides=overrides)
    plan, here = None, None
    if study.kind == "train" and not report_only and runner is None:  # before anything runs: time (and on a
        plan, here = _time_plan(study, scale, parallel, ray, log)        # GPU, memory) of `loralab train` runs
    seq_text = None
    if until_decided and study.kind == "train":
        budget_s = sequential.parse_duration(budget or sequential.DEFAULT_BUDGET)
        study.sequential = sequential.sequential_plan(study, max_seeds or sequential.DEFAULT_MAX_SEEDS)
        seq_text = sequential.describe_plan(study.sequential, budget_s, study_time(name), here)
    if dry_run:
        return describe(study) + (f"\n{plan}" if plan else "") + (f"\n{seq_text}" if seq_text else "")
    if plan:
        log(f"[{study.name}] {plan}")
    if seq_text:
        log(f"[{study.name}] {seq_text}")
    out_dir = Path(out or f"runs/studies/{study.name}-{scale}").resolve()
    if report_only:
        return build_report(out_dir)
    t0 = time.perf_counter()
    if study.kind == "estimate":
        rows, error = run_estimates(study)
        out_dir.mkdir(parents=True, exist_ok=True)
        plan = {**study_plan(study), "overrides": [], "cells": [], "estimates": rows, "estimator_error": error}
        write_json(out_dir / "study.json", plan)
        if error:
            log(f"[{study.name}] {error}: the report shows the article's numbers only")
    elif ray is not None:
        with on_ray(ray, cpus_per_run=cpus_per_run, gpus_per_run=gpus_per_run, name=study.name, log=log) as (r, slots):
            # a run given several GPUs trains on all of them: one process per GPU (torchrun, DDP)
            records = run_study(study, out_dir, parallel=max(parallel, slots), runner=r, threads=cpus_per_run,
                                nproc=max(1, int(gpus_per_run)), log=log, reuse=reuse)
    elif study.sequential:
        records = sequential.until_decided(
            study, out_dir, budget_s=budget_s, max_seeds=study.sequential["max_seeds"], log=log,
            run_round=lambda st: run_study(st, out_dir, parallel=parallel, runner=runner, log=log, reuse=reuse),
            collect_stats=lambda plan: collect(out_dir, plan).stats, parallel=parallel,
            walls=lambda plan: sequential.cell_walls(collect(out_dir, plan).runs))
    else:
        records = run_study(study, out_dir, parallel=parallel, runner=runner, log=log, reuse=reuse)
    if study.kind == "train" and ray is None:
        failed = [r for r in records if r["status"] == "failed"]
        if failed:
            log(f"[{study.name}] {len(failed)} of {len(records)} runs failed: "
                + ", ".join(f"{r['cell']}/seed-{r['seed']}" for r in failed))
    result = build_report(out_dir)
    log(f"[{study.name}] finished in {_fmt_s(time.perf_counter() - t0)}; report: {result['report_md']}")
    return result

"""Studies: a base config x cells x seeds, each run in its own process, then one report.

A study YAML (configs/studies/<name>.yaml) holds: a base config, overrides (common, and per scale),
`axes` (a dict key -> values expands to the full grid; a list gives named cells), `seeds`, and the
article's claims to check (`findings`, judged in report.py). `kind: estimate` studies train nothing:
they tabulate loralab.estimate for the `rows` instead.

Folder layout (`--out`, default runs/studies/<name>-<scale>):
  study.json                      the expanded plan (so a report never needs the YAML again)
  cells/<cell>/seed-<s>/          one `loralab train` run: cell.yaml, train.log, run_info.json and
                                  everything run_training writes (summary.json marks it done)
  results.csv, report.md, report.html, plots/
Each run is a fresh `python -m loralab.cli train` process, so peak memory is that run's alone and
a crash cannot take the study down. Runs with a summary.json are skipped: rerunning the same
command after an interruption continues where it stopped.
"""
from __future__ import annotations

import copy
import itertools
import json
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from .config import apply_overrides, dump_yaml, from_dict, parse_override, read_yaml
from .errors import UserError
from .fileio import atomic_write_text, write_json
from .report import make_report
from .results import collect, estimate_stats, load_json

PRESET_DIR = Path(__file__).resolve().parents[2] / "configs" / "studies"
SCALES = ("cpu", "gpu")
STUDY_KEYS = {"name", "description", "kind", "base", "seeds", "overrides", "scale", "axes", "findings", "rows",
              "model"}


@dataclass
class Cell:
    name: str
    overrides: list
    seeds: list


@dataclass
class Study:
    name: str
    description: str
    kind: str           # train | estimate
    scale: str
    base: dict          # the base config as a nested dict
    overrides: list     # scale + study + user overrides, applied to every cell in that order
    cells: list         # Cell
    findings: list      # specs for report.judge
    rows: list          # estimate rows (kind: estimate)
    model: str = ""     # estimate: the model the estimator resolves


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml") if not p.stem.startswith("_"))


def _preset_path(name: str) -> Path:
    import difflib

    p = Path(name)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise UserError(f"{p}: study file does not exist")
        return p
    if (PRESET_DIR / f"{name}.yaml").is_file():
        return PRESET_DIR / f"{name}.yaml"
    close = difflib.get_close_matches(name, list_presets(), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise UserError(f"unknown study '{name}'{hint}; presets: {', '.join(list_presets())}")


def _override_text(key: str, value) -> str:
    # JSON is YAML: lists and numbers survive parse_override's yaml.safe_load unchanged.
    return f"{key}={value if isinstance(value, str) else json.dumps(value)}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "cell"


def _str_list(value, where: str) -> list[str]:
    value = [] if value is None else value
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UserError(f"{where} must be a list of key.sub=value strings, got {value!r}")
    for v in value:
        parse_override(v)  # one-line error for a missing '='
    return list(value)


def parse_seeds(value, where: str = "seeds") -> list[int]:
    """An int N means seeds 1..N; a list names them."""
    if type(value) is int and value > 0:
        return list(range(1, value + 1))
    if isinstance(value, list) and value and all(type(s) is int for s in value) and len(set(value)) == len(value):
        return list(value)
    raise UserError(f"{where} must be a positive number or a list of distinct integers, got {value!r}")


def expand_cells(axes, seeds: list[int], where: str = "axes") -> list[Cell]:
    """Axes -> cells. None: one 'default' cell. A dict: the full grid, cells named key-value_key-value
    after each key's last part. A list: named cells, each a list of overrides or
    {name, set: [overrides], seeds: N or [..]} (seeds: a prefix count or a subset for that cell)."""
    if not axes:
        return [Cell("default", [], list(seeds))]
    cells = []
    if isinstance(axes, dict):
        for key, values in axes.items():
            if not isinstance(values, list) or not values:
                raise UserError(f"{where}.{key} must be a non-empty list of values, got {values!r}")
        for combo in itertools.product(*axes.values()):
            pairs = list(zip(axes, combo))
            name = "_".join(_slug(f"{k.rsplit('.', 1)[-1]}-{v}") for k, v in pairs)
            cells.append(Cell(name, [_override_text(k, v) for k, v in pairs], list(seeds)))
    elif isinstance(axes, list):
        for i, item in enumerate(axes):
            here = f"{where}[{i}]"
            if isinstance(item, list):
                cells.append(Cell(_slug("_".join(item)), _str_list(item, here), list(seeds)))
            elif isinstance(item, dict) and "name" in item:
                unknown = set(item) - {"name", "set", "seeds"}
                if unknown:
                    raise UserError(f"{here}: unknown key(s) {', '.join(sorted(unknown))} (known: name, set, seeds)")
                cell_seeds = list(seeds)
                if "seeds" in item:
                    s = item["seeds"]
                    cell_seeds = seeds[:s] if isinstance(s, int) and s > 0 else parse_seeds(s, f"{here}.seeds")
                cells.append(Cell(_slug(str(item["name"])), _str_list(item.get("set", []), f"{here}.set"),
                                  cell_seeds))
            else:
                raise UserError(f"{here} must be a list of overrides or a mapping with name and set, got {item!r}")
    else:
        raise UserError(f"{where} must be a mapping (a grid) or a list (named cells), got {type(axes).__name__}")
    names = [c.name for c in cells]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserError(f"{where}: two cells are named {', '.join(dupes)}; give them distinct names")
    return cells


def load_study(name: str, *, scale: str = "cpu", seeds: int | None = None, overrides=()) -> Study:
    """A preset name or a study YAML path -> an expanded Study (validated: every cell's config builds)."""
    if scale not in SCALES:
        raise UserError(f"--scale must be one of {', '.join(SCALES)}, got {scale!r}")
    path = _preset_path(name)
    spec = read_yaml(path)
    if set(spec) - STUDY_KEYS:
        raise UserError(f"{path}: unknown key(s) {', '.join(sorted(set(spec) - STUDY_KEYS))} "
                        f"(known: {', '.join(sorted(STUDY_KEYS))})")
    if (kind := spec.get("kind", "train")) not in ("train", "estimate"):
        raise UserError(f"{path}: kind must be train or estimate, got {kind!r}")
    scales_file = path.parent / "_scales.yaml"
    common = read_yaml(scales_file) if scales_file.is_file() else {}
    per_scale = spec.get("scale") or {}
    if not isinstance(per_scale, dict) or set(per_scale) - set(SCALES):
        raise UserError(f"{path}: scale must map cpu/gpu to lists of overrides, got {per_scale!r}")
    user = _str_list(list(overrides), "overrides")
    all_overrides = (_str_list(common.get(scale), f"{scales_file}: {scale}") + _str_list(spec.get("overrides"),
                     f"{path}: overrides") + _str_list(per_scale.get(scale), f"{path}: scale.{scale}") + user)
    seed_list = parse_seeds(seeds if seeds is not None else spec.get("seeds", 3), "--seeds" if seeds else "seeds")
    cells = expand_cells(spec.get("axes"), seed_list, f"{path}: axes")
    base = spec.get("base", "../demo.yaml")
    if isinstance(base, str):
        base = read_yaml((path.parent / base) if not Path(base).is_absolute() else base)
    elif not isinstance(base, dict):
        raise UserError(f"{path}: base must be a config path or a mapping, got {base!r}")
    study = Study(name=spec.get("name", path.stem), description=spec.get("description", ""), kind=kind,
                  scale=scale, base=base, overrides=all_overrides, cells=cells,
                  findings=list(spec.get("findings") or []), rows=list(spec.get("rows") or []),
                  model=spec.get("model", ""))
    if kind == "train":
        axis_keys = {".".join(parse_override(o)[0]) for c in cells for o in c.overrides}
        for o in user:
            key = ".".join(parse_override(o)[0])
            if key in axis_keys:
                raise UserError(f"override '{o}' sets {key}, which this study varies across cells")
        if scale == "gpu" and not any(o.startswith("model.name=") for o in user):
            raise UserError("--scale gpu needs the model: add model.name=/path/to/Llama-2-7B (an HF folder)")
        for cell in cells:  # fail now, not an hour in, on a bad key in any cell
            run_config(study, cell, cell.seeds[0], Path("runs/check"))
    return study


def run_config(study: Study, cell: Cell, seed: int, run_dir: Path, extra=()):
    """One run's config: base, then the study's overrides, the cell's, and the run's own (seed, folder)."""
    extra = [*extra, f"train.seed={seed}", f"output_dir={run_dir}", "train.progress=false"]
    try:
        return from_dict(apply_overrides(copy.deepcopy(study.base), study.overrides + cell.overrides + extra))
    except UserError as e:
        raise UserError(f"study {study.name}, cell {cell.name}: {e}") from None


def describe(study: Study) -> str:
    """The dry run's text: every cell with its overrides and seeds."""
    if study.kind == "estimate":
        return "\n".join([f"study {study.name} (estimate, model {study.model}): {len(study.rows)} rows, no training"]
                         + [f"  {r.get('name')}: " + ", ".join(f"{k}={v}" for k, v in r.items() if k != "name")
                            for r in study.rows])
    lines = [f"study {study.name} (scale {study.scale}): {len(study.cells)} cells, "
             f"{sum(len(c.seeds) for c in study.cells)} runs", "  common overrides: " + " ".join(study.overrides)]
    for c in study.cells:
        lines.append(f"  {c.name:<28} seeds {','.join(map(str, c.seeds)):<8} {' '.join(c.overrides) or '(base)'}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Running

Runner = Callable[[list, Path, Path], int]  # (command, run folder, log file) -> exit code


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


def write_json_rec(run_dir: Path, **rec) -> dict:
    write_json(run_dir / "run_info.json", rec)  # kept beside the run: a rerun's report still has its time
    return rec


def _fmt_s(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def study_plan(study: Study) -> dict:
    return {"name": study.name, "description": study.description, "kind": study.kind, "scale": study.scale,
            "overrides": study.overrides, "cells": [asdict(c) for c in study.cells], "findings": study.findings}


def run_study(study: Study, out: str | Path, *, parallel: int = 1, runner: Runner | None = None,
              log: Callable[[str], None] | None = None) -> list[dict]:
    """Run every (cell, seed) not yet done; returns one record per run (status ok/failed/skipped)."""
    out = Path(out).resolve()
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    runner = runner or subprocess_runner
    if parallel < 1:
        raise UserError(f"--parallel must be >= 1, got {parallel}")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "study.json", study_plan(study))
    extra = []
    if parallel > 1 and not any(o.startswith("train.threads=") for o in study.overrides):
        extra = [f"train.threads={max(1, (os.cpu_count() or 1) // parallel)}"]  # no oversubscription
    jobs, records = [], []
    for cell in study.cells:
        for seed in cell.seeds:
            run_dir = out / "cells" / cell.name / f"seed-{seed}"
            if (run_dir / "summary.json").exists():
                records.append({"cell": cell.name, "seed": seed, "status": "skipped"})
            else:
                jobs.append((cell, seed, run_dir))
    total, done, durations, lock = len(jobs), [0], [], threading.Lock()
    if records:
        log(f"[{study.name}] {len(records)} runs already done, skipped; {total} to run")

    def one(job):
        cell, seed, run_dir = job
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "cell.yaml", dump_yaml(run_config(study, cell, seed, run_dir, extra)))
        with lock:
            log(f"[{study.name}] start {cell.name} seed {seed}")
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "loralab.cli", "train", str(run_dir / "cell.yaml")]
        try:
            code = runner(cmd, run_dir, run_dir / "train.log")
        except OSError as e:
            code = f"could not start: {e}"
        wall = time.perf_counter() - t0
        ok = code == 0 and (run_dir / "summary.json").exists()
        err = None if ok else (code if isinstance(code, str) else f"exit {code}: {_last_error(run_dir / 'train.log')}")
        rec = write_json_rec(run_dir, cell=cell.name, seed=seed, status="ok" if ok else "failed",
                             wall_s=round(wall, 1), error=err)
        with lock:
            done[0] += 1
            durations.append(wall)
            eta = sum(durations) / len(durations) * (total - done[0]) / parallel
            what = f"done in {wall:.0f} s" if ok else f"FAILED after {wall:.0f} s ({err}; log {run_dir / 'train.log'})"
            log(f"[{study.name}] {done[0]}/{total} {cell.name} seed {seed} {what}; ETA {_fmt_s(eta)}")
        return rec

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        records += list(pool.map(one, jobs))
    write_json(out / "runs.json", records)
    return records


def run_estimates(study: Study) -> tuple[list[dict], str | None]:
    """Each row through loralab.estimate; rows keep the article's numbers."""
    keys = ("method", "r", "targets", "seq", "batch", "grad_accum", "optimizer", "precision", "grad_checkpointing",
            "device")
    rows = [{**r, "settings": ", ".join(f"{k}={r[k]}" for k in keys if k in r)} for r in study.rows]
    from .arch import resolve_model_config
    from .estimate import estimate

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
    stats, runs = (estimate_stats(plan), []) if plan.get("kind") == "estimate" else collect(study_dir, plan)
    return make_report(study_dir, plan, stats, runs)


def study_command(name: str, *, scale: str = "cpu", out: str | None = None, seeds: int | None = None,
                  parallel: int = 1, dry_run: bool = False, report_only: bool = False, overrides=(),
                  runner: Runner | None = None, log: Callable[[str], None] | None = None) -> dict | str:
    """`loralab study`: load, then print (dry run), rebuild the report, or run and report."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    study = load_study(name, scale=scale, seeds=seeds, overrides=overrides)
    if dry_run:
        return describe(study)
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
    else:
        records = run_study(study, out_dir, parallel=parallel, runner=runner, log=log)
        failed = [r for r in records if r["status"] == "failed"]
        if failed:
            log(f"[{study.name}] {len(failed)} of {len(records)} runs failed: "
                + ", ".join(f"{r['cell']}/seed-{r['seed']}" for r in failed))
    result = build_report(out_dir)
    log(f"[{study.name}] finished in {_fmt_s(time.perf_counter() - t0)}; report: {result['report_md']}")
    return result

"""`loralab tune CONFIG --budget 30m --space "lr=[...] lora.r=[...] lora.alpha=[...]"`: a budgeted search.

Successive halving (Jamieson & Talwalkar 2016; the synchronous form of ASHA): every point of the
grid trains a short run (seed 1); the best third by validation loss (`final_val_loss`, the runs'
validation split) trains three times longer, and so on until one point is left at the config's own
length. Each rung's runs are fresh `loralab train` processes (a study's cells, runner.run_study),
so a rung's result never depends on how the previous one ended. Then the chosen point and the
config as given (the default) run side by side on seeds 1..3 and the report gives their paired
interval on the held-out loss (items neither the search nor training saw), with the rule that chose.

Why hand-written and not Optuna: the search space here is a small grid given on the command line,
the rungs are whole processes the study runner already launches, resumes and reports, and the
halving rule is a dozen lines; Optuna's pruners act inside one process's training loop, which would
mean a callback into the loop and a storage, to get the same rule.
"""
from __future__ import annotations

import copy
import itertools
import math
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from ..config import apply_overrides, from_dict, parse_override, read_yaml
from ..errors import UserError
from ..io.fileio import write_json
from ..train.optim import plan_steps
from .results import collect
from .sequential import parse_duration
from .spec import DEMO_CONFIG, VALIDATION_ONLY, Cell, Study, _override_text, _slug, _with_rule, study_plan
from .verdicts import validate_findings

ETA = 3           # each rung keeps the best third and trains it ETA times longer
MIN_STEPS = 5     # the shortest rung
FINAL_SEEDS = [1, 2, 3]
ALIASES = {"lr": "train.lr", "r": "lora.r", "alpha": "lora.alpha", "rank": "lora.r"}
SELECT = "final_val_loss"
DEMO_SPACE = "lr=[1e-3, 2e-3, 4e-3] lora.r=[8, 16, 32]"  # `loralab tune demo`: the demo's rate and rank


def parse_space(text: str) -> dict:
    """'lr=[1e-4, 2e-4] lora.r=[8, 16]' -> {'train.lr': [...], 'lora.r': [...]}."""
    pairs = [p for p in text.replace("] ", "]\n").splitlines() if p.strip()]
    space = {}
    for pair in pairs:
        key, sep, values = pair.strip().partition("=")
        try:
            parsed = yaml.safe_load(values) if sep else None
        except yaml.YAMLError:
            parsed = None
        if not sep or not isinstance(parsed, list) or not parsed:
            raise UserError(f"--space: {pair.strip()!r} must be key=[value, ...] (e.g. lr=[1e-4, 2e-4])")
        space[ALIASES.get(key.strip(), key.strip())] = parsed
    if not space:
        raise UserError("--space names nothing to search, e.g. --space \"lr=[1e-4, 3e-4] lora.r=[8, 16]\"")
    return space


def grid(space: dict) -> list[tuple[str, list[str]]]:
    """Every combination as (a name, its overrides)."""
    out = []
    for combo in itertools.product(*space.values()):
        ovs = [_override_text(k, v) for k, v in zip(space, combo)]
        out.append((_slug("_".join(f"{k.rsplit('.', 1)[-1]}-{v}" for k, v in zip(space, combo))), ovs))
    return out


def rungs(n_points: int, final_steps: int) -> list[tuple[int, int]]:
    """[(points trained, steps each)] from the whole grid down to one point at final_steps."""
    k = max(0, math.ceil(math.log(n_points, ETA))) if n_points > 1 else 0
    out, n = [], n_points
    for i in range(k, -1, -1):
        out.append((n, max(MIN_STEPS, final_steps // ETA ** i)))
        n = max(1, math.ceil(n / ETA))
    return [r for r in out if r[0] > 1] or [(1, final_steps)]


def rung_steps(base: dict, overrides: list, steps: int, final: int) -> list[str]:
    """A rung's length, its warmup shrunk in proportion: the schedule keeps its shape. A rung shorter
    than the full warmup would never reach the peak rate, which favours the points whose rate is too
    high (the demo warms up 10 steps; its first rung is 6)."""
    warmup = from_dict(apply_overrides(copy.deepcopy(base), overrides)).train.warmup_steps
    return [f"train.max_steps={steps}"] + ([f"train.warmup_steps={round(warmup * steps / final)}"]
                                           if warmup and steps < final else [])


def _study(name: str, base: dict, overrides: list, cells: list, findings=()) -> Study:
    names = [c.name for c in cells]
    findings = [_with_rule(f, {c.name: c.seeds for c in cells}) for f in validate_findings(list(findings), names, name)]
    return Study(name=name, description="", kind="train", scale="cpu", base=base, overrides=overrides,
                 cells=cells, findings=findings, rows=[])


def _search_report(out_dir: Path, config: str, chosen: str, rule: str, history: list) -> Path:
    """report.md of a search that chose the config as given: the rungs' scores, the rule."""
    points = list(history[0]["scores"])
    lines = [f"# loralab tune {config}", "",
             f"Chose **{chosen}**, which is the config as given, by {rule}: there is nothing to compare it with, so "
             "no final runs were made.", "", f"{SELECT} (seed 1) at each rung:", "",
             "| point | " + " | ".join(f"{h['steps']} steps" for h in history) + " |",
             "|---" * (len(history) + 1) + "|"]
    lines += ["| " + " | ".join([p] + [f"{h['scores'][p]:.4g}" if p in h["scores"] else "-" for h in history]) + " |"
              for p in points]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def tune_command(config: str, *, ray: str | None = None, **kw) -> dict | str:
    """Search, then compare the choice with the default; returns the final comparison's report (a dry
    run: the plan). ray: each run a Ray task (auto, local or a cluster address), one CPU each, as many at
    once as the cluster holds; attached once the plan is checked. Other keywords: _tune's."""
    if ray is None or kw.get("dry_run"):
        return _tune(config, **kw)
    from . import runner

    _tune(config, **{**kw, "dry_run": True})  # bad input is refused before a cluster is attached
    with runner.on_ray(ray, name="tune", log=kw.get("log", print)) as (ray_runner, slots):
        def on_cluster(study, out, log, parallel):
            return runner.run_study(study, out, parallel=max(parallel, slots), runner=ray_runner, threads=1, log=log)

        return _tune(config, **{**kw, "run_study": on_cluster})


def _tune(config: str, *, space: str | None = None, budget: str = "30m", out: str | None = None, overrides=(),
          parallel: int = 1, run_study: Callable | None = None, build_report: Callable | None = None,
          log: Callable[[str], None] = print, dry_run: bool = False, clock=time.monotonic) -> dict | str:
    """tune_command on this machine (or through run_study's runner). parallel: runs at a time (each with
    its share of the cores, as `loralab study --parallel`)."""
    from . import runner

    run_study = run_study or runner.run_study
    build_report = build_report or runner.build_report
    base = read_yaml(DEMO_CONFIG if config == "demo" else Path(config))
    user = list(overrides)
    points = grid(parse_space(space or (DEMO_SPACE if config == "demo" else "")))
    budget_s = parse_duration(budget)
    for name, ovs in points:  # every point builds a valid config, before anything runs
        try:
            from_dict(apply_overrides(copy.deepcopy(base), user + ovs))
        except UserError as e:
            raise UserError(f"--space point {name}: {e}") from None
    for o in user:
        key = ".".join(parse_override(o)[0])
        if any(key == k for _, ovs in points for k in (".".join(parse_override(x)[0]) for x in ovs)):
            raise UserError(f"override '{o}' sets {key}, which --space searches")
    cfg = from_dict(apply_overrides(copy.deepcopy(base), user))
    if cfg.train.max_steps:
        final = cfg.train.max_steps
    else:
        from ..prepare import build_datasets  # data only: no model loads

        final = plan_steps(len(build_datasets(cfg).train), cfg.train)
    # held-out loss needs generated tasks (items the run never saw); a data.path run compares validation loss
    metric = "final_val_loss" if cfg.data.path else "heldout_loss"
    plan = rungs(len(points), final)
    lines = [f"tune {config}: {len(points)} points, successive halving (keep the best 1/{ETA} by {SELECT}, "
             f"{ETA}x the steps): " + ", ".join(f"{n} x {s} steps" for n, s in plan),
             f"  then the chosen point vs the config as given on seeds {FINAL_SEEDS} ({final} steps each, paired); "
             f"at most {budget_s / 60:.0f} min"]
    if dry_run:
        return "\n".join(lines + [f"  {name}: {' '.join(ovs)}" for name, ovs in points])
    for line in lines:
        log(line)
    out_dir = Path(out or f"runs/tune/{Path(config).stem}").resolve()
    start, alive, history = clock(), points, []
    for i, (_, steps) in enumerate(plan):
        # a rung reads only the validation loss: its runs skip the final evaluations
        cells = [Cell(name, ovs + rung_steps(base, user + ovs, steps, final) + VALIDATION_ONLY, [1])
                 for name, ovs in alive]
        study = _study(f"tune-rung{i}", base, user, cells)
        run_study(study, out_dir / f"rung-{i}", log=log, parallel=parallel)
        stats = collect(out_dir / f"rung-{i}", study_plan(study)).stats
        scores = {c.name: stats[c.name][SELECT].mean for c in cells if SELECT in stats.get(c.name, {})}
        if not scores:
            raise UserError(f"tune: no run of rung {i} finished; see {out_dir / f'rung-{i}'}/cells/*/seed-1/train.log")
        history.append({"rung": i, "steps": steps, "scores": scores})
        ranked = sorted(alive, key=lambda p: scores.get(p[0], math.inf))
        keep = max(1, math.ceil(len(alive) / ETA))
        alive = ranked[:keep]
        log(f"tune: rung {i} ({steps} steps): best {ranked[0][0]} ({scores[ranked[0][0]]:.4g}); keeping {keep}")
        if clock() - start > budget_s * 0.6 and i < len(plan) - 1:  # leave the final comparison its time
            log("tune: budget: stopping the search here; the best so far is chosen")
            alive = alive[:1]
            break
    chosen_name, chosen_ovs = alive[0]
    rule = (f"successive halving over {len(points)} points: the lowest {SELECT} (validation split, seed 1) at each "
            f"rung of {', '.join(str(h['steps']) for h in history)} steps, keeping the best 1/{ETA}")
    write_json(out_dir / "search.json", {"points": points, "history": history, "chosen": chosen_name, "rule": rule})
    if from_dict(apply_overrides(copy.deepcopy(base), user + list(chosen_ovs))) == cfg:
        # the tuned runs would be the default's, seed for seed: a paired interval of exactly zero
        log(f"tune: chose {chosen_name} ({' '.join(chosen_ovs)}), which is the config as given: nothing to compare")
        return {"report_md": _search_report(out_dir, config, chosen_name, rule, history), "chosen": chosen_name,
                "overrides": chosen_ovs, "rule": rule, "history": history, "same_as_given": True}
    finding = {"claim": f"the tuned point ({' '.join(chosen_ovs)}) beats the config as given",
               "check": "lower", "a": "tuned", "b": "default", "metric": metric,
               "if_unclear": "more seeds: loralab study on a study YAML with these two cells, --until-decided"}
    cells = [Cell("tuned", list(chosen_ovs), list(FINAL_SEEDS)), Cell("default", [], list(FINAL_SEEDS))]
    extra = ["eval.loss_items=1020"] if cfg.eval.loss_items == 0 and not cfg.data.path else []
    final_study = _study("tune", base, user + extra, cells, [finding])
    final_study.description = f"loralab tune {config}: chosen by {rule}."
    run_study(final_study, out_dir / "final", log=log, parallel=parallel)
    result = build_report(out_dir / "final")
    log(f"tune: chose {chosen_name} ({' '.join(chosen_ovs)}) by {rule}; report: {result['report_md']}")
    return {**result, "chosen": chosen_name, "overrides": chosen_ovs, "rule": rule, "history": history}

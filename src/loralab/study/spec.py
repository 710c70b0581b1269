"""A study's definition: a base config x cells x seeds, expanded from a preset or a study YAML.

A study YAML (presets/<name>.yaml, shipped inside the package) holds: a base config, overrides
(common, and per scale), `axes` (a dict key -> values expands to the full grid; a list gives named
cells), `seeds`, and the article's claims to check (`findings`, judged in report.py).
`kind: estimate` studies train nothing: they tabulate loralab.memory.estimate for the `rows`
instead. Each (cell, seed) is run in its own process by runner.py, then reported by report.py.
"""
from __future__ import annotations

import copy
import itertools
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from ..config import apply_overrides, from_dict, parse_override, read_yaml
from ..errors import UserError
from ..peft.presets import COMBINE_METHODS, NEEDS_DENSITY
from .sweeps import SELECT_METRICS, expand_points
from .verdicts import rule_text, test_for, validate_findings

PRESET_DIR = Path(__file__).resolve().parent / "presets"  # package data: found after any install
DEMO_CONFIG = Path(__file__).resolve().parents[1] / "bundled" / "demo.yaml"  # the default base
SCALES = ("cpu", "gpu")
# A run whose only use is its validation loss (a sweep point, a tune rung): none of the final evaluations,
# which at the cpu scale cost more than a 40-step run's training (mostly the 1,020 held-out loss items'
# forwards; docs/studies.md). A sweep's chosen point is evaluated afterwards, resumed at its last step.
VALIDATION_ONLY = ["eval.tasks=[]", "eval.before=false", "eval.stop_check=false", "eval.test_loss=false",
                   "eval.forgetting=false", "eval.loss_items=0", "eval.preference=false"]
STUDY_KEYS = {"name", "summary", "time", "description", "kind", "base", "seeds", "overrides", "scale", "axes",
              "findings", "rows", "model", "sweep", "sweep_seeds", "select", "corpus"}


@dataclass
class Cell:
    name: str
    overrides: list
    seeds: list
    combine: dict | None = None  # a combine cell: earlier cells' adapters combined, then evaluated
    after: str | None = None     # a staged cell: each seed starts from that cell's adapter merged in (model.adapter)
    points: list | None = None   # a swept cell: [[point name, [overrides]], ...] (sweeps.py)
    sweep_seeds: list | None = None  # the seeds every point runs; the rest run at the chosen point only

    def overrides_at(self, point: str | None) -> list:
        """The cell's overrides, then its sweep point's."""
        extra = dict(self.points or {}).get(point, []) if point else []
        return self.overrides + extra

COMBINE_KEYS = {"adapters", "weights", "method", "density", "svd_rank"}
CELL_KEYS = {"name", "set", "seeds", "combine", "sweep", "after"}


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
    select: str = "final_val_loss"  # what a sweep minimises (a validation metric)
    sequential: dict | None = None  # --until-decided: per-look level and its looks (sequential.py)


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml") if not p.stem.startswith("_"))


def describe_presets() -> str:
    """`loralab study list`: each preset with its one-line summary and expected wall time."""
    rows = []
    for name in list_presets():
        spec = read_yaml(PRESET_DIR / f"{name}.yaml")
        rows.append((name, str(spec.get("summary") or ""), str(spec.get("time") or "?")))
    width = max(len(n) for n, *_ in rows)
    twidth = max(len(t) for *_, t in rows)
    head = (f"{'preset':<{width}}  {'time':<{twidth}}  what it compares (time: wall, --scale cpu --parallel 2 "
            f"on 2 cores with AVX-512 bf16; an AVX2-only CPU takes several times longer: docs/studies.md)")
    return "\n".join([head] + [f"{n:<{width}}  {t:<{twidth}}  {s}" for n, s, t in rows])


def study_time(name: str) -> str:
    """A study's expected wall time as its YAML states it (`time:`), or '?'."""
    return f"~{str(read_yaml(_preset_path(name)).get('time') or '?').lstrip('~')}"


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


def expand_cells(axes, seeds: list[int], where: str = "axes", sweep=None, sweep_seeds: int = 1) -> list[Cell]:
    """Axes -> cells. None: one 'default' cell. A dict: the full grid, cells named key-value_key-value
    after each key's last part. A list: named cells, each a list of overrides or
    {name, set: [overrides], seeds: N or [..], sweep: {key: [values]}} (seeds: a prefix count or a
    subset for that cell; sweep: its own grid, or {} for none, instead of the study's `sweep`)."""
    cells = _expand(axes, seeds, where)
    for c in cells:
        own = c.points  # _expand parks a named cell's own sweep mapping here
        grid = sweep if own is None else own
        c.points = None
        if own and c.after:
            raise UserError(f"{where}: cell {c.name} starts from {c.after}'s adapters; it cannot sweep (it runs "
                            f"after {c.after}): set its values")
        if grid and not c.combine and not c.after:  # a staged cell runs at its own values
            c.points = expand_points(grid, f"{where}: cell {c.name}: sweep")
            c.sweep_seeds = c.seeds[:sweep_seeds]
            keys = {".".join(parse_override(o)[0]) for _, ovs in c.points for o in ovs}
            if clash := sorted(k for k in keys if any(o.startswith(k + "=") for o in c.overrides)):
                raise UserError(f"{where}: cell {c.name} sets {', '.join(clash)} and also sweeps it")
        elif own and c.combine:
            raise UserError(f"{where}: cell {c.name} combines adapters; it cannot sweep (the cells it combines can)")
    return cells


def _expand(axes, seeds: list[int], where: str) -> list[Cell]:
    if not axes:
        return [Cell("default", [], list(seeds))]
    cells = []
    if isinstance(axes, dict):
        for key, values in axes.items():
            if not isinstance(key, str) or not key:
                raise UserError(f"{where} keys must be config keys such as lora.r, got {key!r}")
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
                overrides = _str_list(item, here)  # checked before its name is made of it
                cells.append(Cell(_slug("_".join(overrides)), overrides, list(seeds)))
            elif isinstance(item, dict) and "name" in item:
                unknown = set(item) - CELL_KEYS
                if unknown:
                    raise UserError(f"{here}: unknown key(s) {', '.join(sorted(map(str, unknown)))} "
                                    f"(known: {', '.join(sorted(CELL_KEYS))})")
                after = item.get("after")
                if after is not None and (not isinstance(after, str) or "combine" in item):
                    raise UserError(f"{here}.after must name one training cell (and a cell either combines "
                                    f"adapters or starts from one), got {after!r}")
                cell_seeds = list(seeds)
                if "seeds" in item:
                    s = item["seeds"]
                    cell_seeds = seeds[:s] if isinstance(s, int) and s > 0 else parse_seeds(s, f"{here}.seeds")
                cells.append(Cell(_slug(str(item["name"])), _str_list(item.get("set", []), f"{here}.set"),
                                  cell_seeds, _combine_spec(item.get("combine"), f"{here}.combine"),
                                  points=item.get("sweep"), after=after))  # points: its own sweep, expanded later
            else:
                raise UserError(f"{here} must be a list of overrides or a mapping with name and set, got {item!r}")
    else:
        raise UserError(f"{where} must be a mapping (a grid) or a list (named cells), got {type(axes).__name__}")
    names = [c.name for c in cells]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserError(f"{where}: two cells are named {', '.join(dupes)}; give them distinct names")
    trained = {c.name: c for c in cells if c.combine is None and c.after is None}
    for c in cells:
        for src in sources(c):
            if src not in trained:
                verb = "combines" if c.combine else "starts from"
                raise UserError(f"{where}: cell {c.name} {verb} {src!r}, which is not a training cell of this study "
                                f"(one that neither combines nor starts from adapters)")
            if set(c.seeds) - set(trained[src].seeds):
                raise UserError(f"{where}: cell {c.name} runs seeds that cell {src} does not train")
    return cells


def sources(cell: Cell) -> list[str]:
    """The cells whose adapters of the same seed this cell needs: those it combines or starts from."""
    return list((cell.combine or {}).get("adapters", [])) + ([cell.after] if cell.after else [])


def _combine_spec(spec, where: str) -> dict | None:
    """A combine cell's settings: {adapters: [cell, ...], weights, method, density, svd_rank}."""
    if spec is None:
        return None
    if not isinstance(spec, dict) or set(spec) - COMBINE_KEYS:
        raise UserError(f"{where} must be a mapping with keys {', '.join(sorted(COMBINE_KEYS))}, got {spec!r}")
    adapters = spec.get("adapters")
    if not isinstance(adapters, list) or not adapters or not all(isinstance(a, str) for a in adapters):
        raise UserError(f"{where}.adapters must list the cells whose adapters are combined, got {adapters!r}")
    weights = spec.get("weights", [1.0] * len(adapters))
    if not isinstance(weights, list) or len(weights) != len(adapters) or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights):
        raise UserError(f"{where}.weights must be one number per adapter, got {weights!r}")
    method, density = spec.get("method", "svd"), spec.get("density")
    if method not in COMBINE_METHODS:
        raise UserError(f"{where}.method must be one of {', '.join(COMBINE_METHODS)}, got {method!r}")
    if method in NEEDS_DENSITY and not (isinstance(density, (int, float)) and 0 < density <= 1):
        raise UserError(f"{where}.density must be in (0, 1] for {method}, got {density!r}")
    return {"adapters": [_slug(a) for a in adapters], "weights": [float(w) for w in weights],
            "method": method, "density": density, "svd_rank": spec.get("svd_rank")}


def load_study(name: str, *, scale: str = "cpu", seeds: int | None = None, overrides=()) -> Study:
    """A preset name or a study YAML path -> an expanded Study (validated: every cell's config builds)."""
    if scale not in SCALES:
        raise UserError(f"--scale must be one of {', '.join(SCALES)}, got {scale!r}")
    path = _preset_path(name)
    spec = read_yaml(path)
    if set(spec) - STUDY_KEYS:
        raise UserError(f"{path}: unknown key(s) {', '.join(sorted(map(str, set(spec) - STUDY_KEYS)))} "
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
    if "corpus" in spec:  # continued pretraining: generated text as every run's data.path (corpus.py)
        from .corpus import corpus_path

        all_overrides.insert(0, f"data.path={corpus_path(spec['corpus'], f'{path}: corpus')}")
    seed_list = parse_seeds(seeds if seeds is not None else spec.get("seeds", 3), "--seeds" if seeds else "seeds")
    sweep_seeds, select = spec.get("sweep_seeds", 1), spec.get("select", "final_val_loss")
    if type(sweep_seeds) is not int or sweep_seeds < 1:
        raise UserError(f"{path}: sweep_seeds must be a positive number, got {sweep_seeds!r}")
    if select not in SELECT_METRICS:
        raise UserError(f"{path}: select must be one of {', '.join(SELECT_METRICS)} (a validation metric), "
                        f"got {select!r}")
    cells = expand_cells(spec.get("axes"), seed_list, f"{path}: axes", sweep=spec.get("sweep"),
                         sweep_seeds=sweep_seeds)
    base = spec.get("base", str(DEMO_CONFIG))
    if isinstance(base, str):
        base = read_yaml((path.parent / base) if not Path(base).is_absolute() else base)
    elif not isinstance(base, dict):
        raise UserError(f"{path}: base must be a config path or a mapping, got {base!r}")
    rows = spec.get("rows") or []
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise UserError(f"{path}: rows must be a list of mappings (one per estimate), got {rows!r}")
    names = [c.name for c in cells] if kind == "train" else [r.get("name") for r in rows]
    findings = validate_findings(spec.get("findings") or [], names, str(path))
    study = Study(name=spec.get("name", path.stem), description=spec.get("description", ""), kind=kind,
                  scale=scale, base=base, overrides=all_overrides, cells=cells,
                  findings=[_with_rule(f, {c.name: c.seeds for c in cells}) for f in findings], rows=rows,
                  model=spec.get("model", ""), select=select)
    if kind == "train":
        axis_keys = {".".join(parse_override(o)[0]) for c in cells
                     for o in c.overrides + [o for _, ovs in c.points or [] for o in ovs]}
        for o in user:
            key = ".".join(parse_override(o)[0])
            if key in axis_keys:
                raise UserError(f"override '{o}' sets {key}, which this study varies across cells")
        if scale == "gpu" and not any(o.startswith("model.name=") for o in user):
            raise UserError("--scale gpu needs the model: add model.name=/path/to/Llama-2-7B (an HF folder)")
        for cell in cells:  # fail now, not an hour in, on a bad key in any cell or sweep point
            for point in [p for p, _ in cell.points] if cell.points else [None]:
                run_config(study, cell, cell.seeds[0], Path("runs/check"), point=point)
    return study


def _with_rule(finding: dict, cell_seeds: dict) -> dict:
    """A finding with the test its differences use (paired or Welch, from its cells' seeds) and its rule in words."""
    finding = {k: v for k, v in finding.items() if k != "test"}
    if (test := test_for(finding, cell_seeds)) is not None:
        finding["test"] = test
    return {**finding, "rule": rule_text(finding)}


def run_config(study: Study, cell: Cell, seed: int, run_dir: Path, extra=(), point: str | None = None):
    """One run's config: base, then the study's overrides, the cell's (and its sweep point's), and
    the run's own (seed, folder)."""
    extra = [*extra, f"train.seed={seed}", f"output_dir={run_dir}", "train.progress=false"]
    try:
        return from_dict(apply_overrides(copy.deepcopy(study.base), study.overrides + cell.overrides_at(point) + extra))
    except UserError as e:
        at = f" at {point}" if point else ""
        raise UserError(f"study {study.name}, cell {cell.name}{at}: {e}") from None


def count_runs(study: Study) -> int:
    """Runs a study makes: every seed of a cell, plus a swept cell's other points on its sweep seeds."""
    return sum(len(c.seeds) + (len(c.points) - 1) * len(c.sweep_seeds) if c.points else len(c.seeds)
               for c in study.cells)


def describe(study: Study) -> str:
    """The dry run's text: every cell with its overrides and seeds."""
    rules = ["  verdict rules (fixed before the run):"] + [f"    F{i}. {f['rule']}"
                                                          for i, f in enumerate(study.findings, 1)]
    if study.kind == "estimate":
        return "\n".join([f"study {study.name} (estimate, model {study.model}): {len(study.rows)} rows, no training"]
                         + [f"  {r.get('name')}: " + ", ".join(f"{k}={v}" for k, v in r.items() if k != "name")
                            for r in study.rows] + rules)
    lines = [f"study {study.name} (scale {study.scale}): {len(study.cells)} cells, {count_runs(study)} runs",
             "  common overrides: " + " ".join(study.overrides)]
    for c in study.cells:
        what = " ".join(c.overrides) or "(base)"
        if c.combine:
            k = c.combine
            parts = ", ".join(f"{a} x{w:g}" for a, w in zip(k["adapters"], k["weights"]))
            density = f" (density {k['density']})" if k["density"] is not None else ""
            what = f"combine {k['method']} of {parts}{density}" + (f" {what}" if c.overrides else "")
        if c.after:
            what = f"after {c.after} (its adapter of the same seed merged in): {what}"
        lines.append(f"  {c.name:<28} seeds {','.join(map(str, c.seeds)):<8} {what}")
        if c.points:
            lines.append(f"  {'':<28} sweep on seed(s) {','.join(map(str, c.sweep_seeds))} (validating only), lowest "
                         f"{study.select} chosen: " + " | ".join(" ".join(ovs) for _, ovs in c.points))
    return "\n".join(lines + (rules if study.findings else []))




def study_plan(study: Study) -> dict:
    return {"name": study.name, "description": study.description, "kind": study.kind, "scale": study.scale,
            "overrides": study.overrides, "cells": [asdict(c) for c in study.cells], "findings": study.findings,
            "select": study.select, **({"sequential": study.sequential} if study.sequential else {})}

"""A study's CPU time plan (study/plan.py) against the runs its folder holds, measured on this CPU.

    PYTHONPATH=src python benchmarks/study_plan_check.py runs/studies/targets-cpu [--gflops 34]

Prints JSON: per cell (and sweep point), the plan's seconds for training (with its validations) and
for the final evaluation beside the runs' (summary.json `phase_s`: `training` of runs that were not
resumed, `the final evaluation` of runs that made one), then the median ratios measured / planned and
the shares (memory/cpu_time.py) that would make them 1. Run it on the CPU the runs were made on: the
plan measures this CPU's rate now (on busy cores it measures low; --gflops gives a rate measured on
quiet ones).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

import yaml

from loralab.memory import cpu_time
from loralab.study import plan
from loralab.study.spec import load_study


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--gflops", type=float, help="this CPU's rate (default: measured now)")
    args = ap.parse_args(argv)
    recorded = json.loads((args.folder / "study.json").read_text())
    study = load_study(recorded["name"], scale=recorded["scale"])
    runs = sorted(args.folder.glob("cells/**/summary.json"))
    if not runs:
        print(f"{args.folder}: no finished runs", file=sys.stderr)
        return 2
    config = yaml.safe_load((runs[0].parent / "config.yaml").read_text())
    threads = int(config["train"].get("threads") or 1)
    if args.gflops:  # the plan's device, at the rate given
        measured = cpu_time.cpu_device(config["train"]["precision"], threads)
        fixed = dataclasses.replace(measured, flops=args.gflops * 1e9, label=f"{args.gflops} GFLOP/s (given)")
        plan.cpu_device = lambda precision, threads: fixed
    rows = {r["cell"]: r for r in plan.plan_rows(study, cpu_threads=threads)}
    out, ratios = [], {"train": [], "eval": []}
    for path in runs:
        summary = json.loads(path.read_text())
        parts = path.parent.relative_to(args.folder / "cells").parts[:-1]  # cell[, point]
        row = rows.get(" @ ".join(parts))
        if row is None:
            continue
        phases = summary.get("phase_s") or {}
        train = phases.get("training") if not summary.get("resumed_from_step") else None
        final = phases.get("the final evaluation") or None
        out.append({"run": "/".join(path.parent.relative_to(args.folder / "cells").parts),
                    "train_s": train, "plan_train_s": round(row["train_s"], 1),
                    "eval_s": final, "plan_eval_s": round(row["eval_s"], 1)})
        if train:
            ratios["train"].append(train / row["train_s"])
        if final and row["eval_s"]:
            ratios["eval"].append(final / row["eval_s"])
    device = next(iter(rows.values()))["gpu"]
    med = {k: statistics.median(v) if v else None for k, v in ratios.items()}
    fitted = {"CPU_TRAIN_UTILISATION": cpu_time.CPU_TRAIN_UTILISATION / med["train"] if med["train"] else None,
              "CPU_FORWARD_UTILISATION": cpu_time.CPU_FORWARD_UTILISATION / med["eval"] if med["eval"] else None}
    print(json.dumps({"study": str(args.folder), "device": device, "runs": out,
                      "median_measured_over_planned": med, "runs_counted": {k: len(v) for k, v in ratios.items()},
                      "shares_that_fit": fitted}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

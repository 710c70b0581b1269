"""A study's combine cell, in its own process: combine the adapters earlier cells of the same seed
trained (`loralab combine`), evaluate the result on the cell's tasks, and write a summary.json
shaped like a training run's (eval accuracy, trainable parameters, run time), so results.py and
the report read it like any other run.

    python -m loralab.study.combine_cell CELL_YAML COMBINE_JSON
CELL_YAML: the cell's run config (model, tasks, eval settings, output_dir); COMBINE_JSON:
{adapters: [[folder, weight], ...], method, density, svd_rank, seed} (written by runner.py).
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from ..config import load_config
from ..errors import UserError
from ..io.fileio import write_json


def run_combine_cell(cell_yaml: str | Path, combine_json: str | Path) -> dict:
    from ..inference import load_with_adapter
    from ..peft.adapter_files import read_weights
    from ..peft.combine import combine_adapters
    from ..pipeline import run_evals
    from ..prepare import build_datasets

    t0 = time.perf_counter()
    cfg = load_config(cell_yaml)
    spec = json.loads(Path(combine_json).read_text())
    out = Path(cfg.output_dir)
    shutil.rmtree(out / "adapter", ignore_errors=True)  # an earlier attempt that wrote no summary
    adapter = combine_adapters([(folder, w) for folder, w in spec["adapters"]], out / "adapter",
                               method=spec["method"], density=spec.get("density"), svd_rank=spec.get("svd_rank"),
                               seed=spec.get("seed", 0))
    combine_s = time.perf_counter() - t0
    model, tok = load_with_adapter(cfg.model.name, str(adapter))
    after = run_evals(model, tok, build_datasets(cfg).tests, cfg)
    summary = {"method": spec["method"], "combined_from": [f for f, _ in spec["adapters"]],
               "trainable_params": sum(t.numel() for t in read_weights(adapter).values()),
               "runtime_s": round(combine_s, 3),  # what making the adapter took (a run's: training)
               "eval": {task: {"after": r["accuracy"], "n": r["n"]} for task, r in after.items()}, "warnings": []}
    write_json(out / "summary.json", summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m loralab.study.combine_cell CELL_YAML COMBINE_JSON", file=sys.stderr)
        return 2
    try:
        summary = run_combine_cell(*args)
    except UserError as e:
        print(f"loralab: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary["eval"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""lm-evaluation-harness, in-process, on the model object loralab already holds (the `loralab[eval]`
extra; imported only here).

lm-eval's own HF model class (HFLM) wraps our model and tokenizer, so what it scores is exactly
what loralab trained: base + LoRA modules, no export. Offline: HF_DATASETS_OFFLINE / HF_HUB_OFFLINE
are set, so tasks must read local files, as loralab's own (eval/tasks/, harness_tasks.py) and any
`--include-path` folder's do. lm-eval's built-in tasks are indexed only when a name asked for is not
found among those (indexing them takes seconds).
"""
from __future__ import annotations

import difflib
import os
import sys

from ..errors import UserError
from .harness_tasks import TASKS_DIR
from .metrics import fp32_decoding_on_cpu


def _task_manager(names: list[str], include_path: list[str]):
    from lm_eval.tasks import TaskManager

    for folder in include_path:
        if not os.path.isdir(folder):
            raise UserError(f"--include-path {folder}: no such folder")
    paths = [str(TASKS_DIR), *include_path]
    manager = TaskManager(include_path=paths, include_defaults=False)
    if not set(names) <= set(manager.all_tasks):
        manager = TaskManager(include_path=paths)
    missing = [n for n in names if n not in manager.all_tasks]
    if missing:
        close = difflib.get_close_matches(missing[0], manager.all_tasks, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        ours = sorted(t for t in manager.all_tasks if t.startswith("loralab"))
        raise UserError(f"--harness: unknown lm-eval task {missing[0]!r}{hint}; loralab's: {', '.join(ours)}; "
                        "--include-path DIR adds your own task files")
    return manager


def _scores(task_results: dict) -> dict[str, float]:
    """lm-eval's 'metric,filter' -> value entries of one task, without the stderr ones."""
    out = {}
    for key, value in task_results.items():
        metric, _, _filter = key.partition(",")
        if _filter and not metric.endswith("_stderr") and isinstance(value, (int, float)):
            out[metric] = float(value)
    return out


def run_harness(model, tokenizer, tasks: list[str], *, include_path: list[str] = (), batch_size: int = 32,
                limit: int | None = None) -> dict:
    """lm-eval's simple_evaluate on our model. Returns {"results": {task: {metric: value}},
    "samples": {task: [{"doc_id", "target", "response", <metric>: value}, ...]}}."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise UserError("--harness needs lm-evaluation-harness (pip install 'loralab[eval]')") from None
    manager = _task_manager(list(tasks), list(include_path))
    device = next(model.parameters()).device
    print(f"loralab: lm-eval on {', '.join(tasks)}...", file=sys.stderr)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
    with fp32_decoding_on_cpu(model):  # as loralab's own exact match decodes
        out = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit, bootstrap_iters=0,
                              log_samples=True, verbosity="ERROR")
    results = {task: _scores(r) for task, r in out["results"].items()}
    samples = {}
    for task, rows in (out.get("samples") or {}).items():
        metrics = results.get(task, {})
        samples[task] = [{"doc_id": s["doc_id"], "target": s["target"],
                          "response": (s.get("filtered_resps") or [""])[0],
                          **{m: float(s[m]) for m in metrics if m in s}} for s in rows]
    return {"results": results, "samples": samples}


def format_before_after(result: dict) -> str:
    """`loralab eval --harness`'s table: each task's metrics before and after the adapter."""
    before, after = result["before"], result["after"]
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"
    if before is None:
        lines = [f"{'task':<16} {'metric':<14} {'score':>8}   (lm-eval)"]
        lines += [f"{task:<16} {metric:<14} {pct(v):>8}"
                  for task, scores in after.items() for metric, v in scores.items()]
        return "\n".join(lines)
    lines = [f"{'task':<16} {'metric':<14} {'before':>8} {'after':>8}   change (lm-eval)"]
    for task, scores in after.items():
        for metric, value in scores.items():
            old = before.get(task, {}).get(metric)
            change = "" if old is None else f"{100 * (value - old):+.1f} pts"
            lines.append(f"{task:<16} {metric:<14} {pct(old):>8} {pct(value):>8}   {change}")
    return "\n".join(lines)

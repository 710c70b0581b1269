"""loralab's held-out task questions as lm-evaluation-harness task files (YAML + JSONL), shipped in
loralab/eval/tasks/ so `lm_eval --include_path <that folder> --tasks loralab_2da` scores a model on
exactly the questions `loralab train` and `loralab eval` use, with or without loralab installed.

Each task: loralab_<name>.yaml and loralab_<name>.jsonl ({"prompt", "answer"} per line: the first
eval.n test questions of data.seed, the defaults). Scoring mirrors eval.metrics.exact_match: greedy,
eval.max_new_tokens new tokens, the first non-blank line, stripped, equal to the answer. The files
are generated, never edited: `python -m loralab.eval.harness_tasks` rewrites them; a test checks
that the shipped ones are what it writes.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..config import DataConfig, EvalConfig
from ..data.formats import Example
from ..data.tasks import TASKS, make_task

TASKS_DIR = Path(__file__).resolve().parent / "tasks"  # package data
PREFIX = "loralab_"
# lm-eval resolves a YAML's data_files against the working directory, so each task loads its JSONL
# through this helper, found next to the YAML (lm-eval's `!function` looks there).
LOADER = '''"""Loads a loralab task's JSONL from this folder, wherever lm_eval runs (written by loralab)."""
import os

import datasets


def load(data_file, **_metadata):
    here = os.path.dirname(os.path.abspath(__file__))
    return datasets.load_dataset("json", data_files={"test": os.path.join(here, data_file)})
'''

YAML = """# {comment}
# lm_eval --include_path <this folder> --tasks {task}    (written by loralab.eval.harness_tasks: do not edit)
task: {task}
tag: [loralab]
custom_dataset: !function loralab_tasks.load
dataset_kwargs:
  data_file: {task}.jsonl
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: {max_new_tokens}
  do_sample: false
filter_list:
  - name: first-line  # as loralab reads an answer: the first non-blank line, stripped
    filter:
      - function: regex
        regex_pattern: "^\\\\s*([^\\\\n]*)"
        fallback: ""
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def exact_match_task(task: str, examples: list[Example], *, max_new_tokens: int = EvalConfig.max_new_tokens,
                     comment: str = "") -> dict[str, str]:
    """File name -> text of an lm-eval task scoring prompt/response examples as
    eval.metrics.exact_match does (the loader, loralab_tasks.py, is written beside it once)."""
    rows = "".join(json.dumps({"prompt": ex.prompt, "answer": ex.response.strip()}) + "\n" for ex in examples)
    yaml_text = YAML.format(task=task, max_new_tokens=max_new_tokens, comment=comment or f"{task}: exact match")
    return {f"{task}.yaml": yaml_text, f"{task}.jsonl": rows}


def task_files(name: str, n: int = EvalConfig.n, seed: int = DataConfig.seed) -> dict[str, str]:
    """File name -> text for one loralab task: its first n held-out questions of seed."""
    return exact_match_task(PREFIX + name, make_task(name, 0, n, seed)[1],
                            comment=f"loralab's held-out {name} questions: the {n} that `loralab train` and "
                                    f"`loralab eval` score (data seed {seed}).")


def all_task_files() -> dict[str, str]:
    files = {}
    for name in TASKS:
        files.update(task_files(name))
    return files


def write_task_files(folder: Path = TASKS_DIR, files: dict[str, str] | None = None) -> list[Path]:
    """Write task files (default: loralab's own) and the loader into folder."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for fname, text in {"loralab_tasks.py": LOADER, **(files if files is not None else all_task_files())}.items():
        (folder / fname).write_text(text)
        written.append(folder / fname)
    return written


if __name__ == "__main__":
    print("\n".join(map(str, write_task_files(Path(sys.argv[1]) if len(sys.argv) > 1 else TASKS_DIR))))

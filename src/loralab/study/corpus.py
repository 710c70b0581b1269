"""A study's raw-text corpus (`corpus:` in a study YAML): generated task items written out as prose,
one `{"text": ...}` record each, for continued pretraining (loss on every token, no prompt mask).

    corpus: {tasks: [word_problem_add, word_problem_sub, metric_units], n: 300}

Each item becomes "<question> The answer is <answer>." The file is a pure function of the spec
(tasks, n, data seed), so it is written once into the cache (LORALAB_CACHE/corpora/) under a name
made from its content's spec, and every run of the study reads the same file as its data.path.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..data.tasks import is_task, make_task
from ..errors import UserError
from ..io.fileio import atomic_write_text
from ..io.models import cache_root

CORPUS_KEYS = {"tasks", "n", "seed"}


def _text(ex) -> str:
    if ex.messages:
        question = " ".join(m["content"] for m in ex.messages if m.get("role") == "user")
        answer = " ".join(m["content"] for m in ex.messages if m.get("role") == "assistant")
    else:
        question, answer = ex.prompt.strip(), ex.response.strip()
    return f"{question.strip()} The answer is {answer.strip()}."


def corpus_path(spec, where: str) -> Path:
    """The corpus file for a study's `corpus:` spec, written if it is not there yet."""
    if not isinstance(spec, dict) or set(spec) - CORPUS_KEYS or "tasks" not in spec:
        raise UserError(f"{where}: corpus must be a mapping with tasks (and n, seed), got {spec!r}")
    tasks, n, seed = spec["tasks"], spec.get("n", 300), spec.get("seed", 1234)
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) and is_task(t) for t in tasks):
        raise UserError(f"{where}: corpus.tasks must list generated tasks (e.g. word_problem_add), got {tasks!r}")
    if type(n) is not int or n < 1 or type(seed) is not int:
        raise UserError(f"{where}: corpus.n and corpus.seed must be positive integers, got {n!r}, {seed!r}")
    key = hashlib.sha256(json.dumps([tasks, n, seed]).encode()).hexdigest()[:16]
    path = cache_root() / "corpora" / f"corpus-{key}.jsonl"
    if not path.is_file():
        lines = [json.dumps({"text": _text(ex)}) for name in tasks for ex in make_task(name, n, 0, seed)[0]]
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, "\n".join(lines) + "\n")
    return path

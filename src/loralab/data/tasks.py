"""Synthetic tasks: the GPT-3 arithmetic suite, generated deterministically from a seed; and the
entry to every synthetic task, the instruction suite's families (suite.py) included.

Each task is a finite set of questions numbered 0..size-1 (`Task(index) -> (question, answer)`),
so sampling is "draw distinct indices" and disjointness is exact. Examples are raw prompt/response
pairs in the GPT-3 paper's zero-shot form:

    prompt   "Question: What is 17 minus 14?\\nAnswer:"
    response " 3"

Fair comparisons across runs depend on the held-out set alone, so the test questions come from
their own random stream (seed + task name): the same seed and n_test give the same test set
whatever n_train is, and a smaller n_test gives a prefix of a larger one. Training questions come
from a second stream and skip every test question.
"""
from __future__ import annotations

import operator
import random
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import UserError
from .formats import Example
from .suite import GROUPS, expand_groups, is_family, make_family

# Generation is cut here before comparing: the answer is one line, and a model that keeps talking
# after it (a new line, or an end-of-turn marker the decoder left in) still answered correctly.
END_MARKERS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>", "<eos>")


@dataclass(frozen=True)
class Task:
    name: str
    size: int                                   # number of distinct questions
    question: Callable[[int], tuple[str, int]]  # index in [0, size) -> ("17 minus 14", 3)

    def __call__(self, index: int) -> tuple[str, int]:
        return self.question(index)


_OPS = {"plus": operator.add, "minus": operator.sub, "times": operator.mul}
_SYMBOLS = (("+", operator.add), ("-", operator.sub), ("*", operator.mul))


def _binary(n_digits: int, word: str) -> Callable[[int], tuple[str, int]]:
    """Operands uniform in [0, 10^n): index = a * 10^n + b (so 2ds includes "7 minus 53")."""
    base = 10 ** n_digits
    fn = _OPS[word]

    def question(i: int) -> tuple[str, int]:
        a, b = divmod(i, base)
        return f"{a} {word} {b}", fn(a, b)
    return question


def _composite(i: int) -> tuple[str, int]:
    """1dc: "(a op b) op c" with single digits and +, -, *; index = digits (1000) x op pairs (9)."""
    digits, ops = divmod(i, 9)
    a, rest = divmod(digits, 100)
    b, c = divmod(rest, 10)
    (s1, f1), (s2, f2) = _SYMBOLS[ops // 3], _SYMBOLS[ops % 3]
    return f"({a} {s1} {b}) {s2} {c}", f2(f1(a, b), c)


TASKS: dict[str, Task] = {}
for _n in (2, 3, 4, 5):
    TASKS[f"{_n}da"] = Task(f"{_n}da", 10 ** (2 * _n), _binary(_n, "plus"))
    TASKS[f"{_n}ds"] = Task(f"{_n}ds", 10 ** (2 * _n), _binary(_n, "minus"))
TASKS["2dm"] = Task("2dm", 10 ** 4, _binary(2, "times"))
TASKS["1dc"] = Task("1dc", 1000 * 9, _composite)
TASKS = {k: TASKS[k] for k in ("2da", "2ds", "2dm", "3da", "3ds", "4da", "4ds", "5da", "5ds", "1dc")}


def is_task(name: str) -> bool:
    """An arithmetic task or an instruction-suite family (the groups are names for several)."""
    return name in TASKS or is_family(name)


def expand_tasks(names) -> list[str]:
    """data.tasks / eval.tasks as task names: the suite's groups (suite, suite-held-out) expanded,
    repeats dropped, every name checked (one line naming the unknown one)."""
    out = expand_groups(names)
    for name in out:
        if not is_task(name):
            get_task(name)
    return out


def get_task(name: str) -> Task:
    if name not in TASKS:
        from .families import FAMILIES

        raise UserError(f"unknown task {name!r} (arithmetic: {', '.join(TASKS)}; instruction suite: "
                        f"{', '.join(GROUPS)} or a family: {', '.join(FAMILIES)})")
    return TASKS[name]


def to_example(task: Task, index: int, source: str = "") -> Example:
    q, answer = task(index)
    return Example(prompt=f"Question: What is {q}?\nAnswer:", response=f" {answer}",
                   source=source or f"task {task.name} #{index}", kind="prompt")


def _draw(rng: random.Random, size: int, k: int, exclude: set[int]) -> list[int]:
    """k distinct indices in [0, size), none in `exclude`, in draw order. Rejection sampling keeps
    the prefix property (k draws are the first k of k+1 draws); the callers guarantee room."""
    seen: set[int] = set()
    out: list[int] = []
    while len(out) < k:
        i = rng.randrange(size)
        if i not in seen and i not in exclude:
            seen.add(i)
            out.append(i)
    return out


def make_task(name: str, n_train: int, n_test: int, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, test) Examples for one task: disjoint, no duplicates, deterministic from the seed."""
    if is_family(name):
        return make_family(name, n_train, n_test, seed)
    task = get_task(name)
    if n_train < 0 or n_test < 0:
        raise UserError(f"task {name}: n_train and n_test must be >= 0, got {n_train} and {n_test}")
    if n_train + n_test > task.size:
        raise UserError(f"task {name} has only {task.size} distinct questions, cannot draw {n_train} "
                        f"training + {n_test} test questions (lower data.n_train or eval.n)")
    # String seeds hash with SHA-512 inside `random`: stable across processes and Python runs.
    test_idx = _draw(random.Random(f"loralab:{name}:{seed}:test"), task.size, n_test, set())
    train_idx = _draw(random.Random(f"loralab:{name}:{seed}:train"), task.size, n_train, set(test_idx))
    train = [to_example(task, i, f"task {name} train #{k}") for k, i in enumerate(train_idx)]
    test = [to_example(task, i, f"task {name} test #{k}") for k, i in enumerate(test_idx)]
    return train, test


def mix(names: list[str], n_train: int, n_test: int, seed: int) -> tuple[list[Example], dict[str, list[Example]]]:
    """A mixed training set from several tasks (n_train each, shuffled together deterministically)
    and each task's own test set: `mix(["2da", "2ds"], 2000, 100, 1234)`."""
    if not names:
        raise UserError("no tasks to mix (data.tasks is empty)")
    train: list[Example] = []
    tests: dict[str, list[Example]] = {}
    for name in expand_tasks(names):  # a repeated name would only duplicate its questions
        tr, te = make_task(name, n_train, n_test, seed)
        train += tr
        tests[name] = te
    random.Random(f"loralab:mix:{seed}").shuffle(train)
    return train, tests


def answer_matches(generated: str, target: str) -> bool:
    """Exact match of the first line of a generation (end-of-turn markers cut too) with the target,
    both stripped of surrounding whitespace. Leading whitespace/newlines are skipped first, so a
    chat model answering "\\n3" is read as "3", not as an empty first line."""
    text = generated.lstrip()
    for marker in ("\n",) + END_MARKERS:
        cut = text.find(marker)
        if cut >= 0:
            text = text[:cut]
    return text.strip() == target.strip()

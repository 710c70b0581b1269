"""The instruction suite: many small task families (families.py) in instruction/output form, closer
to Alpaca than one arithmetic task, with held-out families as well as held-out items.

Each family is a task like the arithmetic ones (`data.tasks=[add, reverse_word]`), and two group
names expand to many: `suite` = every family the suite trains on, `suite-held-out` = the families
it never trains on (`eval.tasks=[suite, suite-held-out]` scores both). An item is an Alpaca-style
record (user turn = instruction, a blank line, then the input; assistant turn = the one-line
answer), rendered like any Alpaca data file (through the model's chat template by default).

Like tasks.py, the test items come from their own random stream (family, seed): the same seed and
n_test give the same test set whatever n_train is, and a smaller n_test gives a prefix of a larger
one. Training items come from a second stream and skip every test item's content key (in any
wording), so a held-out item is never trained on.
"""
from __future__ import annotations

import random

from ..errors import UserError
from .families import FAMILIES, HELD_OUT, TRAINED
from .formats import Example

GROUPS = {"suite": TRAINED, "suite-held-out": HELD_OUT}
# Draws allowed per wanted item before a family counts as exhausted (its distinct contents run out).
MAX_DRAWS_PER_ITEM = 50


def is_family(name: str) -> bool:
    return name in FAMILIES


def expand_groups(names) -> list[str]:
    """Task names with the suite's group names replaced by their families, first occurrence kept."""
    out: list[str] = []
    for name in names:
        out += list(GROUPS.get(name, (name,)))
    return list(dict.fromkeys(out))


def to_example(instruction: str, text: str, output: str, source: str) -> Example:
    user = instruction + ("\n\n" + text if text else "")
    return Example(messages=[{"role": "user", "content": user}, {"role": "assistant", "content": output}],
                   source=source, kind="alpaca")


def _draw(name: str, stream: str, k: int, exclude: set[str]) -> tuple[list[tuple], set[str]]:
    """k records of a family with distinct content keys, none in `exclude`, in draw order."""
    generate = FAMILIES[name][1]
    rng = random.Random(stream)  # string seeds hash with SHA-512 inside `random`: stable across runs
    seen, out = set(exclude), []
    for _ in range(MAX_DRAWS_PER_ITEM * k + 100):
        if len(out) == k:
            break
        record = generate(rng)
        if record[3] not in seen:
            seen.add(record[3])
            out.append(record)
    if len(out) < k:
        raise UserError(f"suite family {name} ran out of distinct items after {len(out)} of {k} "
                        f"(lower data.n_train or eval.n)")
    return out, seen


def make_family(name: str, n_train: int, n_test: int, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, test) Examples of one family: disjoint by content, deterministic from the seed."""
    if name not in FAMILIES:
        raise UserError(f"unknown suite family {name!r} (known: {', '.join(FAMILIES)})")
    if n_train < 0 or n_test < 0:
        raise UserError(f"suite family {name}: n_train and n_test must be >= 0, got {n_train} and {n_test}")
    test, test_keys = _draw(name, f"loralab:suite:{name}:{seed}:test", n_test, set())
    train, _ = _draw(name, f"loralab:suite:{name}:{seed}:train", n_train, test_keys)
    return ([to_example(*r[:3], f"suite {name} train #{k}") for k, r in enumerate(train)],
            [to_example(*r[:3], f"suite {name} test #{k}") for k, r in enumerate(test)])


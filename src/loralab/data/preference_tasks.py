"""Generated preference pairs, offline: a synthetic arithmetic task's questions with the correct answer
as the chosen one and a plausible wrong answer as the rejected one (off by one, by ten, digits swapped,
the sign lost), for the demo (configs/dpo.yaml) and the tests.

The wrong answer is a pure function of the question and the seed, so the held-out pairs are the task's
own held-out questions (tasks.make_task keeps them apart from the training questions) whatever
else changes, and a rerun sees the same pairs.
"""
from __future__ import annotations

import random

from ..errors import UserError
from .formats import Example
from .preference import PreferencePair
from .tasks import TASKS, make_task


def wrong_answer(answer: int, rng: random.Random) -> int:
    """A near miss a model could believe: never the answer itself."""
    text = str(abs(answer))
    options = [answer + 1, answer - 1, answer + 10, answer - 10]
    if len(text) >= 2 and text[-1] != text[-2]:  # the last two digits swapped
        swapped = int(text[:-2] + text[-1] + text[-2])
        options.append(-swapped if answer < 0 else swapped)
    if answer:
        options.append(-answer)
    return rng.choice([o for o in options if o != answer])


def pair_from_example(example: Example, seed: int) -> PreferencePair:
    """An arithmetic Example (prompt, " <answer>") as a preference pair."""
    answer = int(example.response)
    wrong = wrong_answer(answer, random.Random(f"loralab:preference:{seed}:{example.prompt}"))
    rejected = Example(prompt=example.prompt, response=f" {wrong}", source=example.source, kind="prompt")
    return PreferencePair(example, rejected, example.source)


def preference_task(name: str, n_train: int, n_test: int, seed: int) -> tuple[list[PreferencePair], list[Example]]:
    """(training pairs, held-out Examples) of arithmetic task `name`: the held-out Examples serve exact
    match, and as pairs (held_out_pairs) the held-out preference accuracy."""
    if name not in TASKS:
        raise UserError(f"config key 'data.tasks': preference pairs are generated for the arithmetic tasks "
                        f"({', '.join(TASKS)}), not {name!r}; give data.path a preference file for others")
    train, test = make_task(name, n_train, n_test, seed)
    return [pair_from_example(e, seed) for e in train], test


def held_out_pairs(examples: list[Example], seed: int) -> list[PreferencePair]:
    return [pair_from_example(e, seed) for e in examples]

"""Generated preference pairs (data/preference_tasks.py): the correct answer chosen, a near miss rejected,
deterministic, the held-out questions apart from the training ones."""
import random
import re

import pytest

from loralab.data.preference_tasks import held_out_pairs, preference_task, wrong_answer
from loralab.errors import UserError


def _swapped(answer: int) -> int:
    t = str(abs(answer))
    return int(t[:-2] + t[-1] + t[-2]) * (1 if answer >= 0 else -1) if len(t) >= 2 else answer


def test_wrong_answers_are_near_misses_never_the_answer():
    rng = random.Random(0)
    for answer in [0, 1, 9, 10, 11, 47, -3, -52, 198, 1000]:
        seen = {wrong_answer(answer, rng) for _ in range(60)}
        assert answer not in seen
        assert seen <= {answer + 1, answer - 1, answer + 10, answer - 10, -answer, _swapped(answer)}
        assert len(seen) >= 4  # several kinds of miss, not one


def test_pairs_are_deterministic_and_held_out_apart():
    train, test = preference_task("2ds", 30, 10, 7)
    again, test_again = preference_task("2ds", 30, 10, 7)
    assert [(p.chosen.response, p.rejected.response) for p in train] == \
        [(p.chosen.response, p.rejected.response) for p in again]
    assert {p.chosen.prompt for p in train}.isdisjoint({e.prompt for e in test})
    for p in train + held_out_pairs(test, 7):
        assert p.chosen.prompt == p.rejected.prompt
        assert p.chosen.response != p.rejected.response
    a, b = map(int, re.search(r"What is (\d+) minus (\d+)\?", test[0].prompt).groups())
    assert held_out_pairs(test, 7)[0].chosen.response == f" {a - b}"  # the correct answer is the chosen one


def test_only_arithmetic_tasks():
    with pytest.raises(UserError, match="data.tasks': preference pairs are generated for the arithmetic tasks"):
        preference_task("antonyms", 5, 5, 1)

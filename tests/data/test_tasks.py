import re

import pytest

from loralab.data.tasks import TASKS, answer_matches, is_task, make_task, mix, to_example
from loralab.errors import UserError

PROMPT = re.compile(r"Question: What is (.+)\?\nAnswer:")
BINARY = re.compile(r"(\d+) (plus|minus|times) (\d+)")
COMPOSITE = re.compile(r"\((\d) ([-+*]) (\d)\) ([-+*]) (\d)")
WORDS = {"plus": "+", "minus": "-", "times": "*"}


def question(ex):
    m = PROMPT.fullmatch(ex.prompt)
    assert m, ex.prompt
    return m.group(1)


def test_exact_prompt_and_response_shape():
    ex = to_example(TASKS["2ds"], 17 * 100 + 14)
    assert ex.prompt == "Question: What is 17 minus 14?\nAnswer:"
    assert ex.response == " 3"
    neg = to_example(TASKS["2ds"], 7 * 100 + 53)
    assert (neg.prompt, neg.response) == ("Question: What is 7 minus 53?\nAnswer:", " -46")
    assert to_example(TASKS["1dc"], (4 * 100 + 6 * 10 + 2) * 9 + 2 * 3 + 1).prompt == \
        "Question: What is (4 * 6) - 2?\nAnswer:"


@pytest.mark.parametrize("name", list(TASKS))
def test_answers_are_correct_and_operands_in_range(name):
    train, test = make_task(name, 60, 40, seed=3)
    n_digits = int(name[0])
    for ex in train + test:
        q = question(ex)
        assert ex.response.startswith(" ") and ex.response == ex.response.rstrip()
        if name == "1dc":
            m = COMPOSITE.fullmatch(q)
            assert m, q
            expr = q
        else:
            m = BINARY.fullmatch(q)
            assert m, q
            a, word, b = m.groups()
            assert word == {"a": "plus", "s": "minus", "m": "times"}[name[2]]
            for operand in (a, b):
                assert 0 <= int(operand) < 10 ** n_digits and str(int(operand)) == operand
            expr = f"{a} {WORDS[word]} {b}"
        assert int(ex.response) == eval(expr), q  # our own generated arithmetic, nothing else


def test_subtraction_operands_are_not_ordered():
    train, _ = make_task("2ds", 200, 0, seed=0)
    assert any(int(ex.response) < 0 for ex in train) and any(int(ex.response) > 0 for ex in train)


@pytest.mark.parametrize("name", ["2da", "1dc"])
def test_train_and_test_disjoint_and_test_without_duplicates(name):
    train, test = make_task(name, 3000, 500, seed=11)
    tq = [question(e) for e in test]
    assert len(set(tq)) == len(tq) == 500
    assert not set(tq) & {question(e) for e in train}
    assert len({question(e) for e in train}) == 3000


def test_deterministic_from_seed():
    a = make_task("3da", 50, 20, seed=5)
    b = make_task("3da", 50, 20, seed=5)
    c = make_task("3da", 50, 20, seed=6)
    assert a == b
    assert [question(e) for e in a[1]] != [question(e) for e in c[1]]


def test_test_set_independent_of_n_train_and_prefix_of_larger():
    _, t1 = make_task("2dm", 10, 30, seed=9)
    _, t2 = make_task("2dm", 2000, 30, seed=9)
    _, t3 = make_task("2dm", 0, 60, seed=9)
    assert [e.prompt for e in t1] == [e.prompt for e in t2] == [e.prompt for e in t3[:30]]


def test_too_many_questions_and_unknown_task():
    with pytest.raises(UserError, match="only 9000 distinct"):
        make_task("1dc", 8000, 1001, seed=0)
    assert len(make_task("1dc", 8000, 1000, seed=0)[0]) == 8000  # exactly the whole space still works
    with pytest.raises(UserError, match=r"unknown task '7dx' \(arithmetic: 2da, 2ds, .*; instruction suite: suite, "):
        make_task("7dx", 1, 1, seed=0)
    assert is_task("5ds") and not is_task("7dx")


def test_mix_combines_tasks_deterministically():
    train, tests = mix(["2da", "2ds"], 30, 10, seed=1)
    assert len(train) == 60 and set(tests) == {"2da", "2ds"}
    words = [BINARY.fullmatch(question(e)).group(2) for e in train]
    assert words.count("plus") == 30 and words.count("minus") == 30
    assert words != sorted(words)  # shuffled together
    assert mix(["2da", "2ds"], 30, 10, seed=1) == (train, tests)
    assert tests["2ds"] == make_task("2ds", 30, 10, seed=1)[1]


@pytest.mark.parametrize("generated,target,ok", [
    (" 3", " 3", True), ("3\nQuestion: What", " 3", True), ("3<|im_end|>", " 3", True),
    ("\n 3 \n", " 3", True), (" 31", " 3", False), (" -3", " 3", False), ("", " 3", False),
    ("The answer is 3", " 3", False), ("3<|eot_id|>junk", "3", True),
])
def test_answer_matches(generated, target, ok):
    assert answer_matches(generated, target) is ok

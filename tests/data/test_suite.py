"""The instruction suite: every family deterministic, every answer right (recomputed here from the
instruction's text by an independent oracle), train and test disjoint by content, held-out
families never in training, and the groups wired through data.tasks / eval.tasks."""
import re

import pytest

from loralab.data import suite
from loralab.data.families import FAMILIES, HELD_OUT, TRAINED
from loralab.data.tasks import expand_tasks, make_task, mix
from loralab.errors import UserError

N = "(-?\\d+)"


def _numbers(text: str) -> list[int]:
    return [int(x) for x in text.split(", ")]


def _unit(big: str, small: str) -> int:
    return {("kilometers", "meters"): 1000, ("meters", "centimeters"): 100, ("kilograms", "grams"): 1000,
            ("liters", "milliliters"): 1000, ("centimeters", "millimeters"): 10, ("hours", "minutes"): 60,
            ("minutes", "seconds"): 60, ("days", "hours"): 24, ("weeks", "days"): 7}[(big, small)]


# family -> [(instruction regex, oracle(match groups, input text) -> the answer)]; written from the
# task's meaning, not from families.py's code
ORACLES = {
    "add": [(rf"(?:What is {N} plus {N}\?|Add {N} and {N}\.|Compute {N} \+ {N}\.)", lambda g, _: g[0] + g[1])],
    "subtract": [(rf"What is {N} minus {N}\?", lambda g, _: g[0] - g[1]),
                 (rf"Subtract {N} from {N}\.", lambda g, _: g[1] - g[0]),
                 (rf"Compute {N} - {N}\.", lambda g, _: g[0] - g[1])],
    "multiply": [(rf"(?:What is {N} times {N}\?|Multiply {N} by {N}\.|Compute {N} \* {N}\.)",
                  lambda g, _: g[0] * g[1])],
    "divide": [(rf"(?:What is {N} divided by {N}\?|Divide {N} by {N}\.)", lambda g, _: g[0] // g[1])],
    "larger": [(rf"(?:Which is larger: {N} or {N}\?|Which number is bigger, {N} or {N}\?)", lambda g, _: max(g))],
    "smaller": [(rf"(?:Which is smaller: {N} or {N}\?|Which number is less, {N} or {N}\?)", lambda g, _: min(g))],
    "max_of_list": [(r"(?:What is the largest number in this list\?|Find the maximum of these numbers\.)",
                     lambda g, text: max(_numbers(text)))],
    "even_odd": [(rf"(?:Is {N} even or odd\?|Is the number {N} odd or even\?)",
                  lambda g, _: "odd" if g[0] % 2 else "even")],
    "count_letter": [(r"(?:How many times does the letter '(.)' appear in '([a-z]+)'\?|"
                      r"Count the letter '(.)' in the word '([a-z]+)'\.)", lambda g, _: g[1].count(g[0]))],
    "count_words": [(r"(?:How many words are in this sentence\?|Count the words in the following text\.)",
                     lambda g, text: len(text.split(" ")))],
    "count_items": [(r"(?:How many items are in this list\?|Count the items in the following list\.)",
                     lambda g, text: len(text.split(", ")))],
    "reverse_word": [(r"(?:Reverse the word '([a-z]+)'\.|Spell '([a-z]+)' backwards\.)", lambda g, _: g[0][::-1])],
    "uppercase": [(r"(?:Write the following in uppercase\.|Convert this text to capital letters\.)",
                   lambda g, text: text.upper())],
    "lowercase": [(r"(?:Write the following in lowercase\.|Convert this text to small letters\.)",
                   lambda g, text: text.lower())],
    "first_letters": [(r"(?:Write the first letter of each word, with no spaces\.|"
                       r"Join the initial letters of these words\.)",
                       lambda g, text: "".join(w[0] for w in text.split(" ")))],
    "metric_units": [(rf"(?:Convert {N} ([a-z]+) to ([a-z]+)\.)", lambda g, _: g[0] * _unit(g[1], g[2])),
                     (rf"How many ([a-z]+) are in {N} ([a-z]+)\?", lambda g, _: g[1] * _unit(g[2], g[0]))],
    "word_problem_add": [(rf"[A-Z][a-z]+ has {N} ([a-z]+) and gets {N} more\. How many \2 does [A-Z][a-z]+ have now\?",
                          lambda g, _: g[0] + g[2]),
                         (rf"There are {N} ([a-z]+) in a box\. [A-Z][a-z]+ adds {N}\. How many \2 are in the box\?",
                          lambda g, _: g[0] + g[2])],
    "word_problem_sub": [(rf"[A-Z][a-z]+ had {N} ([a-z]+) and gave away {N}\. How many \2 are left\?",
                          lambda g, _: g[0] - g[2]),
                         (rf"A box holds {N} ([a-z]+)\. [A-Z][a-z]+ takes out {N}\. How many \2 remain in the box\?",
                          lambda g, _: g[0] - g[2])],
    "word_problem_mul": [(rf"[A-Z][a-z]+ buys {N} bags with {N} ([a-z]+) in each bag\. How many \3 is that in all\?",
                          lambda g, _: g[0] * g[1]),
                         (rf"[A-Z][a-z]+ sets out {N} rows of ([a-z]+) with {N} in each row\. How many \2 are there\?",
                          lambda g, _: g[0] * g[2])],
    "format_date": [(r"(?:Write this date in the format DD/MM/YYYY\."
                     r"|Rewrite the date as day/month/year \(DD/MM/YYYY\)\.)",
                     lambda g, text: "/".join(reversed(text.split("-"))))],
    "sort_numbers": [(r"(?:Sort these numbers from smallest to largest\.|Put these numbers in increasing order\.)",
                      lambda g, text: ", ".join(map(str, sorted(_numbers(text)))))],
    "sort_words": [(r"(?:Sort these words alphabetically\.|Put these words in alphabetical order\.)",
                    lambda g, text: ", ".join(sorted(text.split(", "))))],
    "next_number": [(r"(?:What number comes next in this sequence\?|Continue the sequence with the next number\.)",
                     lambda g, text: 2 * _numbers(text)[-1] - _numbers(text)[-2])],
}
ORACLES["time_units"] = ORACLES["metric_units"]


def _parts(example):
    """(instruction, input, answer) of a suite example: the user turn is instruction [+ blank line + input]."""
    assert example.kind == "alpaca" and [m["role"] for m in example.messages] == ["user", "assistant"]
    instruction, _, text = example.messages[0]["content"].partition("\n\n")
    return instruction, text, example.messages[1]["content"]


def _oracle(family: str, instruction: str, text: str):
    for pattern, answer in ORACLES[family]:
        m = re.fullmatch(pattern, instruction)
        if m:
            groups = [g for g in m.groups() if g is not None]
            return str(answer([int(g) if re.fullmatch(N, g) else g for g in groups], text))
    raise AssertionError(f"{family}: no known wording matches {instruction!r}")


def test_every_family_has_an_oracle_and_the_groups_split_the_families():
    assert set(ORACLES) == set(FAMILIES)
    assert set(TRAINED) | set(HELD_OUT) == set(FAMILIES) and not set(TRAINED) & set(HELD_OUT)
    assert len(TRAINED) >= 12 and len(HELD_OUT) >= 5
    kinds = {FAMILIES[f][0] for f in FAMILIES}
    assert {"arithmetic", "comparison", "counting", "string edit", "unit conversion", "word problem",
            "formatting"} <= kinds
    assert all(any(FAMILIES[f][0] == FAMILIES[h][0] for f in TRAINED) for h in HELD_OUT)  # a related skill trained


@pytest.mark.parametrize("family", list(FAMILIES))
def test_answers_are_right(family):
    train, test = suite.make_family(family, 150, 50, seed=11)
    assert len(train) == 150 and len(test) == 50
    for ex in train + test:
        instruction, text, answer = _parts(ex)
        assert answer == _oracle(family, instruction, text), (instruction, text)
        assert answer and "\n" not in answer and answer == answer.strip()  # one line: exact match reads it


@pytest.mark.parametrize("family", list(FAMILIES))
def test_deterministic_disjoint_and_a_prefix(family):
    train, test = suite.make_family(family, 120, 30, seed=5)
    again = suite.make_family(family, 120, 30, seed=5)
    assert (train, test) == again  # the same seed: the same items, in the same order
    assert suite.make_family(family, 120, 30, seed=6)[1] != test
    # the test set depends on the seed and n_test alone; a smaller one is a prefix of a larger one
    assert suite.make_family(family, 7, 30, seed=5)[1] == test
    assert suite.make_family(family, 0, 10, seed=5)[1] == test[:10]
    # no test item's question in training, in either wording
    answers = lambda exs: {(_parts(e)[1], _parts(e)[2]) for e in exs}  # noqa: E731
    questions = lambda exs: {_parts(e)[:2] for e in exs}  # noqa: E731
    assert not questions(train) & questions(test)
    assert len(questions(train)) == len(train) and len(questions(test)) == len(test)
    if family in ("reverse_word", "even_odd", "larger"):  # content keys: a reworded test item is not in training
        content = lambda e: re.findall(r"'([a-z]+)'|(\d+)", _parts(e)[0])  # noqa: E731
        assert not {str(content(e)) for e in train} & {str(content(e)) for e in test}
    assert answers(test)


def test_groups_expand_and_unknown_names_are_one_line_errors():
    assert expand_tasks(["suite"]) == list(TRAINED)
    assert expand_tasks(["suite", "suite-held-out", "2da", "add"]) == list(TRAINED) + list(HELD_OUT) + ["2da"]
    with pytest.raises(UserError, match="unknown task 'reverse'") as e:
        expand_tasks(["suite", "reverse"])
    assert "\n" not in str(e.value) and "reverse_word" in str(e.value)
    train, tests = mix(["suite"], 4, 2, seed=1)
    assert len(train) == 4 * len(TRAINED) and set(tests) == set(TRAINED)
    assert make_task("add", 3, 2, 1) == suite.make_family("add", 3, 2, 1)  # the one entry for every task


def test_a_family_that_runs_out_of_items_says_so():
    with pytest.raises(UserError, match="ran out of distinct items") as e:
        suite.make_family("even_odd", 9_000, 2_000, seed=1)  # 10,000 numbers in all
    assert "data.n_train" in str(e.value)


def test_exact_match_reads_the_answer_of_an_instruction_record():
    from loralab.eval.metrics import Generation, score

    _, test = suite.make_family("uppercase", 0, 3, seed=2)
    gens = [Generation(test[0].answer + "\n(more)", True), Generation("nope", True), Generation(test[2].answer, False)]
    result = score(test, gens)
    assert result["correct"] == 2 and result["samples"][0]["target"] == test[0].messages[1]["content"]
    assert result["samples"][0]["prompt"].startswith(_parts(test[0])[0])


def test_a_run_on_the_suite_reports_trained_and_held_out_families(tiny_folder, tmp_path):
    from loralab.config import load_config
    from loralab.pipeline import run_training
    from loralab.study.results import run_metrics

    cfg = load_config(None, [f"model.name={tiny_folder}", "data.tasks=[add, reverse_word]", "data.n_train=12",
                             "eval.tasks=[add, reverse_word, divide]", "eval.n=3", "train.max_steps=2",
                             "train.batch_size=4", "train.progress=false", "train.precision=fp32",
                             "data.system_prompt=none", "eval.max_new_tokens=4", f"output_dir={tmp_path}"])
    summary = run_training(cfg, quiet=True)
    ev = summary["eval"]
    assert [ev[t]["trained"] for t in ("add", "reverse_word", "divide")] == [True, True, False]
    assert all(ev[t]["test_loss"] > 0 and ev[t]["n"] == 3 for t in ev)
    m = run_metrics(summary)
    assert m["test_loss_seen_tasks"] == pytest.approx((ev["add"]["test_loss"] + ev["reverse_word"]["test_loss"]) / 2)
    assert m["test_loss_unseen_tasks"] == pytest.approx(ev["divide"]["test_loss"])
    assert m["acc_unseen_tasks"] == pytest.approx(100 * ev["divide"]["after"])

"""One dtype vocabulary across the commands (cli_help.py): fp32 / bf16 / fp16 / auto, q8_0 only for GGUF."""
import argparse

import pytest

from loralab.cli import build_parser
from loralab.cli_help import DTYPE_ALIASES, dtype_arg
from loralab.config import CHOICES

VOCABULARY = {"auto", "fp32", "bf16", "fp16"}
GGUF_ONLY = {"q8_0"}


def _sub(name):
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    raise AssertionError("no subcommands")


def _dtype_action(command):
    actions = [a for a in _sub(command)._actions if "--dtype" in a.option_strings]
    assert len(actions) == 1, command
    return actions[0]


@pytest.mark.parametrize("command", ["merge", "export", "estimate"])
def test_every_dtype_option_is_named_dtype_and_speaks_the_vocabulary(command):
    action = _dtype_action(command)
    words = set(action.metavar.strip("{}").split(","))
    allowed = VOCABULARY | (GGUF_ONLY if command == "export" else set())
    assert words <= allowed and words, (command, words)
    assert "dtype" in action.help


def test_train_precision_uses_the_same_words():
    assert set(CHOICES["train.precision"]) <= VOCABULARY


@pytest.mark.parametrize("argv, dest, value", [
    (["export", "--dtype", "fp16"], "outtype", "f16"),        # the word -> io/gguf.py's GGUF type name
    (["export", "--outtype", "f32"], "outtype", "f32"),       # the older flag and spelling still work
    (["export", "--dtype", "q8_0"], "outtype", "q8_0"),
    (["export"], "outtype", "f16"),                           # the default, fp16, converted too
    (["estimate", "--precision", "fp32"], "precision", "fp32"),
    (["estimate", "--dtype", "bfloat16"], "precision", "bf16"),
    (["merge", "--dtype", "float16", "out"], "dtype", "fp16"),
])
def test_dtype_words_and_aliases_parse_to_what_the_command_takes(argv, dest, value):
    args = build_parser().parse_args(argv)
    assert getattr(args, dest) == value


@pytest.mark.parametrize("argv", [["merge", "--dtype", "q8_0", "out"], ["estimate", "--dtype", "fp16"],
                                  ["export", "--dtype", "int4"]])
def test_a_dtype_a_command_cannot_write_is_refused_naming_the_choices(argv, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2
    assert "invalid dtype" in capsys.readouterr().err


def test_aliases_map_into_the_vocabulary():
    assert set(DTYPE_ALIASES.values()) <= VOCABULARY | GGUF_ONLY
    parse = dtype_arg({"fp32": "x"})
    assert parse(" F32 ") == "x"
    with pytest.raises(argparse.ArgumentTypeError):
        parse("bf16")


def test_each_word_maps_to_a_value_its_command_takes():
    from loralab.cli_help import DTYPE_WORDS
    from loralab.inference import MERGE_DTYPES
    from loralab.io.gguf import OUTTYPES
    from loralab.memory.estimate import PRECISIONS

    assert set(DTYPE_WORDS["merge"].values()) == set(MERGE_DTYPES)
    assert set(DTYPE_WORDS["gguf"].values()) == set(OUTTYPES)
    assert set(DTYPE_WORDS["estimate"].values()) == set(PRECISIONS)
    assert all(set(words) <= VOCABULARY | GGUF_ONLY for words in DTYPE_WORDS.values())

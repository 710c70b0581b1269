"""The command line's grammar: version, help on every argument, defaults shown (tests/test_cli.py)."""
import argparse

import pytest

import loralab
from loralab.cli import build_parser, main


def _parsers():
    """The top-level parser and every subcommand's, as cli.py builds them."""
    p = build_parser()
    out = [("loralab", p)]
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            out += [(f"loralab {name}", sub) for name, sub in action.choices.items()]
    return out


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"loralab {loralab.__version__}"


def test_every_argument_of_every_command_has_help():
    missing = [f"{name} {a.option_strings or a.dest}" for name, p in _parsers() for a in p._actions
               if not (a.help or "").strip()]
    assert len(_parsers()) > 10
    assert missing == []


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["combine", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: svd)" in text  # the --method default, named in the help
    with pytest.raises(SystemExit):
        main(["estimate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "LoRA rank (default: 8)" in text and "(default: all-linear)" in text
    assert "(default: None)" not in text and "(default: False)" not in text  # nothing to show: not shown

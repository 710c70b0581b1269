"""How `loralab --help` and each command's help look: every option with its default."""
from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is nothing to show: None (the help says what
    happens instead), a flag's False, or a help text that already names its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)) \
                or "default" in text:
            return text
        return super()._get_help_string(action)


def subparser_class(formatter):
    """Every subcommand's parser shows defaults as the top-level one does."""
    class SubParser(argparse.ArgumentParser):
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("formatter_class", formatter)
            super().__init__(*args, **kwargs)
    return SubParser

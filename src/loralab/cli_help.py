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


# One dtype vocabulary for every command (and train.precision): fp32, bf16, fp16, auto; GGUF's
# quantized types (q8_0) only where a GGUF is written. Older spellings are accepted as aliases.
DTYPE_ALIASES = {"f32": "fp32", "float32": "fp32", "float": "fp32", "f16": "fp16", "float16": "fp16",
                 "half": "fp16", "bfloat16": "bf16", "q8": "q8_0"}
# each dtype option's words -> what its command's code takes
DTYPE_WORDS = {
    "merge": {"auto": "auto", "fp32": "fp32", "bf16": "bf16", "fp16": "fp16"},   # inference.MERGE_DTYPES
    "gguf": {"fp32": "f32", "fp16": "f16", "bf16": "bf16", "q8_0": "q8_0"},      # io/gguf.py's GGUF type names
    "estimate": {"fp32": "fp32", "bf16": "bf16"},                                 # memory/estimate.py's PRECISIONS
}


def dtype_arg(words: dict[str, str]):
    """An argparse `type` for a dtype option: takes a word of the vocabulary (or an alias) and returns
    what the command's code expects for it (`words`: vocabulary word -> internal value)."""
    def parse(text: str) -> str:
        word = DTYPE_ALIASES.get(text.strip().lower(), text.strip().lower())
        if word not in words:
            raise argparse.ArgumentTypeError(f"invalid dtype {text!r} (choose from {', '.join(words)})")
        return words[word]
    parse.__name__ = "dtype"  # argparse names the type in its messages
    return parse


def dtype_metavar(words: dict[str, str]) -> str:
    return "{" + ",".join(words) + "}"


def dtype_option(kind: str) -> dict:
    """`type` and `metavar` for a dtype option of DTYPE_WORDS' kind: add_argument("--dtype", **dtype_option(...))."""
    return {"type": dtype_arg(DTYPE_WORDS[kind]), "metavar": dtype_metavar(DTYPE_WORDS[kind])}

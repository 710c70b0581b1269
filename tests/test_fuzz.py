"""Fuzzing every reader of user input (Hypothesis): the YAML config and its `key=value` overrides,
study files, each data format (JSONL, JSON, text, CSV) and adapter_config.json. The property is the
CLI's contract: an input either loads, or raises UserError with a one-line message; any other
exception would reach the user as a crash report.

`make test` runs a few examples per property (conftest.py's "default" profile); `make fuzz` runs
the "fuzz" profile's many more. A failure prints the input that caused it (`@example` it here).
"""
import dataclasses
import json
import tempfile
import typing
from pathlib import Path

import yaml
from hypothesis import example, given
from hypothesis import strategies as st

from loralab.config import RunConfig, dump_yaml, load_config
from loralab.data.formats import FIELDS, ROLES, load_examples
from loralab.data.sources import load_data
from loralab.errors import UserError
from loralab.peft.adapter_files import CONFIG_NAME, check_config, read_adapter_config
from loralab.study.spec import STUDY_KEYS, load_study

_HINTS = typing.get_type_hints(RunConfig)  # the annotations are strings (`from __future__ import annotations`)
SECTIONS = {name: [g.name for g in dataclasses.fields(t)] if dataclasses.is_dataclass(t) else None
            for name, t in _HINTS.items()}
FIELD_NAMES = sorted({n for names in SECTIONS.values() if names for n in names})
# Characters that matter to YAML, JSON and CSV, plus anything at all.
SYNTAX = list(":-[]{}&*!|>'\"#,?%@`\\\n\t =.0123456789eE") + [
    "~", "null", "true", "<<", "\ufeff", "\u2028", "&a ", "*a", "!!timestamp ", "!!binary ", "!!set ", "!!float ",
    "2024-13-01", "? "]
syntax_text = st.lists(st.sampled_from(SYNTAX) | st.text(max_size=4), max_size=60).map("".join)

scalars = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
           | st.sampled_from(["auto", "nf4", "adamw", "q_proj", "all-linear", "2da", "", "1e-3", "-1", "0"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=8) | st.sampled_from(FIELD_NAMES), inner, max_size=4),
                      max_leaves=12)


@st.composite
def config_dicts(draw):
    """Dicts shaped like a config: known sections and keys most of the time, anything some of the time."""
    out = {}
    for section in draw(st.lists(st.sampled_from(list(SECTIONS)) | st.text(max_size=6), max_size=4)):
        keys = SECTIONS.get(section)
        if keys and draw(st.booleans()):
            out[section] = draw(st.dictionaries(st.sampled_from(keys) | st.text(max_size=6), values, max_size=4))
        else:
            out[section] = draw(values)
    return out


@st.composite
def yaml_texts(draw):
    """A config's YAML: a dumped config dict, perhaps cut, spliced with syntax, or with a section repeated."""
    text = yaml.safe_dump(draw(config_dicts()), sort_keys=False, allow_unicode=draw(st.booleans()))
    how = draw(st.sampled_from(["as-is", "splice", "repeat", "raw"]))
    if how == "splice":
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(syntax_text) + text[at + draw(st.integers(0, 10)):]
    elif how == "repeat":
        text += text
    elif how == "raw":
        text = draw(syntax_text)
    return text


def _one_line(e: UserError) -> None:
    message = str(e)
    assert message.strip() and "\n" not in message and "\r" not in message, repr(message)


def _loads_or_says_why(load, *args):
    try:
        return load(*args)
    except UserError as e:
        _one_line(e)
        return None


def _config_holds(cfg):
    if cfg is not None:  # what a run does with a config it accepted must work too
        assert isinstance(cfg, RunConfig)
        yaml.safe_load(dump_yaml(cfg))


@given(text=yaml_texts())
@example(text="lora: {r: 4}\nlora: {r: 8}\n")
@example(text="a: &a [*a]\n")
@example(text="x: !!timestamp x\n")
@example(text="lora:\n  rank_pattern: {'a{99999999999}': 4}\n")
@example(text="lora:\n  rank_pattern: {'" + "(" * 2000 + ")" * 2000 + "': 4}\n")
@example(text="resume: 1\n")
@example(text="[" * 3000)
def test_config_file(text):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "config.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        _config_holds(_loads_or_says_why(load_config, path))


@given(raw=st.binary(max_size=200))
def test_config_file_bytes(raw):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "config.yaml"
        path.write_bytes(raw)
        _config_holds(_loads_or_says_why(load_config, path))


override_keys = (st.sampled_from([f"{s}.{k}" for s, keys in SECTIONS.items() if keys for k in keys]
                                 + [s for s, keys in SECTIONS.items() if not keys])
                 | st.text(max_size=10))
override_values = syntax_text | values.map(json.dumps) | st.text(max_size=20)


@given(overrides=st.lists(st.tuples(override_keys, override_values).map("=".join) | st.text(max_size=12),
                          max_size=4))
@example(overrides=["lora.r=2001-13-01"])
@example(overrides=["lora=5", "lora.r=4"])
@example(overrides=["lora.targets=&a [*a]"])
def test_overrides(overrides):
    _config_holds(_loads_or_says_why(load_config, None, overrides))


# ---------------------------------------------------------------------------------------------
# Study files (`loralab study FILE`): read by the same loader, then cells, sweeps and findings

STUDY_WORDS = ["name", "set", "seeds", "sweep", "combine", "adapters", "weights", "method", "cell", "cells", "metric",
               "check", "a", "b", "tol", "expect", "value", "if_unclear", "lora.r", "lower", "ratio", "default"]
study_values = st.recursive(
    scalars | st.sampled_from(["lora.r=4", "train.lr=1e-3", "final_val_loss", "estimate", "svd"] + STUDY_WORDS),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.sampled_from(STUDY_WORDS) | st.integers(0, 2), inner, max_size=3), max_leaves=8)


@given(spec=st.dictionaries(st.sampled_from(sorted(STUDY_KEYS - {"base"})) | st.integers(0, 2), study_values,
                            max_size=6))
@example(spec={"axes": [[1, 2]]})
@example(spec={"axes": {1: ["a"]}})
@example(spec={"kind": "estimate", "rows": 5})
@example(spec={"findings": [{"check": ["lower"]}]})
@example(spec={"findings": [{1: "x"}]})
@example(spec={"axes": [{"name": "c", 1: 2}]})
def test_study_file(spec):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "study.yaml"
        path.write_text(yaml.safe_dump(spec))
        _loads_or_says_why(load_study, str(path))


# ---------------------------------------------------------------------------------------------
# Data files

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10)
json_values = st.recursive(json_scalars,
                           lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.sampled_from(FIELDS + ("role", "content")) | st.text(max_size=6),
                                             inner, max_size=4),
                           max_leaves=10)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(ROLES) | st.text(max_size=6),
                                           "content": st.text(max_size=10) | json_values}), max_size=3)
records = (st.dictionaries(st.sampled_from(FIELDS), st.text(max_size=10) | json_values, max_size=4)
           | st.fixed_dictionaries({"messages": messages}) | json_values)


def _examples_hold(examples):
    if examples is not None:
        assert examples and all(ex.source and (ex.messages or ex.response) for ex in examples)


def _data_file(name: str, content, load=load_examples):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
        _examples_hold(_loads_or_says_why(load, path))


@given(raw=st.binary(max_size=300) | syntax_text.map(lambda t: t.encode("utf-8", "surrogatepass")),
       suffix=st.sampled_from([".jsonl", ".json", ".txt", ".data"]))
@example(raw=b"[" * 100_000, suffix=".jsonl")
@example(raw=b'{"text": ' + b"1" * 5000 + b"}", suffix=".jsonl")
@example(raw=b'[{"text": "a"}, ' + b"[" * 100_000, suffix=".json")
def test_data_file_bytes(raw, suffix):
    _data_file("data" + suffix, raw)


@given(rows=st.lists(records, min_size=1, max_size=4), layout=st.sampled_from(["jsonl", "json", "json-indented"]))
@example(rows=[{"text": "a\u2028b"}], layout="jsonl")
def test_data_records(rows, layout):
    if layout == "jsonl":
        _data_file("data.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    else:
        _data_file("data.json", json.dumps(rows, indent=2 if layout == "json-indented" else None))


text_no_controls = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12)


@given(pairs=st.lists(st.tuples(text_no_controls, text_no_controls), min_size=1, max_size=4),
       layout=st.sampled_from(["jsonl", "json"]), ascii_only=st.booleans())
def test_valid_records_always_load(pairs, layout, ascii_only):
    """The other half of the contract: well-formed records are never refused (any text, line
    separators such as U+2028 included), one Example each, named by its line."""
    pairs = [(i, o) for i, o in pairs if i.strip() and o.strip()]
    rows = [{"instruction": i, "output": o} for i, o in pairs]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"data.{layout}"
        if layout == "jsonl":
            path.write_text("".join(json.dumps(r, ensure_ascii=ascii_only) + "\n" for r in rows), encoding="utf-8")
        else:
            path.write_text("[\n" + ",\n".join(json.dumps(r, ensure_ascii=ascii_only) for r in rows) + "\n]\n",
                            encoding="utf-8")
        if not rows:
            return
        examples = load_examples(path)
    assert [(e.messages[0]["content"], e.answer) for e in examples] == pairs
    assert [e.source for e in examples] == [f"{path}:{n + (layout == 'json') + 1}" for n in range(len(rows))]


csv_cell = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=8) | st.sampled_from(SYNTAX)
csv_header = st.lists(st.sampled_from(FIELDS) | csv_cell, min_size=1, max_size=3)


@given(header=csv_header, rows=st.lists(st.lists(csv_cell, max_size=4), max_size=3), sep=st.sampled_from([",", ";"]))
def test_data_csv(header, rows, sep):
    _data_file("data.csv", "\n".join(sep.join(r) for r in [header, *rows]) + "\n", load=load_data)


# ---------------------------------------------------------------------------------------------
# adapter_config.json

ADAPTER_KEYS = ["peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "use_dora",
                "init_lora_weights", "rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern", "bias",
                "modules_to_save", "fan_in_fan_out", "base_model_name_or_path"]
adapter_values = (json_values | st.sampled_from(["LORA", "none", "gaussian", "pissa", "four", "q_proj"])
                  | st.lists(st.sampled_from(["q_proj", "v_proj", ""]), max_size=3)
                  | st.dictionaries(st.sampled_from(["q_proj", "(", "a{99999999999}", ".*"]), json_values, max_size=2))


@given(config=st.dictionaries(st.sampled_from(ADAPTER_KEYS) | st.text(max_size=6), adapter_values, max_size=8)
       | json_values)
@example(config={"r": "four", "target_modules": ["q_proj"]})
@example(config={"target_modules": ["q_proj"], "rank_pattern": {"a{99999999999}": 4}})
@example(config={"target_modules": ["q_proj"], "lora_alpha": 10**400})
@example(config={"target_modules": ["q_proj"], "alpha_pattern": {"(?i)q_proj": 4}})  # compiles alone, not in PEFT's
def test_adapter_config(config):
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / CONFIG_NAME).write_text(json.dumps(config))
        try:
            cfg = check_config(read_adapter_config(d), Path(d) / CONFIG_NAME)
            for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
                cfg.spec(name, d)  # what loading does with each module
        except UserError as e:
            _one_line(e)


@given(raw=st.binary(max_size=200) | syntax_text.map(lambda t: t.encode("utf-8", "surrogatepass")))
@example(raw=b"[" * 100_000)
def test_adapter_config_bytes(raw):
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / CONFIG_NAME).write_bytes(raw)
        try:
            check_config(read_adapter_config(d), Path(d) / CONFIG_NAME)
        except UserError as e:
            _one_line(e)

import ast
import dataclasses
import re
from pathlib import Path

import pytest

import loralab
from loralab.config import DataConfig, RunConfig, apply_overrides, from_dict, load_config
from loralab.errors import UserError


def test_defaults_follow_the_article():
    cfg = load_config(None)
    assert cfg.lora.r == 8 and cfg.lora_alpha == 16.0  # alpha = 2r
    assert cfg.lora.targets == "all-linear"
    assert cfg.lora.dropout == 0.05


def test_alpha_tracks_rank_unless_set():
    assert load_config(None, ["lora.r=32"]).lora_alpha == 64.0
    assert load_config(None, ["lora.r=32", "lora.alpha=8"]).lora_alpha == 8.0


def test_overrides_parse_yaml_values():
    cfg = load_config(None, ["train.lr=1e-3", "train.max_steps=7", "data.tasks=[2da,3ds]",
                             "lora.targets=qv", "train.gradient_checkpointing=true"])
    assert cfg.train.lr == 1e-3 and cfg.train.max_steps == 7
    assert cfg.data.tasks == ["2da", "3ds"] and cfg.lora.targets == "qv"
    assert cfg.train.gradient_checkpointing is True


def test_yaml_file_and_override(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("lora:\n  r: 4\ntrain:\n  lr: 2.0e-4\noutput_dir: out\n")
    cfg = load_config(p, ["lora.r=6"])
    assert cfg.lora.r == 6 and cfg.train.lr == 2e-4 and cfg.output_dir == "out"


@pytest.mark.parametrize("override, needle", [
    (["lora.rr=3"], "'lora.rr' (did you mean r?)"),
    (["trian.lr=1"], "did you mean train"),
    (["train.lr=abc"], "'train.lr' must be float"),
    (["train.lr=0"], "'train.lr' must be > 0"),
    (["lora.r=0"], "'lora.r' must be > 0"),
    (["lora.alpha=-1"], "'lora.alpha' must be > 0"),
    (["lora.dropout=1.0"], "'lora.dropout' must be in [0, 1)"),
    (["train.optimizer=adam"], "did you mean adamw"),
    (["train.scheduler=cosin"], "'train.scheduler' must be one of"),
    (["lora.r=2.5"], "'lora.r' must be int"),
    (["lora.targets=[]"], "'lora.targets'"),
    (["data.n_train=0"], "'data.n_train' must be a count > 0 or a mapping"),
    (["data.n_train={2da: -1}"], "'data.n_train' must be a count > 0 or a mapping"),
    (["data.n_train=many"], "'data.n_train' must be int"),
])
def test_bad_values_are_one_line_errors_naming_the_key(override, needle):
    with pytest.raises(UserError) as e:
        load_config(None, override)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_yaml_names_file_and_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("lora:\n  r: 8\n  alpha: [1,\n")
    with pytest.raises(UserError) as e:
        load_config(p)
    assert str(p) in str(e.value) and ":" in str(e.value)


def test_resolved_config_states_alpha():
    d = from_dict({"lora": {"r": 4}}).to_dict()
    assert d["lora"]["alpha"] == 8.0
    assert isinstance(RunConfig().to_dict()["train"], dict)


def test_override_into_non_section_is_an_error():
    with pytest.raises(UserError):
        apply_overrides({"output_dir": "x"}, ["output_dir.sub=1"])


# --- every config key the code names must exist ---------------------------------------------------

SECTIONS = ("model", "lora", "data", "train", "eval")
SRC = Path(loralab.__file__).parent
KEY_IN_TEXT = re.compile(r"(?<![\w./])(" + "|".join(SECTIONS) + r")\.([a-z_]+)\b")
QUOTED_KEY = re.compile(r"`(" + "|".join(SECTIONS) + r")\.([a-z_]+)(?:=[^`]*)?`|config key '(\w+)(?:\.(\w+))?'")


def _schema() -> dict[str, set[str]]:
    cfg = RunConfig()
    keys = {s: {f.name for f in dataclasses.fields(getattr(cfg, s))} for s in SECTIONS}
    keys[""] = {f.name for f in dataclasses.fields(cfg)}
    return keys


def _named_keys() -> list[tuple[str, int, str, str]]:
    """(file, line, section, key) for every config key the source names: in a UserError message, as
    `section.key` in backticks (docstrings, comments in strings), or after "config key '...'"."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "UserError":
                for part in ast.walk(node):
                    if isinstance(part, ast.Constant) and isinstance(part.value, str):
                        found += [(path.name, part.lineno, *m.groups()) for m in KEY_IN_TEXT.finditer(part.value)]
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for m in QUOTED_KEY.finditer(node.value):
                    section, key = (m.group(1), m.group(2)) if m.group(1) else (
                        (m.group(3), m.group(4)) if m.group(4) else ("", m.group(3)))
                    found.append((path.name, node.lineno, section, key))
    return found


def test_every_config_key_named_in_the_source_exists():
    schema, named = _schema(), _named_keys()
    assert len(named) > 40  # the scan finds them (the source names dozens of keys)
    unknown = [f"{f}:{line}: {s + '.' if s else ''}{k}" for f, line, s, k in named if k not in schema.get(s, ())]
    assert not unknown, "keys that are not in the config schema: " + "; ".join(unknown)


def test_the_scan_would_catch_a_wrong_key():
    assert KEY_IN_TEXT.search("config key 'data.packing' must be").groups() == ("data", "packing")
    assert "packing" not in _schema()["data"] and "group_window" not in _schema()["data"]


def test_preflight_modes_including_yaml_off():
    assert load_config(None, []).train.preflight == "error"
    assert load_config(None, ["train.preflight=off"]).train.preflight == "off"  # YAML 1.1 reads off as false
    assert load_config(None, ["train.preflight=warn"]).train.preflight == "warn"
    with pytest.raises(UserError, match="'train.preflight' must be one of error, warn, off"):
        load_config(None, ["train.preflight=strict"])


def _subtractions(examples) -> list[str]:
    return [e.prompt for e in examples if "minus" in e.prompt]


def _datasets(*overrides):
    from loralab.prepare import build_datasets
    return build_datasets(load_config(None, ["data.tasks=[2da, 2ds]", "data.val_fraction=0", "eval.n=5",
                                             *overrides]))


def test_n_train_per_task_mixes_the_tasks():
    mix = _datasets("data.n_train={2da: 30, 2ds: 90}")
    assert (len(mix.train), len(_subtractions(mix.train))) == (120, 90)
    # the same 2ds questions and held-out sets as a run giving every task 90: a mix takes each task's first n
    even = _datasets("data.n_train=90")
    assert _subtractions(mix.train) == _subtractions(even.train) and mix.tests == even.tests


def test_n_train_mapping_survives_other_tasks_but_not_typos():
    """Tasks the mapping leaves out get the default count and tasks it names but the run does not train are
    ignored (a config's mix survives `data.tasks=...`); a name that is no task is an error."""
    other = _datasets("data.n_train={2ds: 9, 3da: 1}")
    assert (len(other.train), len(_subtractions(other.train))) == (DataConfig.n_train + 9, 9)
    with pytest.raises(UserError, match="'data.n_train': '2sd' is not a task"):
        _datasets("data.n_train={2sd: 30}")


@pytest.mark.parametrize("override, needle", [
    (["train.objective=ppo"], "'train.objective' must be one of sft, dpo, orpo"),
    (["train.dpo_loss=sigmod"], "'train.dpo_loss' must be one of sigmoid, hinge, ipo, robust, got 'sigmod' (did you "
                                "mean sigmoid?)"),
    (["train.beta=0"], "'train.beta' must be > 0"),
    (["train.label_smoothing=0.5"], "'train.label_smoothing' must be in [0, 0.5)"),
    (["train.orpo_lambda=-1"], "'train.orpo_lambda' must be >= 0"),
    (["train.dpo_loss=hinge", "train.label_smoothing=0.1"], "'train.label_smoothing' applies to train.dpo_loss "
                                                             "sigmoid or robust, not hinge"),
    (["train.objective=dpo", "train.method=full"], "'train.objective': dpo needs train.method=lora"),
    (["train.objective=dpo", "lora.init=pissa"], "'train.objective': dpo cannot use lora.init=pissa"),
])
def test_preference_keys_are_checked(override, needle):
    with pytest.raises(UserError) as e:
        load_config(None, override)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_preference_defaults_and_full_orpo():
    cfg = load_config(None, ["train.objective=orpo", "train.method=full"])  # no reference model: full is fine
    assert (cfg.train.beta, cfg.train.dpo_loss, cfg.train.label_smoothing, cfg.train.orpo_lambda) == \
        (0.1, "sigmoid", 0.0, 0.1)
    assert load_config(None).train.objective == "sft" and load_config(None).eval.preference is None

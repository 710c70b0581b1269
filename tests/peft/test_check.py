"""`loralab check`: which runtime loads which variant as is."""
import json

import pytest
import torch

from loralab.cli import main
from loralab.peft.adapters import load_adapter
from loralab.peft.check import runtime_support
from tinymodels import tiny_llama


def _saved(folder, **config):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **config}
    get_peft_model(tiny_llama(0), LoraConfig(lora_dropout=0.0, **config)).save_pretrained(folder)
    return folder


def _loads(folder) -> dict:
    return {r["runtime"]: r["loads"] for r in runtime_support(folder)}


# (PEFT config, loralab, vLLM, GGUF)
CASES = {
    "plain": ({}, True, True, True),
    "rslora": ({"use_rslora": True}, True, True, False),
    "dora": ({"use_dora": True}, True, False, False),
    "rank_pattern": ({"rank_pattern": {"q_proj": 8}}, True, False, True),
    "alpha_pattern": ({"alpha_pattern": {"q_proj": 32}}, True, False, False),
    "layers": ({"layers_to_transform": [1]}, True, True, True),
    "modules_to_save": ({"modules_to_save": ["lm_head"]}, False, False, False),
    "pissa_unconverted": ({"init_lora_weights": "pissa"}, True, False, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_runtime_table_follows_each_loaders_rules(case, tmp_path):
    config, ours, vllm, gguf = CASES[case]
    folder = _saved(tmp_path / case, **config)
    got = _loads(folder)
    assert got == {"loralab": ours, "PEFT": True, "vLLM": vllm, "GGUF (llama.cpp)": gguf}
    if ours:  # the table's "yes" for loralab is the loader's own verdict
        load_adapter(tiny_llama(0), folder)


def test_cli_prints_a_table_and_json(tmp_path, capsys):
    folder = _saved(tmp_path / "d", use_dora=True, use_rslora=True)
    assert main(["check", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "runtime" in out and "vLLM" in out and "DoRA (use_dora) is refused" in out and "fold the scale" in out
    assert main(["check", str(folder), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["runtime"] for r in rows] == ["loralab", "PEFT", "vLLM", "GGUF (llama.cpp)"]
    assert main(["check", str(tmp_path / "missing")]) == 2
    assert "adapter folder not found" in capsys.readouterr().err


@pytest.mark.parametrize("key,value,message", [
    ("r", "four", "'r' must be a rank (an integer > 0), got 'four'"),
    ("r", 0, "'r' must be a rank (an integer > 0), got 0"),
    ("lora_alpha", None, "'lora_alpha' must be a number > 0, got None"),
    ("lora_dropout", 1.5, "'lora_dropout' must be a number in [0, 1), got 1.5"),
    ("rank_pattern", {"q_proj": "eight"}, "rank_pattern 'q_proj' must be a rank (an integer > 0), got 'eight'"),
])
def test_check_says_no_to_a_config_whose_values_are_not_numbers(key, value, message, tmp_path, capsys):
    """One validation (adapter_files.check_config) for `loralab check` and for every loader (merge, eval)."""
    from loralab.errors import UserError
    from loralab.peft.adapter_files import CONFIG_NAME

    folder = _saved(tmp_path / "a")
    cfg = json.loads((folder / CONFIG_NAME).read_text())
    (folder / CONFIG_NAME).write_text(json.dumps({**cfg, key: value}))
    rows = {r["runtime"]: r for r in runtime_support(folder)}
    assert rows["loralab"]["loads"] is False and rows["loralab"]["why"] == message
    with pytest.raises(UserError) as e:  # what merge and eval meet
        load_adapter(tiny_llama(0), folder)
    assert str(e.value) == f"{folder / CONFIG_NAME}: {message}"


def test_check_of_an_unreadable_adapter_config_is_one_line(tmp_path, capsys):
    folder = _saved(tmp_path / "a")
    (folder / "adapter_config.json").write_text("[" * 100_000)
    assert main(["check", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "adapter_config.json: not a readable JSON adapter config (nested too deeply)" in err


def test_an_adapter_config_that_is_a_fifo_is_refused_by_name(tmp_path, capsys):
    import os

    folder = tmp_path / "a"
    folder.mkdir()
    os.mkfifo(folder / "adapter_config.json")  # reading it would wait for a writer forever
    assert main(["check", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err == f"loralab: error: {folder}/adapter_config.json: is a FIFO (named pipe), expected an adapter config\n"

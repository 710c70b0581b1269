"""The Python API (loralab/api.py): loralab.train, loralab.estimate, loralab.load, exported lazily."""
import json
import subprocess
import sys

import pytest

import loralab
from loralab.errors import UserError


def _overrides(tiny_folder, out) -> dict:
    return {"model.name": str(tiny_folder), "data.tasks": ["2da"], "data.n_train": 16, "data.template": "raw",
            "eval.n": 2, "eval.before": False, "eval.max_new_tokens": 2, "train.max_steps": 2,
            "train.batch_size": 4, "train.progress": False, "train.precision": "fp32", "output_dir": str(out)}


@pytest.fixture(scope="module")
def trained(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("api") / "run"
    return loralab.train(None, quiet=True, **_overrides(tiny_folder, out))


def test_importing_loralab_loads_neither_torch_nor_the_api():
    code = ("import sys, loralab; assert callable(loralab.train) and loralab.__version__; "
            "print(sorted(m for m in ('torch', 'transformers', 'loralab.api', 'loralab.config') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_train_returns_the_runs_result_and_writes_its_files(trained):
    summary = json.loads((trained.output_dir / "summary.json").read_text())
    assert trained.summary == summary and summary["steps"] == 2
    assert trained.adapter_dir == trained.output_dir / "adapter"
    assert (trained.adapter_dir / "adapter_model.safetensors").is_file()
    assert trained.config.train.max_steps == 2 and trained.config.data.tasks == ["2da"]


def test_double_underscores_and_dotted_keys_are_the_same_override(tiny_folder, tmp_path, trained):
    from loralab.api import load_run_config, override_strings

    assert override_strings({"train__max_steps": 4, "lora.targets": ["q_proj"], "resume": False,
                             "data__system_prompt": "Be: brief"}) == \
        ["train.max_steps=4", 'lora.targets=["q_proj"]', "resume=false", "data.system_prompt=Be: brief"]
    a = load_run_config(None, override_strings({"train__max_steps": 4, "lora__r": 2}))
    b = load_run_config({"train": {"max_steps": 4}}, ["lora.r=2"])
    c = load_run_config(trained.config, ["train.max_steps=4", "lora.r=2"])
    assert (a.train.max_steps, a.lora.r) == (b.train.max_steps, b.lora.r) == (c.train.max_steps, c.lora.r) == (4, 2)
    assert trained.config.train.max_steps == 2  # the RunConfig given was not changed
    assert load_run_config("demo").output_dir == load_run_config("demo.yaml").output_dir  # the shipped config


def test_a_bad_key_is_the_one_line_error(tmp_path):
    with pytest.raises(UserError, match="lora.rr"):
        loralab.train(None, lora__rr=4, output_dir=str(tmp_path / "x"))
    with pytest.raises(UserError, match="expected a path"):
        loralab.train(42)
    assert not (tmp_path / "x").exists()


def test_a_second_train_of_the_finished_run_returns_its_summary(trained, tiny_folder):
    again = loralab.train(None, quiet=True, **_overrides(tiny_folder, trained.output_dir))
    assert again.summary == trained.summary


def test_estimate_is_the_cli_estimate(capsys):
    from loralab.cli import main

    result = loralab.estimate("llama-2-7b", method="qlora", seq=1024, gpu_gb=8)
    assert main(["estimate", "--model", "llama-2-7b", "--method", "qlora", "--seq", "1024", "--gpu-gb", "8",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(result))
    assert result["peak_bytes"] > 3 * 2**30 and result["fixes"]
    with pytest.raises(UserError, match="gpus=2 or more"):
        loralab.estimate(fsdp=True)


def test_load_generates_with_base_plus_adapter(trained):
    from loralab.inference import generate_once

    loaded = loralab.load(adapter=trained.adapter_dir)
    assert loaded.adapter == str(trained.adapter_dir) and loaded.base == trained.config.model.name
    answers = loaded.generate(["What is 1 plus 2?", "Hi"], max_new_tokens=4)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    # the same text `loralab generate` gives for the same prompt
    assert answers[0] == generate_once(None, str(trained.adapter_dir), "What is 1 plus 2?", max_new_tokens=4)
    assert loaded.generate("Question: 1+2?", raw=True, max_new_tokens=2)[0] == \
        generate_once(None, str(trained.adapter_dir), "Question: 1+2?", max_new_tokens=2, raw=True)

"""Bad input, the way a user meets it: `loralab <command> ...` exits 2 with ONE line on stderr,
`loralab: error: <what and where>`, no traceback, and leaves an earlier run's files untouched.

Most cases call `loralab.cli.main` in-process (fast); a few run `python -m loralab.cli` in a
subprocess to prove the same end to end. Every case that takes an output directory points it at
`prev`, a finished tiny run made once per module, and checks its files are byte-identical after.
"""
import json
import re
import shutil
from pathlib import Path

import pytest

from cli_cases import (  # noqa: F401
    base_config,
    config_with,
    digest,
    jsonl,
    run_cli,
    run_cli_after_training_began,
    run_subprocess,
    write,
)
from loralab.train import checkpoint
from tinymodels import save_tiny_folder

# ---------------------------------------------------------------------------------------------
# Data files

GOOD = {"instruction": "Say hi", "output": "hi"}

DATA_CASES = {
    # name: (file name, content, extra data config, what the message must contain)
    "malformed-json-line": ("data.jsonl", jsonl([GOOD, GOOD, '{"instruction": "x", "output": ']), {},
                            ["data.jsonl:3", "malformed JSON"]),
    "empty-file": ("data.jsonl", "", {}, ["data.jsonl:1", "empty"]),
    "blank-lines-only": ("data.jsonl", "\n  \n\n", {}, ["data.jsonl:1", "empty"]),
    "missing-output": ("data.jsonl", jsonl([GOOD, {"instruction": "x"}]), {}, ["data.jsonl:2", "missing 'output'"]),
    "missing-instruction": ("data.jsonl", jsonl([{"output": "x"}]), {}, ["data.jsonl:1", "missing 'instruction'"]),
    "no-known-fields": ("data.jsonl", jsonl([GOOD, GOOD, GOOD, {"question": "q", "answer": "a"}]), {},
                        ["data.jsonl:4", "missing 'instruction'/'output', 'messages'", "question"]),
    "messages-not-a-list": ("chat.jsonl", jsonl([{"messages": "hello"}]), {},
                            ["chat.jsonl:1", "'messages' must be a non-empty list"]),
    "unknown-role": ("chat.jsonl", jsonl([{"messages": [{"role": "user", "content": "hi"},
                                                         {"role": "bot", "content": "hello"}]}]), {},
                     ["chat.jsonl:1", "messages[1]", "unknown role 'bot'"]),
    "no-assistant-turn": ("chat.jsonl", jsonl([{"messages": [{"role": "user", "content": "hi"}]}]), {},
                          ["chat.jsonl:1", "no assistant turn"]),
    "empty-response": ("data.jsonl", jsonl([{"prompt": "2+2=", "response": ""}]), {},
                       ["data.jsonl:1", "'response' is empty"]),
    "wrong-field-type": ("data.jsonl", jsonl([GOOD, {"instruction": "x", "output": 4}]), {},
                         ["data.jsonl:2", "'output' must be a string"]),
    "json-array-bad-element": ("data.json", '[\n {"instruction": "a", "output": "b"},\n {"instruction": }\n]\n', {},
                               ["data.json:3", "malformed JSON"]),
    "not-utf8": ("data.jsonl", jsonl([GOOD]).encode() + b'{"instruction": "\xff\xfe", "output": "x"}\n', {},
                 ["data.jsonl:2", "not UTF-8"]),
    # every response cut away by a tiny max_seq_len: nothing left to learn
    "every-response-truncated": ("data.jsonl", jsonl([{"prompt": "Q: 1+1?\nA:", "response": " 2"}] * 3),
                                 {"max_seq_len": 1}, ["every response is empty or truncated away",
                                                      "data.max_seq_len=1", "data.jsonl:1"]),
    "max-seq-len-shorter-than-every-prompt": (
        "data.jsonl", jsonl([{"prompt": "Please compute the following sum carefully: " + "1+" * 20 + "1 =",
                               "response": " 21"}] * 3),
        {"max_seq_len": 16}, ["every response is empty or truncated away", "data.max_seq_len=16"]),
    # chat records: the (default) system turn and the user turn fill max_seq_len, so every
    # assistant label is masked
    "all-labels-masked": ("chat.jsonl", jsonl([{"messages": [{"role": "user", "content": "What is 2 plus 2?"},
                                                              {"role": "assistant", "content": "4"}]}] * 3),
                          {"max_seq_len": 24, "template": "chat"},
                          ["every response is empty or truncated away", "data.max_seq_len=24", "chat.jsonl:1"]),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_data_file(case, tiny_folder, untouched, tmp_path, capsys):
    name, content, data_extra, expect = DATA_CASES[case]
    data = write(tmp_path / name, content)
    cfg = config_with(tmp_path, tiny_folder, untouched, data={"path": str(data), **data_extra})
    run_cli(capsys, "train", cfg, expect=expect)


def test_data_file_does_not_exist(tiny_folder, untouched, tmp_path, capsys):
    cfg = config_with(tmp_path, tiny_folder, untouched, data={"path": str(tmp_path / "nope.jsonl")})
    run_cli(capsys, "train", cfg, expect=["nope.jsonl", "no such data file"])


def test_directory_given_for_data_file(tiny_folder, untouched, tmp_path, capsys):
    (tmp_path / "datadir").mkdir()
    cfg = config_with(tmp_path, tiny_folder, untouched, data={"path": str(tmp_path / "datadir")})
    run_cli(capsys, "train", cfg, expect=["datadir", "is a directory"])


def test_data_columns_naming_a_missing_column(tiny_folder, untouched, tmp_path, capsys):
    import datasets

    datasets.Dataset.from_list([{"question": "q", "answer": "a"}]).to_parquet(str(tmp_path / "qa.parquet"))
    cfg = config_with(tmp_path, tiny_folder, untouched, data={"path": str(tmp_path / "qa.parquet")})
    run_cli(capsys, "train", cfg, "data.columns={instruction: questoin, output: answer}",
            expect=["qa.parquet: data.columns names 'questoin', not a column", "its columns: question, answer"])


def test_malformed_json_line_end_to_end(tiny_folder, untouched, tmp_path):
    data = write(tmp_path / "data.jsonl", jsonl([GOOD, GOOD, "{not json"]))
    cfg = config_with(tmp_path, tiny_folder, untouched, data={"path": str(data)})
    run_subprocess("train", cfg, expect=["data.jsonl:3", "malformed JSON"])


# ---------------------------------------------------------------------------------------------
# Config values (as `key=value` overrides on the command line)

CONFIG_CASES = {
    "unknown-key-with-suggestion": (["train.warmup_step=10"], ["train.warmup_step", "did you mean warmup_steps"]),
    "unknown-section": (["trian.lr=1e-3"], ["'trian'", "did you mean train?"]),
    "wrong-type": (["lora.r=abc"], ["lora.r", "must be int", "'abc'"]),
    "r-zero": (["lora.r=0"], ["lora.r", "must be > 0"]),
    "r-negative": (["lora.r=-4"], ["lora.r", "must be > 0"]),
    "alpha-zero": (["lora.alpha=0"], ["lora.alpha", "must be > 0"]),
    "alpha-negative": (["lora.alpha=-16"], ["lora.alpha", "must be > 0"]),
    "dropout-one": (["lora.dropout=1.0"], ["lora.dropout", "[0, 1)"]),
    "dropout-negative": (["lora.dropout=-0.1"], ["lora.dropout", "[0, 1)"]),
    "empty-targets": (["lora.targets=[]"], ["lora.targets", "non-empty"]),
    "unknown-optimizer": (["train.optimizer=adam"], ["train.optimizer", "did you mean adamw?"]),
    "unknown-scheduler": (["train.scheduler=cosine_restarts"], ["train.scheduler", "cosine, linear, constant"]),
    "lr-zero": (["train.lr=0"], ["train.lr", "must be > 0"]),
    "lr-negative": (["train.lr=-1e-4"], ["train.lr", "must be > 0"]),
    "bad-resume-value": (["resume=maybe"], ["resume", "auto, true or false"]),
    "override-without-equals": (["lora.r"], ["override 'lora.r'", "key.sub=value"]),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_config_value(case, tiny_folder, untouched, tmp_path, capsys):
    overrides, expect = CONFIG_CASES[case]
    cfg = config_with(tmp_path, tiny_folder, untouched)
    run_cli(capsys, "train", cfg, *overrides, expect=expect)


def test_unknown_key_end_to_end(tiny_folder, untouched, tmp_path):
    cfg = config_with(tmp_path, tiny_folder, untouched)
    run_subprocess("train", cfg, "lora.dropuot=0.1", expect=["lora.dropuot", "did you mean dropout?"])


def test_unknown_target_module_lists_the_models_linear_modules(tiny_folder, untouched, tmp_path, capsys):
    cfg = config_with(tmp_path, tiny_folder, untouched)
    line = run_cli(capsys, "train", cfg, "lora.targets=[qkv_proj]", expect=["'qkv_proj'", "linear modules"])
    for name in ("q_proj", "v_proj", "down_proj"):
        assert name in line


def test_yaml_syntax_error_names_file_and_line(tiny_folder, untouched, tmp_path, capsys):
    cfg = write(tmp_path / "broken.yaml", f"model:\n  name: {tiny_folder}\nlora:\n  r: [4\n  alpha: 8\n"
                                           f"output_dir: {untouched}\n")
    line = run_cli(capsys, "train", cfg, expect=["broken.yaml:", "invalid YAML"])
    assert re.search(r"broken\.yaml:\d+: invalid YAML", line)


def test_yaml_that_is_not_a_mapping(untouched, tmp_path, capsys):
    cfg = write(tmp_path / "list.yaml", "- lora.r=4\n- train.lr=1e-3\n")
    run_cli(capsys, "train", cfg, expect=["list.yaml", "must be a mapping", "list"])


def test_section_that_is_not_a_mapping(tiny_folder, untouched, tmp_path, capsys):
    cfg = write(tmp_path / "flat.yaml", f"model: {tiny_folder}\noutput_dir: {untouched}\n")
    run_cli(capsys, "train", cfg, expect=["config section 'model' must be a mapping"])


# ---------------------------------------------------------------------------------------------
# Models

def _copy_model(tiny_folder, tmp_path, name="model") -> Path:
    dst = tmp_path / name
    shutil.copytree(tiny_folder, dst)
    return dst


def test_unknown_model_name(tiny_folder, untouched, tmp_path, capsys):
    cfg = config_with(tmp_path, tiny_folder, untouched, model={"name": "smollm3-9000m"})
    run_cli(capsys, "train", cfg, expect=["unknown model 'smollm3-9000m'", "smollm2-135m"])


def test_model_folder_without_weights(tiny_folder, untouched, tmp_path, capsys):
    model = _copy_model(tiny_folder, tmp_path)
    (model / "model.safetensors").unlink()
    cfg = config_with(tmp_path, tiny_folder, untouched, model={"name": str(model)})
    run_cli(capsys, "train", cfg, expect=[str(model), "no *.safetensors weights"])


def test_model_folder_with_only_pickle_weights(tiny_folder, untouched, tmp_path, capsys):
    model = _copy_model(tiny_folder, tmp_path)
    (model / "model.safetensors").rename(model / "pytorch_model.bin")
    cfg = config_with(tmp_path, tiny_folder, untouched, model={"name": str(model)})
    run_cli(capsys, "train", cfg, expect=[str(model), "pickle", "safetensors only"])


def test_corrupt_safetensors(tiny_folder, untouched, tmp_path, capsys):
    model = _copy_model(tiny_folder, tmp_path)
    (model / "model.safetensors").write_bytes(b"\x07garbage, not a safetensors header" * 40)
    cfg = config_with(tmp_path, tiny_folder, untouched, model={"name": str(model)})
    run_cli(capsys, "train", cfg, expect=[str(model), "safetensors"])


def test_corrupt_safetensors_end_to_end(tiny_folder, untouched, tmp_path):
    model = _copy_model(tiny_folder, tmp_path)
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: len(data) // 3])  # truncated mid-tensor
    cfg = config_with(tmp_path, tiny_folder, untouched, model={"name": str(model)})
    run_subprocess("train", cfg, expect=[str(model), "safetensors"])


def _truncated_gguf(tmp_path) -> bytes:
    """The first 1000 bytes of a real-looking GGUF file (llama metadata, a vocabulary, a tensor)."""
    import numpy as np
    from gguf import GGUFWriter

    full = tmp_path / "full.gguf"
    w = GGUFWriter(str(full), "llama")
    w.add_name("tiny")
    w.add_context_length(128)
    w.add_embedding_length(32)
    w.add_block_count(2)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"tok{i}" for i in range(200)])
    w.add_tensor("token_embd.weight", np.zeros((128, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = full.read_bytes()
    full.unlink()
    assert data[:4] == b"GGUF" and len(data) > 1000
    return data[:1000]


def test_truncated_gguf(tiny_folder, untouched, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LORALAB_CACHE", str(tmp_path / "cache"))
    gguf = write(tmp_path / "model-Q4.gguf", _truncated_gguf(tmp_path))
    cfg = config_with(tmp_path, tiny_folder, untouched, model={"name": str(gguf)})
    run_cli(capsys, "train", cfg, expect=["model-Q4.gguf", "cannot read GGUF file"])
    assert not list((tmp_path / "cache").rglob("config.json"))  # nothing half-converted is cached


@pytest.mark.parametrize("auto_map", [
    {"AutoConfig": "configuration_tiny.TinyConfig", "AutoModelForCausalLM": "modeling_tiny.TinyCustomForCausalLM"},
    {"AutoModelForCausalLM": "modeling_tiny.TinyCustomForCausalLM"},  # custom model class only
], ids=["config-and-model", "model-only"])
def test_model_needing_remote_code(auto_map, tiny_folder, untouched, tmp_path, capsys):
    model = _copy_model(tiny_folder, tmp_path)
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="tinycustom", architectures=["TinyCustomForCausalLM"], auto_map=auto_map)
    (model / "config.json").write_text(json.dumps(config))
    cfg = config_with(tmp_path, tiny_folder, untouched, model={"name": str(model)})
    run_cli(capsys, "train", cfg, expect=[str(model), "model.trust_remote_code"])


# ---------------------------------------------------------------------------------------------
# Output directory, resume, adapters

def test_output_dir_is_a_file(tiny_folder, tmp_path, capsys):
    target = write(tmp_path / "results.txt", "my notes\n")
    cfg = config_with(tmp_path, tiny_folder, target)
    run_cli(capsys, "train", cfg, expect=["output_dir", "results.txt", "is a file"])
    assert target.read_text() == "my notes\n"


def test_resume_from_checkpoint_of_a_different_config(tiny_folder, untouched, tmp_path, capsys):
    cfg = config_with(tmp_path, tiny_folder, untouched, train={"lr": 5e-3})
    run_cli(capsys, "train", cfg, "resume=true",
            expect=["step-00000002", "different config", "train.lr", "resume=false"])


def test_resume_true_without_checkpoint(tiny_folder, tmp_path, capsys):
    cfg = config_with(tmp_path, tiny_folder, tmp_path / "fresh")
    run_cli(capsys, "train", cfg, "resume=true", expect=["resume", "no checkpoint"])


@pytest.fixture(scope="module")
def other_base(tmp_path_factory):
    """A tiny model of another shape: the previous run's adapter does not fit it."""
    return save_tiny_folder(tmp_path_factory.mktemp("other-model"), hidden_size=48, intermediate_size=96)


def test_eval_adapter_on_a_different_base(other_base, untouched, capsys):
    run_cli(capsys, "eval", "--model", other_base, "--adapter", untouched / "adapter", "--tasks", "2da", "--n", "2",
            expect=["adapter does not match the model", "shape"])


def test_merge_adapter_on_a_different_base_end_to_end(other_base, untouched, tmp_path):
    out = tmp_path / "merged"
    run_subprocess("merge", untouched / "adapter", out, "--model", other_base,
                   expect=["adapter does not match the model", "shape"])
    assert not out.exists()


def test_eval_adapter_folder_missing(untouched, tmp_path, capsys):
    run_cli(capsys, "eval", "--adapter", tmp_path / "no-adapter", "--tasks", "2da", "--n", "2",
            expect=["no-adapter", "adapter_config.json"])


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tiny_folder, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    cfg = write(tmp_path / "c.yaml", json.dumps(base_config(tiny_folder, out, train={"max_steps": 4,
                                                                                       "keep_checkpoints": 5})))
    real_save = checkpoint.atomic_save_safetensors
    seen = {"saves": 0, "before": None}

    def full_disk(tensors, path, metadata=None):
        if Path(path).name == "optimizer.safetensors":
            seen["saves"] += 1
            if seen["saves"] == 3:  # the third checkpoint: the disk is full halfway through it
                seen["before"] = digest(out / "checkpoints", complete_only=True)
                raise OSError(28, "No space left on device")
        return real_save(tensors, path, metadata)

    monkeypatch.setattr(checkpoint, "atomic_save_safetensors", full_disk)
    run_cli_after_training_began(capsys, "train", cfg, expect=("step-00000003", "No space left on device", "intact"))
    assert seen["before"] and digest(out / "checkpoints") == seen["before"]
    assert checkpoint.latest(out / "checkpoints").name == "step-00000002"
    assert not list((out / "checkpoints").glob(".tmp-*"))
    assert not (out / "adapter").exists() and not (out / "summary.json").exists()


# ---------------------------------------------------------------------------------------------
# Limits the pre-flight check holds a run to (loralab.memory.preflight), before any weight loads

def test_rank_no_targeted_layer_can_use(tiny_folder, untouched, tmp_path, capsys):
    cfg = config_with(tmp_path, tiny_folder, untouched)  # tiny model: hidden 32, so min(in, out) <= 32
    run_cli(capsys, "train", cfg, "lora.r=100000",
            expect=["config key 'lora.r' is 100000", "rank at most min(in, out), 32", "set lora.r <= 32"])


def test_examples_longer_than_the_models_context(tiny_folder, untouched, tmp_path, capsys):
    data = write(tmp_path / "data.jsonl", jsonl([{"prompt": "Add these: " + "1+" * 150 + "1 =", "response": " 151"},
                                                 {"prompt": "1+1=", "response": "2"}]))
    cfg = config_with(tmp_path, tiny_folder, untouched, data={"path": str(data), "max_seq_len": 1024})
    run_cli(capsys, "train", cfg, expect=["config key 'data.max_seq_len' is 1024", "context of 128",
                                          "max_position_embeddings", "set data.max_seq_len=128"])


def test_not_enough_memory_is_refused_with_the_fixes(tiny_folder, untouched, tmp_path, capsys, monkeypatch):
    from loralab.memory import preflight

    monkeypatch.setattr(preflight, "device_room", lambda device: preflight.Room(0, "a full machine"))
    # log_every differs from the finished run's: not a rerun of it (that one says it is done, rerun.py)
    cfg = config_with(tmp_path, tiny_folder, untouched, train={"log_every": 2})
    run_cli(capsys, "train", cfg, expect=["not enough memory: estimated peak", "a full machine",
                                          "train.preflight=warn"])


def test_output_dir_without_room_for_the_checkpoint(tiny_folder, untouched, tmp_path, capsys, monkeypatch):
    from loralab.memory import preflight

    monkeypatch.setattr(preflight, "free_disk_bytes", lambda folder: 4096)
    cfg = config_with(tmp_path, tiny_folder, untouched, train={"log_every": 2})  # not a rerun of the finished run
    run_cli(capsys, "train", cfg, expect=["config key 'output_dir'", "4.00 KiB free", "checkpoint and adapter",
                                          "trainable parameters"])


def test_warnings_instead_of_errors_let_the_run_go_on(tiny_folder, tmp_path, capsys, monkeypatch):
    """A rank some targeted layers cannot use is a warning; `train.preflight=warn` makes the memory
    verdict one too. The run trains and says both."""
    from loralab.cli import main
    from loralab.memory import preflight

    monkeypatch.setattr(preflight, "device_room", lambda device: preflight.Room(0, "a full machine"))
    cfg = config_with(tmp_path, tiny_folder, tmp_path / "fresh")
    capsys.readouterr()
    assert main(["train", str(cfg), "lora.r=17", "train.preflight=warn"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert "loralab: warning: lora.r=17 is above min(in, out) of k_proj, v_proj (16): their updates cannot use " \
           "the extra rank, which only costs memory" in err
    assert any(l.startswith("loralab: warning: not enough memory: estimated peak") for l in err)
    assert (tmp_path / "fresh" / "adapter" / "adapter_model.safetensors").is_file()

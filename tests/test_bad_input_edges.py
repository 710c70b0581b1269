"""More bad input held to the CLI contract of tests/test_bad_input.py (exit 2, one `loralab: error:`
line, no traceback, an earlier run's files byte-identical): a config with two sections of one name
or an alias bomb, files that are not regular files, counts that used to fail deep in a run after
rewriting the run folder, a rank pattern that names no module, an unwritable output folder."""
import json
import os
import time

import pytest
import yaml

from cli_cases import base_config, config_with, run_cli, run_subprocess, write

# ---------------------------------------------------------------------------------------------
# The config file

def test_two_sections_of_one_name(tiny_folder, untouched, tmp_path, capsys):
    text = yaml.safe_dump(base_config(tiny_folder, untouched), sort_keys=False) + "lora:\n  r: 8\n"
    cfg = write(tmp_path / "config.yaml", text)
    first = text.splitlines().index("lora:") + 1
    run_cli(capsys, "train", cfg, expect=[f"config.yaml:{len(text.splitlines()) - 1}: duplicate key 'lora' "
                                          f"(first at line {first})"])


def test_an_alias_bomb_is_refused_at_once(tiny_folder, untouched, tmp_path, capsys):
    levels = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        levels.append(f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]")
    cfg = write(tmp_path / "bomb.yaml", "x:\n" + "".join(f"  {l}\n" for l in levels)
                + yaml.safe_dump(base_config(tiny_folder, untouched)) + "eval:\n  tasks: [*i]\n")
    start = time.perf_counter()
    run_cli(capsys, "train", cfg, expect=["bomb.yaml:", "aliases expand to more than 100,000 values"])
    assert time.perf_counter() - start < 1.0


def test_a_fifo_given_as_the_config(tmp_path):
    os.mkfifo(tmp_path / "config.yaml")
    run_subprocess("train", tmp_path / "config.yaml", expect=["config.yaml: is a FIFO (named pipe), expected a YAML"])


# ---------------------------------------------------------------------------------------------
# data.path that is not a regular file

@pytest.mark.parametrize("name", ["data.jsonl", "data.csv"])
def test_a_fifo_given_as_the_data_file(name, tiny_folder, untouched, tmp_path):
    os.mkfifo(tmp_path / name)  # reading it would wait for a writer forever
    cfg = config_with(tmp_path, tiny_folder, untouched, data={"path": str(tmp_path / name)})
    run_subprocess("train", cfg, expect=[f"{name}: is a FIFO (named pipe), expected a data file"])


def test_a_device_given_as_the_data_file(tiny_folder, untouched, tmp_path, capsys):
    cfg = config_with(tmp_path, tiny_folder, untouched, data={"path": "/dev/zero"})  # endless: MemoryError
    run_cli(capsys, "train", cfg, expect=["/dev/zero: is a character device, expected a data file"])


def test_data_nested_too_deeply(tiny_folder, untouched, tmp_path, capsys):
    data = write(tmp_path / "data.jsonl", '{"instruction": "a", "output": "b"}\n' + "[" * 100_000 + "\n")
    cfg = config_with(tmp_path, tiny_folder, untouched, data={"path": str(data)})
    run_cli(capsys, "train", cfg, expect=["data.jsonl:2: malformed JSON (nested too deeply)"])


# ---------------------------------------------------------------------------------------------
# Values refused before the run folder is touched

COUNT_CASES = {
    "max-new-tokens-negative": ("eval.max_new_tokens=-1", "config key 'eval.max_new_tokens' must be > 0, got -1"),
    "max-new-tokens-zero": ("eval.max_new_tokens=0", "config key 'eval.max_new_tokens' must be > 0, got 0"),
    "threads-zero": ("train.threads=0", "config key 'train.threads' must be > 0"),
    "max-grad-norm-zero": ("train.max_grad_norm=0", "config key 'train.max_grad_norm' must be > 0"),
    "min-lr-ratio-above-one": ("train.min_lr_ratio=2", "config key 'train.min_lr_ratio' must be in [0, 1]"),
    "momentum-negative": ("train.momentum=-0.5", "config key 'train.momentum' must be >= 0"),
    "seed-negative": ("train.seed=-1", "config key 'train.seed' must be in [0, 2**63)"),
    "data-seed-huge": (f"data.seed={2**64}", "config key 'data.seed' must be in [0, 2**63)"),
    "resume-one": ("resume=1", "config key 'resume' must be auto, true or false, got 1"),  # 1 == True, a typo
    "pattern-overflowing-re": ("lora.rank_pattern={'q_proj{99999999999}': 4}",
                               "config key 'lora.rank_pattern': 'q_proj{99999999999}' is not a valid regular"),
    "pattern-flags-not-at-start": ("lora.alpha_pattern={'(?i)q_proj': 4}",  # valid alone, not in PEFT's match
                                   "config key 'lora.alpha_pattern': '(?i)q_proj' is not a valid regular expression"),
}


@pytest.mark.parametrize("case", list(COUNT_CASES))
def test_a_count_refused_leaves_the_run_folder_byte_identical(case, tiny_folder, untouched, tmp_path, capsys):
    override, message = COUNT_CASES[case]
    cfg = config_with(tmp_path, tiny_folder, untouched)  # `untouched` compares every file after
    run_cli(capsys, "train", cfg, override, expect=[message])


@pytest.mark.parametrize("key", ["rank_pattern", "alpha_pattern"])
def test_a_pattern_naming_no_module(key, tiny_folder, untouched, tmp_path, capsys):
    cfg = config_with(tmp_path, tiny_folder, untouched)
    run_cli(capsys, "train", cfg, f"lora.{key}={{qproj: 8}}",
            expect=[f"config key 'lora.{key}': 'qproj' matches none of the", "LoRA target modules", "q_proj"])


# ---------------------------------------------------------------------------------------------
# The output folder

def test_an_existing_run_folder_on_a_read_only_mount(tiny_folder, untouched, tmp_path, capsys, monkeypatch):
    import loralab.io.lock as lock

    real_open = lock.os.open

    def read_only(path, flags, *args):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(30, "Read-only file system")
        return real_open(path, flags, *args)

    monkeypatch.setattr(lock.os, "open", read_only)  # root ignores chmod 555: the mount's refusal, simulated
    cfg = config_with(tmp_path, tiny_folder, untouched)
    run_cli(capsys, "train", cfg, expect=["config key 'output_dir': cannot create the lock file",
                                          "(Read-only file system)"])


def test_a_study_file_with_a_duplicate_key(tmp_path, capsys):
    study = write(tmp_path / "s.yaml", json.dumps({"name": "s"})[:-1] + ', "name": "t"}\n')
    run_cli(capsys, "study", study, "--dry-run", expect=["s.yaml:1: duplicate key 'name'"])

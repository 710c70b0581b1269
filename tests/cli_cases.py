"""How the CLI's failure cases are set up and judged (tests/test_bad_input.py, tests/test_faults.py):
a finished run whose files no failed command may touch, and the contract check
(exit 2, one `loralab: error:` line on stderr, no traceback)."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from loralab.cli import main
from loralab.config import load_config
from loralab.pipeline import run_training
from loralab.train import checkpoint

# ---------------------------------------------------------------------------------------------
# Module fixtures: a finished run (on conftest's tiny_folder) whose files must survive every case

def base_config(folder, out, **sections) -> dict:
    cfg = {"model": {"name": str(folder)},
           "lora": {"r": 4},
           "data": {"tasks": ["2da"], "n_train": 16, "template": "raw"},
           "train": {"max_steps": 2, "batch_size": 4, "save_every": 1, "progress": False, "precision": "fp32",
                     "lr": 1e-2},
           "eval": {"n": 2, "before": False, "tasks": []},  # no generation: fast
           "output_dir": str(out)}
    for section, values in sections.items():
        cfg[section].update(values)
    return cfg


@pytest.fixture(scope="module")
def prev(tiny_folder, tmp_path_factory):
    """A finished run (adapter, summary.json, checkpoints): the files no failed command may touch."""
    root = tmp_path_factory.mktemp("prev")
    out = root / "run"
    cfg_path = root / "prev.yaml"
    cfg_path.write_text(json.dumps(base_config(tiny_folder, out)))  # JSON is YAML
    run_training(load_config(cfg_path), quiet=True)
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "summary.json").is_file()
    assert checkpoint.latest(out / "checkpoints") is not None
    return out


def digest(folder: Path, *, complete_only: bool = False) -> dict:
    """sha256 of every file under folder (complete_only: leave out checkpoint temp folders)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))
            if p.is_file() and not (complete_only and ".tmp-" in str(p.relative_to(folder)))}


@pytest.fixture
def untouched(prev):
    """Asserts after the test that every file of the previous run is byte-identical (none added)."""
    before = digest(prev)
    yield prev
    assert digest(prev) == before


# ---------------------------------------------------------------------------------------------
# How a case is run and judged

def _one_error_line(rc: int, err: str, *expected: str) -> str:
    assert rc == 2, f"exit {rc}, stderr: {err}"
    assert "Traceback" not in err, err
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1, f"stderr is not one line:\n{err}"
    line = lines[0]
    assert line.startswith("loralab: error: "), line
    for text in expected:
        assert text in line, f"{text!r} not in {line!r}"
    return line


def run_cli(capsys, *argv, expect=()):
    capsys.readouterr()  # drop anything printed before
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return _one_error_line(rc, captured.err, *expect)


def run_cli_after_training_began(capsys, *argv, expect=()):
    """A failure once training has begun: the run's own `loralab:` progress lines come first, the
    one error line is the last. Returns that line."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = err.strip("\n").splitlines()
    assert rc == 2 and "Traceback" not in err, err
    assert [l for l in lines if l.startswith("loralab: error:")] == lines[-1:]
    assert all(l.startswith("loralab: ") for l in lines), err
    for text in expect:
        assert text in lines[-1], f"{text!r} not in {lines[-1]!r}"
    return lines[-1]


def run_subprocess(*argv, expect=()):
    proc = subprocess.run([sys.executable, "-m", "loralab.cli", *map(str, argv)], capture_output=True, text=True,
                          timeout=120)
    return _one_error_line(proc.returncode, proc.stderr, *expect)


def write(path: Path, content) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def config_with(tmp_path, tiny_folder, prev, **sections) -> Path:
    return write(tmp_path / "run.yaml", json.dumps(base_config(tiny_folder, prev, **sections)))


def jsonl(records) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)

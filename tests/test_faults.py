"""Faults that are not bad input: a NaN/Inf loss stops the run naming the step (the last good
checkpoint intact) or is skipped on request; and no pickle is ever loaded by the package."""
import json
import re
from pathlib import Path

from cli_cases import base_config, digest, run_cli_after_training_began, write
from loralab.cli import main
from loralab.train import checkpoint

SRC = Path(__file__).resolve().parents[1] / "src" / "loralab"


# ---------------------------------------------------------------------------------------------
# Non-finite losses

def _nan_from_step(monkeypatch, first_bad_call: int, on_first_nan=None):
    """The training loss becomes NaN from the `first_bad_call`-th micro batch on (validation, which
    runs without gradients, is left alone)."""
    import torch

    from loralab.train import loss as loss_mod

    real = loss_mod.loss_sum
    calls = {"n": 0}

    def loss_sum(model, batch, *args):
        if not torch.is_grad_enabled():
            return real(model, batch, *args)
        calls["n"] += 1
        s, n = real(model, batch, *args)
        if calls["n"] == first_bad_call and on_first_nan:
            on_first_nan()
        return (s * torch.nan if calls["n"] >= first_bad_call else s), n

    monkeypatch.setattr(loss_mod, "loss_sum", loss_sum)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tiny_folder, tmp_path, capsys,
                                                                           monkeypatch):
    out = tmp_path / "run"
    cfg = write(tmp_path / "c.yaml", json.dumps(base_config(tiny_folder, out, train={"max_steps": 5})))
    good = {}
    # grad_accum 1: call k is step k; when step 3 starts, steps 1 and 2 are checkpointed
    _nan_from_step(monkeypatch, 3, on_first_nan=lambda: good.update(digest(out / "checkpoints")))
    line = run_cli_after_training_began(capsys, "train", cfg, expect=("non-finite loss at step 3",
                                                                      "train.skip_nonfinite"))
    last = checkpoint.latest(out / "checkpoints")
    assert last.name == "step-00000002" and str(last) in line
    assert good and digest(out / "checkpoints") == good  # byte-identical to before the NaN
    snap = checkpoint.load(last)  # complete and readable
    assert snap["step"] == 2 and all(v.isfinite().all() for v in snap["trainable"].values())
    assert not (out / "adapter").exists() and not (out / "summary.json").exists()


def test_skip_nonfinite_skips_batches_and_reports_them(tiny_folder, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    cfg = write(tmp_path / "c.yaml", json.dumps(base_config(tiny_folder, out, train={"max_steps": 4})))
    _nan_from_step(monkeypatch, 3)
    assert main(["train", str(cfg), "train.skip_nonfinite=true"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_steps"] == 2 and summary["steps"] == 4
    snap = checkpoint.load(checkpoint.latest(out / "checkpoints"))
    assert all(v.isfinite().all() for v in snap["trainable"].values())  # no NaN reached the weights


# ---------------------------------------------------------------------------------------------
# Safe loading: no pickle anywhere in the package

def _sources():
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 10
    return files


def test_torch_load_always_has_weights_only():
    offenders = []
    for path in _sources():
        text = path.read_text()
        for m in re.finditer(r"\btorch\.load\s*\(", text):
            depth, i = 1, m.end()
            while depth and i < len(text):
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                i += 1
            if not re.search(r"weights_only\s*=\s*True", text[m.end():i]):
                offenders.append(f"{path.name}:{text.count(chr(10), 0, m.start()) + 1}")
    assert not offenders, f"torch.load without weights_only=True: {offenders}"


def test_pickle_is_never_imported():
    pattern = re.compile(r"^\s*(import\s+(c?pickle|dill|joblib)\b|from\s+(c?pickle|dill|joblib)\s+import)", re.M)
    offenders = [p.name for p in _sources() if pattern.search(p.read_text())]
    assert not offenders, f"pickle imported in {offenders}"

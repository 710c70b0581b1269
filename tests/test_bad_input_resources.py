"""Resources decided before any work (issue 43 item 3), held to the CLI contract of
tests/test_bad_input.py (exit 2, one `loralab: error:` line, no traceback, an earlier run's files
byte-identical): an evaluation batch whose generation cannot fit, new tokens past the model's
context, synthetic data too large to generate, a data file too large to read, data whose token ids
cannot fit. Available memory is mocked (preflight.cpu_room / device_room), so every case is
deterministic on any machine."""
import re
import time

from cli_cases import config_with, jsonl, run_cli, write
from loralab.memory import estimate as E
from loralab.memory import preflight as P

MiB = 2**20

# the evaluation, on the tiny model: ~0.3 GiB of KV cache, prefill and logits at once
BIG_EVAL = {"tasks": ["2da"], "n": 5000, "batch_size": 5000, "max_new_tokens": 64, "before": True}


def _room(monkeypatch, name: str, n: int, source: str = "MemAvailable"):
    monkeypatch.setattr(P, name, lambda *a: P.Room(n, source))


def test_an_evaluation_batch_that_cannot_fit(tiny_folder, untouched, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(P, "current_rss_bytes", lambda: E.CPU_RUNTIME_BYTES)  # the budget: room + the runtime
    _room(monkeypatch, "device_room", 100 * MiB)  # training's few MB fit, generation's hundreds do not
    cfg = config_with(tmp_path, tiny_folder, untouched, eval=BIG_EVAL)
    start = time.perf_counter()
    # resume=false: the evaluation's test set changes the training draw, which a resume would refuse first
    line = run_cli(capsys, "train", cfg, "resume=false",
                   expect=["not enough memory for the evaluation", "eval.batch_size=5000", "eval.max_new_tokens=64",
                           "KV cache", "train.preflight=warn"])
    assert time.perf_counter() - start < 30  # refused before any generation (5,000 x 64 tokens)
    fits = int(re.search(r"eval\.batch_size=(\d+) fits", line).group(1))
    assert 1 <= fits < 5000


def test_new_tokens_past_the_models_context(tiny_folder, untouched, tmp_path, capsys):
    cfg = config_with(tmp_path, tiny_folder, untouched, eval={"tasks": ["2da"], "n": 4, "max_new_tokens": 120})
    run_cli(capsys, "train", cfg, expect=["config key 'eval.max_new_tokens' is 120", "the longest evaluation prompt",
                                          "context of 128 (max_position_embeddings)", "set eval.max_new_tokens="])


def test_synthetic_data_too_large_to_generate(tiny_folder, untouched, tmp_path, capsys, monkeypatch):
    _room(monkeypatch, "cpu_room", 2 << 30)
    cfg = config_with(tmp_path, tiny_folder, untouched, data={"tasks": ["5da"], "n_train": 100_000_000})
    start = time.perf_counter()
    line = run_cli(capsys, "train", cfg, expect=["config keys 'data.n_train' and 'eval.n'", "100,000,000 examples",
                                                 "of 5da", "2.00 GiB available (MemAvailable)"])
    assert time.perf_counter() - start < 10  # nothing generated: 10^8 examples take minutes
    most = int(re.search(r"data\.n_train=([\d,]+) per task", line).group(1).replace(",", ""))
    assert 1_000_000 < most < 10_000_000  # a few hundred bytes per example


def test_a_data_file_too_large_to_read(tiny_folder, untouched, tmp_path, capsys, monkeypatch):
    data = write(tmp_path / "data.jsonl", jsonl([{"prompt": "Say hi " * 20, "response": "hi"}] * 2000))
    _room(monkeypatch, "cpu_room", data.stat().st_size)  # the bytes fit, not with their text beside them
    cfg = config_with(tmp_path, tiny_folder, untouched, data={"path": str(data)})
    run_cli(capsys, "train", cfg, expect=["config key 'data.path'", "data.jsonl is", "reading it whole takes at least",
                                          "available (MemAvailable)"])


def test_data_whose_token_ids_cannot_fit(tiny_folder, untouched, tmp_path, capsys, monkeypatch):
    """Generating 4,000 examples takes ~1.6 MB; their token ids and labels, as Python lists, several."""
    _room(monkeypatch, "cpu_room", 3 * MiB)
    cfg = config_with(tmp_path, tiny_folder, untouched, data={"n_train": 4000})
    line = run_cli(capsys, "train", cfg, expect=["not enough memory for the tokenized data: 4,000 examples",
                                                 "(data.n_train)", "bytes per token", "3.00 MiB available"])
    assert int(re.search(r"about ([\d,]+) examples fit", line).group(1).replace(",", "")) < 4000


def test_loralab_eval_refuses_a_batch_that_cannot_fit_before_loading(tiny_folder, capsys, monkeypatch):
    """`loralab eval` runs the training run's evaluation pre-flight, in its own options' words, before any
    weight loads."""
    import loralab.inference as inference

    monkeypatch.setattr(P, "current_rss_bytes", lambda: E.CPU_RUNTIME_BYTES)
    _room(monkeypatch, "device_room", 100 * MiB)
    monkeypatch.setattr(inference, "load_with_adapter", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    line = run_cli(capsys, "eval", "--model", str(tiny_folder), "--tasks", "2da", "--n", "5000",
                   "--batch-size", "5000", expect=["not enough memory for the evaluation", "--batch-size=5000"])
    assert "train.preflight" not in line and 1 <= int(re.search(r"--batch-size=(\d+) fits", line).group(1)) < 5000

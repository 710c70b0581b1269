"""eval/forgetting.py: the forgetting report (loss on fixed tasks not trained on, before and after)
and the held-out loss over many unseen items; checked against train.loss.mean_loss directly."""
from __future__ import annotations

import json

import pytest
import torch

from loralab.config import load_config
from loralab.data.prompts import encode_all
from loralab.eval import forgetting
from loralab.pipeline import run_training
from loralab.prepare import build_datasets, setup_model
from loralab.summary import format_table
from loralab.train.loss import mean_loss


def _cfg(folder, out, *extra):
    return load_config(None, [f"model.name={folder}", "data.tasks=[2da]", "data.n_train=48", "data.template=raw",
                              "eval.n=6", "train.max_steps=4", "train.batch_size=4", "train.progress=false",
                              "train.lr=5e-2", "train.precision=fp32", "eval.before=false", f"output_dir={out}",
                              *extra])


def test_the_forgetting_set_leaves_out_what_the_run_trains_on(tiny_folder, tmp_path):
    sets = forgetting.forgetting_sets(_cfg(tiny_folder, tmp_path))
    assert "2da" not in sets and "2ds" in sets and "sort_words" in sets
    assert all(len(items) == forgetting.FORGETTING_ITEMS for items in sets.values())
    assert forgetting.forgetting_sets(_cfg(tiny_folder, tmp_path, "data.tasks=[2ds]"))["2da"]  # now it counts


def test_held_out_items_are_never_trained_validated_or_tested(tiny_folder, tmp_path):
    cfg = _cfg(tiny_folder, tmp_path, "data.tasks=[2da, 2ds]", "data.n_train=400")
    data = build_datasets(cfg)
    items = forgetting.held_out_items(cfg, data, 1000)
    assert len(items) == 1000  # 500 a task, screened by content
    seen = {forgetting._key(e) for e in data.train + data.val + data.tests["2da"] + data.tests["2ds"]}
    assert not seen & {forgetting._key(e) for e in items}
    assert items == forgetting.held_out_items(cfg, data, 1000)  # the same for every run of a study


def test_a_run_reports_forgetting_and_held_out_loss(tiny_folder, tmp_path):
    cfg = _cfg(tiny_folder, tmp_path / "run", "eval.loss_items=60")
    summary = run_training(cfg, quiet=True)
    f = summary["forgetting"]
    assert set(f["tasks"]) == set(forgetting.FORGETTING_TASKS) - {"2da"}
    before = json.loads((tmp_path / "run" / "forgetting_before.json").read_text())
    # the oracle: mean_loss on the same items, from the base model (LoRA B = 0 starts as the base) and after
    cfg0 = load_config(None, [f"model.name={tiny_folder}", "data.template=raw", "train.precision=fp32"])
    model, tok, *_ = setup_model(cfg0, torch.device("cpu"))
    items = forgetting.forgetting_sets(cfg)["2ds"]
    enc = encode_all(items, tok, template="raw", system_prompt=cfg.data.system_prompt,
                     max_seq_len=cfg.data.max_seq_len)[0]
    base = mean_loss(model, enc, batch_size=cfg.eval.batch_size, pad_id=tok.pad_token_id)
    assert before["2ds"] == pytest.approx(base, rel=1e-4) == f["tasks"]["2ds"]["before"]
    r = f["tasks"]["2ds"]
    assert r["change"] == pytest.approx(r["after"] - r["before"]) and r["after"] != pytest.approx(r["before"], abs=1e-6)
    assert f["mean_change"] == pytest.approx(sum(t["change"] for t in f["tasks"].values()) / len(f["tasks"]))
    assert summary["heldout_items"] == 60 and summary["heldout_loss"] > 0
    table = format_table(summary, cfg)
    row = next(l.split() for l in table.splitlines() if l.split()[:1] == ["2ds"] and "%" not in l)  # forgetting's
    b, a, c = (float(x) for x in row[1:4])
    assert (b, a) == (pytest.approx(r["before"], abs=1e-3), pytest.approx(r["after"], abs=1e-3))
    assert c == pytest.approx(a - b, abs=2e-3)
    assert "change (token loss, tasks not trained on)" in table and "over 60 unseen items" in table
    from loralab.study.results import run_metrics
    m = run_metrics(summary)
    assert m["forgetting"] == pytest.approx(f["mean_change"]) and m["heldout_loss"] == summary["heldout_loss"]


def test_forgetting_can_be_switched_off(tiny_folder, tmp_path):
    summary = run_training(_cfg(tiny_folder, tmp_path / "off", "eval.forgetting=false"), quiet=True)
    assert "forgetting" not in summary and "heldout_loss" not in summary
    assert not (tmp_path / "off" / "forgetting_before.json").exists()


def test_loss_batches_collated_as_validation_give_the_padded_mean(tiny_folder, tmp_path):
    """The evaluations' losses take the loop's layout (train/loop.batch_layout): fewer pad positions."""
    from loralab.data.batching import collate
    from loralab.train.loop import batch_layout

    cfg = _cfg(tiny_folder, tmp_path)
    model, tok, *_ = setup_model(cfg, torch.device("cpu"))
    items = [e for name in ("2ds", "3da", "sort_words") for e in forgetting.forgetting_sets(cfg)[name]]
    enc = encode_all(items, tok, template="auto", system_prompt=cfg.data.system_prompt,
                     max_seq_len=cfg.data.max_seq_len)[0]
    assert len({len(e.input_ids) for e in enc}) > 5  # lengths differ: padded rows would carry padding
    layout = batch_layout(model, cfg.train, tok.pad_token_id)
    mixed = enc[::5][:16]  # of all three tasks
    padded_ids = collate(mixed, tok.pad_token_id)["input_ids"]
    assert layout(mixed)["input_ids"].numel() < padded_ids.numel()  # packed or prefix-shared: fewer positions
    padded = mean_loss(model, enc, batch_size=16, pad_id=tok.pad_token_id)
    assert mean_loss(model, enc, batch_size=16, pad_id=tok.pad_token_id, layout=layout) == pytest.approx(padded,
                                                                                                         rel=1e-5)

"""Studies: cell expansion, presets, resume, failures, reports; and the early-stopping guard."""
import csv
import itertools
import json
import math
from pathlib import Path

import pytest
import yaml

from loralab.cli import main
from loralab.errors import UserError
from loralab.study import runner, spec

PRESETS = ["consistency", "qlora", "optimizer", "epochs", "targets", "rank", "memory-7b", "data-size", "full",
           "variants", "layer-rank", "combine", "optimizers", "domain", "preference"]


# --- cells and presets -------------------------------------------------------------------------

def test_grid_axes_expand_to_every_combination():
    cells = spec.expand_cells({"train.optimizer": ["adamw", "sgd"], "lora.r": [4, 8]}, [1, 2])
    assert [c.name for c in cells] == ["optimizer-adamw_r-4", "optimizer-adamw_r-8",
                                       "optimizer-sgd_r-4", "optimizer-sgd_r-8"]
    assert cells[3].overrides == ["train.optimizer=sgd", "lora.r=8"] and cells[3].seeds == [1, 2]
    assert spec.expand_cells(None, [1])[0].name == "default"


def test_named_cells_and_their_seeds():
    axes = [{"name": "mem", "set": ["lora.r=8"], "seeds": 1}, ["lora.r=4", "lora.alpha=8"]]
    cells = spec.expand_cells(axes, [5, 6, 7])
    assert (cells[0].name, cells[0].overrides, cells[0].seeds) == ("mem", ["lora.r=8"], [5])
    assert cells[1].name == "lora.r-4_lora.alpha-8" and cells[1].seeds == [5, 6, 7]


@pytest.mark.parametrize("axes", [{"lora.r": []}, [{"name": "x", "set": ["lora.r=1"], "color": 1}], "lora.r",
                                  [["lora.r=4"], ["lora.r=4"]], [["no equals sign"]]])
def test_bad_axes_are_one_line_user_errors(axes):
    with pytest.raises(UserError) as e:
        spec.expand_cells(axes, [1])
    assert "\n" not in str(e.value)


def test_all_presets_load_and_expand():
    assert sorted(spec.list_presets()) == sorted(PRESETS)
    for name in PRESETS:
        for scale, extra in (("cpu", []), ("gpu", ["model.name=/models/llama-2-7b"])):
            study = spec.load_study(name, scale=scale, overrides=extra)
            text = spec.describe(study)
            assert text.startswith(f"study {name}")
            known = {c.name for c in study.cells} | {r["name"] for r in study.rows}
            assert study.findings, name
            for f in study.findings:  # every claim names cells that exist
                named = [f[k] for k in ("a", "b", "cell") if k in f] + list(f.get("cells", []))
                assert named and set(named) <= known, (name, f)
            if study.kind == "train":
                for cell in study.cells:
                    assert cell.name in text and all(o in text for o in cell.overrides)


def test_gpu_scale_uses_the_articles_settings():
    study = spec.load_study("qlora", scale="gpu", overrides=["model.name=/models/llama-2-7b"])
    cfg = spec.run_config(study, study.cells[1], 1, Path("/tmp/x"))
    got = (cfg.train.lr, cfg.train.batch_size, cfg.train.grad_accum, cfg.lora.r, cfg.lora_alpha, cfg.lora.targets)
    assert got == (3e-4, 1, 128, 8, 16, "qv")
    assert cfg.model.name == "/models/llama-2-7b" and cfg.model.quant == "nf4"  # the cell's own axis value
    assert cfg.train.weight_decay == 0.01 and cfg.train.warmup_steps == 100
    assert cfg.data.tasks == ["suite"] and cfg.data.n_train * 17 >= 50_000  # Alpaca-sized
    with pytest.raises(UserError, match="model.name"):
        spec.load_study("targets", scale="gpu")


def test_cpu_budgets_fit_twenty_minutes():
    # ~0.92 s per step of 16 examples (measured), ~20 s per run for start-up and evaluation.
    for name in PRESETS:
        study = spec.load_study(name)
        total = 0.0
        for cell in study.cells:
            if cell.combine:  # no training: combine, load, evaluate (~25 s)
                total += len(cell.seeds) * 25
                continue
            cfg = spec.run_config(study, cell, 1, Path("/tmp/x"))
            steps = cfg.train.max_steps or math.ceil(cfg.data.n_train * len(cfg.data.tasks) * 0.9 / cfg.train.batch_size
                                                     * cfg.train.epochs)
            slow = 1.8 if cfg.train.method == "full" else (1.3 if cfg.lora.use_dora else 1.0)
            total += len(cell.seeds) * (20 + 0.92 * slow * steps * cfg.train.batch_size / 16)
        assert total < 20 * 60, (name, total)


def test_presets_cells_are_the_variants_they_claim():
    layer = spec.load_study("layer-rank")
    cfgs = {c.name: spec.run_config(layer, c, 1, Path("/tmp/x")) for c in layer.cells}
    assert cfgs["late-heavy"].lora.rank_pattern == {r"layers\.([0-9]|1[0-4])\..*": 8}
    # every cell spends (about) the uniform cell's parameters: r x (in + out) summed, SmolLM2-135M
    from loralab.memory.arch import resolve_model_config
    from loralab.memory.estimate import estimate_for_run

    model = resolve_model_config("smollm2-135m")
    count = {n: estimate_for_run(c, model, "cpu")["params"]["trainable"] for n, c in cfgs.items()}
    assert count["late-heavy"] == count["early-heavy"] == count["uniform"]
    assert all(abs(v / count["uniform"] - 1) < 0.01 for v in count.values())
    combine = spec.load_study("combine")
    cells = {c.name: c for c in combine.cells}
    assert cells["ties"].combine == {"adapters": ["add", "sub"], "weights": [1.0, 1.0], "method": "ties",
                                     "density": 0.5, "svd_rank": None}
    assert cells["add"].combine is None


@pytest.mark.parametrize("item, needle", [
    ({"name": "c", "combine": {"adapters": ["nope"]}}, "not a training cell"),
    ({"name": "c", "combine": {"adapters": ["a"], "method": "ties"}}, "density"),
    ({"name": "c", "combine": {"adapters": ["a"], "method": "mean"}}, "method must be one of"),
    ({"name": "c", "combine": {"adapters": ["a"], "weights": [1, 2]}}, "one number per adapter"),
    ({"name": "c", "combine": {"adapters": ["a"], "how": 1}}, "must be a mapping with keys")])
def test_bad_combine_cells_are_one_line_errors(item, needle):
    with pytest.raises(UserError, match=needle):
        spec.expand_cells([{"name": "a", "set": []}, item], [1])


def test_combine_cells_run_after_the_cells_they_combine(tmp_path):
    calls = []
    study = spec.load_study("combine", seeds=1)
    fake = fake_runner(calls)

    def run(cmd, run_dir, log_path):
        if "loralab.study.combine_cell" in cmd:
            plan = json.loads(Path(cmd[-1]).read_text())
            assert all(Path(f).parent.joinpath("summary.json").exists() for f, _ in plan["adapters"])
            assert plan["adapters"][0][0] == str(tmp_path / "cells/add/seed-1/adapter") and plan["seed"] == 1
            calls.append((run_dir.parent.name, "combine"))
            (run_dir / "summary.json").write_text(json.dumps({"eval": {"2da": {"after": 0.5}}}))
            return 0
        return fake(cmd, run_dir, log_path)

    runner.run_study(study, tmp_path, parallel=3, runner=run, log=lambda m: None)
    kinds = [c[1] for c in calls]
    assert kinds.index("combine") == 3 and kinds.count("combine") == 7  # the 3 training cells first


def test_a_combine_cell_combines_and_evaluates_for_real(tiny_folder, tmp_path):
    """The smallest real combine study: two 2-step adapters, one cat cell, through the real runner."""
    study_file = tmp_path / "mini.yaml"
    study_file.write_text(yaml.safe_dump({
        "name": "mini", "seeds": 1, "base": {"model": {"name": str(tiny_folder)}, "data": {"template": "raw"}},
        "overrides": ["train.max_steps=2", "train.batch_size=4", "data.n_train=16", "eval.n=4", "eval.before=false",
                      "eval.tasks=[2da, 2ds]", "train.progress=false", "train.precision=fp32"],
        "axes": [{"name": "add", "set": ["data.tasks=[2da]"]}, {"name": "sub", "set": ["data.tasks=[2ds]"]},
                 {"name": "cat", "combine": {"adapters": ["add", "sub"], "method": "cat"}}],
        "findings": [{"claim": "c", "check": "higher", "a": "cat", "b": "add", "metric": "acc_mean",
                      "if_unclear": "more seeds"}]}))
    result = runner.study_command(str(study_file), out=str(tmp_path / "out"), log=lambda m: None)
    assert [r["status"] for r in result["runs"]] == ["ok"] * 3, result["runs"]
    summary = json.loads((tmp_path / "out/cells/cat/seed-1/summary.json").read_text())
    assert set(summary["eval"]) == {"2da", "2ds"} and summary["method"] == "cat"
    adapter = json.loads((tmp_path / "out/cells/cat/seed-1/adapter/adapter_config.json").read_text())
    sources = [json.loads((tmp_path / f"out/cells/{c}/seed-1/adapter/adapter_config.json").read_text())
               for c in ("add", "sub")]
    assert adapter["r"] == sum(s["r"] for s in sources)  # cat: the ranks add up
    assert "acc_mean" in result["stats"]["cat"]


def test_user_override_may_not_fight_an_axis():
    with pytest.raises(UserError, match="varies across cells"):
        spec.load_study("rank", overrides=["lora.r=4"])
    with pytest.raises(UserError, match="did you mean r"):
        spec.load_study("qlora", overrides=["lora.rr=4"])
    with pytest.raises(UserError, match="did you mean qlora"):
        spec.load_study("qlra")


def test_cli_dry_run_prints_cells_sweeps_and_rules(capsys):
    assert main(["study", "optimizer", "--dry-run", "--seeds", "2", "lora.dropout=0.1"]) == 0
    out = capsys.readouterr().out
    assert "sgd-constant" in out and "lora.dropout=0.1" in out and "seeds 1,2 " in out
    assert "train.lr=0.05 | train.lr=0.2 | train.lr=0.8" in out and "7 cells, 16 runs" in out  # 3 x (3 + 1) + 4
    assert ("F3. agree if the 95% interval (a paired t interval over the per-seed differences of the seeds both "
            "sides ran) of heldout_loss(sgd-cosine)") in out  # the dry run names the test
    assert "F5. agree if the 95% interval (one seed on a side: no interval; the means alone decide)" in out
    assert main(["study", "optimizer", "--dry-run", "train.lr=1e-3"]) == 2  # the sweep varies it
    assert "train.lr, which this study varies" in capsys.readouterr().err
    assert main(["study", "qlora", "--scale", "gpu", "--dry-run"]) == 2


# --- running, resuming, reporting --------------------------------------------------------------

def fake_runner(calls, fail=()):
    """Stands in for `python -m loralab.cli train cell.yaml`: writes what run_training would."""
    def run(cmd, run_dir, log_path):
        cfg = yaml.safe_load(Path(cmd[-1]).read_text())
        cell, seed = run_dir.parent.name, cfg["train"]["seed"]
        calls.append((cell, seed))
        if cell in fail:
            log_path.write_text("loading...\nloralab: error: no NF4 here\n")
            return 2
        base = {"lora": 1.0, "qlora": 2.0}.get(cell, 3.0)
        lr = cfg["train"]["lr"]
        base += abs(lr - 2e-3) * 100  # a swept cell does best at lr 2e-3
        summary = {"final_val_loss": base + seed / 10, "heldout_loss": base + seed / 10, "best_val_loss": base,
                   "final_train_loss": base / 2,
                   "runtime_s": 10.0 * seed, "peak_memory_bytes": (100 + seed) * 2**20, "trainable_params": 1000,
                   "tokens_per_s": 50.0, "stopped_early": False, "warnings": [], "best_step": 5,
                   "eval": {"2da": {"before": 0.0, "after": 0.1 * seed, "n": 10, "trained": True,
                                    "test_loss": base + seed / 10}},
                   "val_history": [{"step": s, "val_loss": base + abs(s - 5) / 10} for s in (2, 4, 6, 8, 10)]}
        lines = [{"step": s, "loss": 3.0 - s / 10, "lr": 1e-3} for s in range(1, 11)] + [{"step": 10, "val_loss": base}]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
        (run_dir / "summary.json").write_text(json.dumps(summary))
        return 0
    return run


def _study(seeds=3):
    return spec.load_study("qlora", seeds=seeds)


def test_resume_runs_only_what_is_missing(tmp_path):
    calls = []
    records = runner.run_study(_study(), tmp_path, runner=fake_runner(calls), log=lambda m: None)
    assert sorted(calls) == sorted(itertools.product(["lora", "qlora"], [1, 2, 3]))
    assert all(r["status"] == "ok" for r in records)
    assert (tmp_path / "cells/lora/seed-2/cell.yaml").is_file()
    (tmp_path / "cells/qlora/seed-2/summary.json").unlink()
    calls.clear()
    records = runner.run_study(_study(), tmp_path, runner=fake_runner(calls), log=lambda m: None)
    assert calls == [("qlora", 2)]
    assert sorted(r["status"] for r in records) == ["ok"] + ["skipped"] * 5


def test_cell_configs_are_real_run_configs(tmp_path):
    calls, logs = [], []
    runner.run_study(_study(1), tmp_path, parallel=2, runner=fake_runner(calls), log=logs.append)
    cfg = yaml.safe_load((tmp_path / "cells/qlora/seed-1/cell.yaml").read_text())
    assert cfg["model"]["quant"] == "nf4" and cfg["output_dir"] == str(tmp_path / "cells/qlora/seed-1")
    assert cfg["train"]["progress"] is False and cfg["train"]["threads"] >= 1  # parallel: threads split
    assert any("start qlora seed 1" in m for m in logs) and any("ETA" in m for m in logs)


def test_failed_runs_are_reported_not_fatal(tmp_path):
    calls, logs = [], []
    result = runner.study_command("qlora", out=str(tmp_path), seeds=2, runner=fake_runner(calls, fail={"qlora"}),
                             log=logs.append)
    assert len(calls) == 4  # the study went on after the failures
    status = {(r["cell"], r["seed"]): r["status"] for r in result["runs"]}
    assert status[("qlora", 1)] == "failed" and status[("lora", 2)] == "ok"
    info = json.loads((tmp_path / "cells/qlora/seed-1/run_info.json").read_text())
    assert info["error"] == "exit 2: loralab: error: no NF4 here"
    md = (tmp_path / "report.md").read_text()
    assert "exit 2: loralab: error: no NF4 here" in md and "not measured" in md
    assert any("2 of 4 runs failed" in m for m in logs)


def test_report_files_and_numbers(tmp_path):
    runner.study_command("qlora", out=str(tmp_path), seeds=3, runner=fake_runner([]), log=lambda m: None)
    for name in ("results.csv", "report.md", "report.html", "study.json", "runs.json",
                 "plots/loss_curves.png", "plots/eval_scores.png", "plots/memory_vs_time.png"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "plots/loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = {(r["cell"], r["metric"]): r for r in csv.DictReader((tmp_path / "results.csv").open())}
    val = rows[("lora", "final_val_loss")]  # 1.1, 1.2, 1.3
    assert int(val["n"]) == 3 and float(val["mean"]) == pytest.approx(1.2) and float(val["std"]) == pytest.approx(0.1)
    hw = 4.302652730 * 0.1 / math.sqrt(3)
    assert float(val["ci95_low"]) == pytest.approx(1.2 - hw) and float(val["ci95_high"]) == pytest.approx(1.2 + hw)
    assert float(rows[("qlora", "peak_memory_mb")]["mean"]) == pytest.approx(102.0)
    assert float(rows[("lora", "acc_2da")]["mean"]) == pytest.approx(20.0)  # percent
    md = (tmp_path / "report.md").read_text()
    findings = md[md.index("## Findings"):]
    assert ("| # | the article's claim | our measurement (mean ± std; difference [95% interval]) | verdict | "
            "what would decide it | scale |") in findings
    table = [l.strip("| ").split(" | ") for l in findings.splitlines() if l.startswith("| F")]
    # the fake gives both cells the same memory and time (unclear) and qlora a test loss 1.0 higher
    assert [r[3] for r in table] == ["unclear", "unclear", "disagree"]
    # the cells ran the same seeds: paired; the fake's test loss differs by exactly 1.0 on every seed
    assert table[2][2] == "qlora 2.2 ± 0.1 vs lora 1.2 ± 0.1, 1.83x; difference 1 [1, 1] (paired, n=3)"
    assert "detectable effect" in table[0][2] and "detectable effect" not in table[2][2]  # beside unclear ones
    assert table[0][4].startswith("more seeds") and table[2][4] == ""  # what decides it: for unclear ones only
    assert "SmolLM2-135M" in findings and all(r[5] for r in table)  # every row has its scale note
    rules = md[md.index("## Verdict rules"):md.index("## Results")]  # stated before the results
    assert "agree if the 95% interval (a paired t interval over the per-seed differences of the seeds both sides " \
           "ran) of heldout_loss(qlora) - heldout_loss(lora) lies within " \
           "±5% of mean heldout_loss(lora)" in rules
    assert json.loads((tmp_path / "study.json").read_text())["findings"][2]["rule"].startswith("agree if")
    html = (tmp_path / "report.html").read_text()
    assert '<img src="plots/loss_curves.png"' in html and "<table>" in html and "Findings" in html
    again = runner.build_report(tmp_path)  # rebuilding from the folder alone gives the same numbers
    assert again["stats"]["lora"]["final_val_loss"].mean == pytest.approx(1.2)


def test_estimate_study_reports_without_training(tmp_path):
    result = runner.study_command("memory-7b", out=str(tmp_path), log=lambda m: None)
    plan = json.loads((tmp_path / "study.json").read_text())
    assert len(plan["estimates"]) == 6 and result["runs"] == []
    md = (tmp_path / "report.md").read_text()
    assert "21.33" in md and "## Findings" in md
    if plan["estimator_error"] is None:  # the estimator is present: its numbers are in the table
        assert all(isinstance(r["peak_gb"], float) for r in plan["estimates"])
        assert plan["estimates"][1]["peak_gb"] < plan["estimates"][0]["peak_gb"]  # QLoRA below LoRA


def test_a_run_with_several_gpus_trains_data_parallel(tmp_path):
    cmds = []

    def record(cmd, run_dir, log_path):  # the command only; the runs "fail" (no summary.json)
        cmds.append(cmd)
        return 1

    runner.run_study(_study(1), tmp_path / "two", runner=record, nproc=2, log=lambda m: None)
    runner.run_study(_study(1), tmp_path / "one", runner=record, log=lambda m: None)
    half = len(cmds) // 2
    assert half and all(c[-2:] == ["--nproc", "2"] and c[-3].endswith("cell.yaml") for c in cmds[:half])
    assert all(c[-1].endswith("cell.yaml") for c in cmds[half:])


def test_every_study_run_is_tracked_tagged_with_study_cell_and_seed(tiny_folder, tmp_path):
    from mlflow.tracking import MlflowClient

    study_file = tmp_path / "tiny.yaml"
    study_file.write_text(yaml.safe_dump({
        "name": "tiny", "seeds": 2, "axes": [{"name": "r2", "set": ["lora.r=2"]}],
        "base": {"model": {"name": str(tiny_folder)}, "data": {"tasks": ["2da"], "n_train": 16},
                 "train": {"max_steps": 1, "batch_size": 4, "report_to": ["jsonl", "mlflow", "tensorboard"]},
                 "eval": {"n": 2, "before": False}}}))

    def in_process(cmd, run_dir, log_path):  # `loralab train cell.yaml`, without a new interpreter
        return main(["train", cmd[-1]])

    study = spec.load_study(str(study_file))
    records = runner.run_study(study, tmp_path / "out", runner=in_process, log=lambda m: None)
    assert [r["status"] for r in records] == ["ok", "ok"]
    cell = yaml.safe_load((tmp_path / "out/cells/r2/seed-2/cell.yaml").read_text())
    assert cell["train"]["tags"] == {"study": "tiny", "cell": "r2", "seed": 2}
    client = MlflowClient((tmp_path / "out" / "mlruns").as_uri())  # one store for the whole study
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted((r.data.tags["cell"], r.data.tags["seed"], r.data.tags["study"], r.info.run_name) for r in runs) == [
        ("r2", "1", "tiny", "r2/seed-1"), ("r2", "2", "tiny", "r2/seed-2")]
    assert all(r.data.params["lora.r"] == "2" and r.info.status == "FINISHED" for r in runs)
    assert all(list((tmp_path / f"out/cells/r2/seed-{s}/tensorboard").glob("events.out.tfevents.*")) for s in (1, 2))


def test_run_metrics_overfitting_and_seen_unseen_aggregates():
    from loralab.study.results import run_metrics

    summary = {"final_val_loss": 1.5, "best_val_loss": 1.2, "best_step": 40, "steps": 100,
               "eval": {"add": {"after": 0.5, "trained": True, "test_loss": 1.0},
                        "reverse_word": {"after": 0.25, "trained": True, "test_loss": 2.0},
                        "divide": {"after": 0.0, "trained": False, "test_loss": 4.0}}}
    m = run_metrics(summary)
    assert m["val_loss_rise"] == pytest.approx(0.3) and m["best_val_step"] == 40
    assert m["acc_mean"] == pytest.approx(25.0) and m["acc_seen_tasks"] == pytest.approx(37.5)
    assert m["acc_unseen_tasks"] == 0.0 and m["acc_divide"] == 0.0
    assert m["test_loss"] == pytest.approx(7 / 3)
    assert m["test_loss_seen_tasks"] == 1.5 and m["test_loss_unseen_tasks"] == 4
    only_trained = run_metrics({"eval": {"2da": {"after": 0.5, "test_loss": 1.0}}})  # older summaries: trained
    assert only_trained["test_loss_seen_tasks"] == 1.0 and "test_loss_unseen_tasks" not in only_trained

"""train.report_to: the same run read back with each tool's own reader (tensorboard's event
accumulator, MLflow's client on the local file store), by the names users know."""
import json

import pytest

from loralab.config import load_config
from loralab.pipeline import run_training


def _run(folder, out, *extra):
    cfg = load_config(None, [f"model.name={folder}", "data.tasks=[2da]", "data.n_train=40", "eval.n=4",
                             "train.max_steps=4", "train.batch_size=4", "train.eval_every=2", "train.progress=false",
                             "train.precision=fp32", "train.lr=1e-2", f"output_dir={out}",
                             "train.report_to=[jsonl, tensorboard, mlflow]", *extra])
    return run_training(cfg, quiet=True)


@pytest.fixture(scope="module")
def tracked(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("tracked") / "run-a"
    summary = _run(tiny_folder, out, "train.tags={team: lab}")
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return out, summary, [l for l in lines if "loss" in l], [l for l in lines if "val_loss" in l]


def test_tensorboard_event_files_hold_the_run(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, summary, steps, vals = tracked
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    scalars = lambda tag: [(e.step, e.value) for e in events.Scalars(tag)]
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "eval/loss", "eval/2da/accuracy",
            "train/peak_memory_gb"} <= tags
    assert scalars("train/loss") == [(s["step"], pytest.approx(s["loss"], rel=1e-6)) for s in steps]
    assert scalars("train/lr") == [(s["step"], pytest.approx(s["lr"], rel=1e-6)) for s in steps]
    assert scalars("train/tokens_per_s")[-1][1] == pytest.approx(steps[-1]["tokens"] / steps[-1]["elapsed_s"],
                                                                 rel=1e-5)
    assert scalars("eval/loss") == [(v["step"], pytest.approx(v["val_loss"], rel=1e-6)) for v in vals]
    accuracy = scalars("eval/2da/accuracy")  # before (step 0), each validation, after (last step)
    assert accuracy[0] == (0, summary["eval"]["2da"]["before"]) and accuracy[-1][1] == summary["eval"]["2da"]["after"]
    assert scalars("train/peak_memory_gb") == [(4, pytest.approx(summary["peak_memory_bytes"] / 1e9, rel=1e-6))]
    from tensorboard.plugins.hparams import plugin_data_pb2

    hparams = {}
    for content in events.PluginTagToContent("hparams").values():
        data = plugin_data_pb2.HParamsPluginData.FromString(content)
        if data.HasField("session_start_info"):
            hparams = {k: v.ListFields()[0][1] for k, v in data.session_start_info.hparams.items()}
    assert hparams["lora.r"] == 8 and hparams["train.lr"] == pytest.approx(1e-2) and hparams["data.tasks"] == '["2da"]'
    text = events.Tensors("summary/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert f'"final_train_loss": {summary["final_train_loss"]}' in text


def test_the_mlflow_run_holds_params_metrics_tags_and_the_summary(tracked):
    from mlflow.tracking import MlflowClient

    out, summary, steps, vals = tracked
    kept = json.loads((out / "mlflow_run.json").read_text())
    assert kept["tracking_uri"] == (out / "mlruns").resolve().as_uri()
    client = MlflowClient(tracking_uri=kept["tracking_uri"])
    run = client.get_run(kept["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "run-a"
    assert client.get_experiment(run.info.experiment_id).name == "loralab"
    assert run.data.params["lora.r"] == "8" and run.data.params["train.optimizer"] == "adamw"
    assert run.data.params["output_dir"] == str(out)
    assert run.data.tags["team"] == "lab"
    history = lambda key: [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, key),
                                                             key=lambda m: (m.step, m.timestamp))]
    assert history("train/loss") == [(s["step"], pytest.approx(s["loss"])) for s in steps]
    assert history("train/grad_norm") == [(s["step"], pytest.approx(s["grad_norm"])) for s in steps]
    assert history("eval/loss") == [(v["step"], pytest.approx(v["val_loss"])) for v in vals]
    assert history("eval/2da/accuracy")[0] == (0, summary["eval"]["2da"]["before"])
    assert run.data.metrics["train/peak_memory_gb"] == pytest.approx(summary["peak_memory_bytes"] / 1e9)
    assert run.data.metrics["train/runtime_s"] == pytest.approx(summary["runtime_s"])
    local = client.download_artifacts(run.info.run_id, "summary.json", str(out / "downloaded"))
    assert json.loads(open(local).read()) == json.loads((out / "summary.json").read_text())


def test_jsonl_alone_is_the_default_and_writes_nothing_else(tiny_folder, tmp_path):
    cfg = load_config(None, [])
    assert cfg.train.report_to == ["jsonl"]
    out = tmp_path / "plain"
    _run(tiny_folder, out, "train.report_to=[jsonl]", "train.eval_every=0")
    assert (out / "metrics.jsonl").is_file()
    assert not (out / "tensorboard").exists() and not (out / "mlruns").exists()


def test_a_failed_run_marks_its_mlflow_run_failed(tiny_folder, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    import loralab.run as pipeline
    from loralab.errors import UserError

    def broken(*a, **k):
        raise UserError("disk on fire")

    monkeypatch.setattr(pipeline, "save_adapter", broken)
    out = tmp_path / "failing"
    with pytest.raises(UserError, match="disk on fire"):
        _run(tiny_folder, out, "train.report_to=[mlflow]", "train.eval_every=0")
    kept = json.loads((out / "mlflow_run.json").read_text())
    assert MlflowClient(kept["tracking_uri"]).get_run(kept["run_id"]).info.status == "FAILED"


def test_a_bad_sink_name_is_one_line():
    from loralab.errors import UserError

    with pytest.raises(UserError, match=r"'train.report_to' has unknown 'wandb' \(choose from jsonl, tensorboard, "
                                        r"mlflow\)"):
        load_config(None, ["train.report_to=[jsonl, wandb]"])


def test_a_resumed_run_continues_its_mlflow_run_and_tensorboard_steps(tiny_folder, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import loralab.run as pipeline
    from loralab.errors import UserError

    out = tmp_path / "resumed"
    extra = ("train.save_every=1", "train.eval_every=0")
    logged = []
    real_log = pipeline.Hooks

    def stop_after_two(*a, **k):  # the loop asks should_stop after each step: say yes after step 2
        hooks = real_log(*a, **k)
        on_log = hooks.on_log
        hooks.on_log = lambda record: (logged.append(record["step"]), on_log(record))
        hooks.should_stop = lambda: len(logged) >= 2
        return hooks

    monkeypatch.setattr(pipeline, "Hooks", stop_after_two)
    with pytest.raises(UserError, match="interrupted at step 2"):
        _run(tiny_folder, out, *extra)
    kept = json.loads((out / "mlflow_run.json").read_text())
    client = MlflowClient(kept["tracking_uri"])
    assert client.get_run(kept["run_id"]).info.status == "KILLED"
    monkeypatch.setattr(pipeline, "Hooks", real_log)
    _run(tiny_folder, out, *extra)
    assert json.loads((out / "mlflow_run.json").read_text())["run_id"] == kept["run_id"]  # the same run
    run = client.get_run(kept["run_id"])
    assert run.info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
    assert steps == [1, 2, 3, 4]
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines if "loss" in l] == [1, 2, 3, 4]

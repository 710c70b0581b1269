"""Studies on a Ray cluster: the same results.csv as a local run, resume, and failures as failed runs.

The end-to-end test starts a local Ray (2 CPUs, no dashboard, a small object store) inside itself and
runs a tiny study (two cells, one seed, three steps each on conftest's tiny model) once locally and once
as Ray tasks. Runtime, throughput and memory differ between any two runs, so only the deterministic
metrics are compared.
"""
import csv
import json
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from loralab.cli import main
from loralab.errors import UserError
from loralab.study import runner, spec

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'loralab[ray]')")
from loralab.study.ray_runner import RayRunner  # noqa: E402  (needs ray)

# Timings, throughput and memory change from run to run; everything else a run reports must not.
VARYING = {"runtime_s", "tokens_per_s", "peak_memory_mb", "wall_s", "step_s"}


def _tiny_study(folder: Path, model: Path) -> Path:
    base = {"model": {"name": str(model)}, "lora": {"r": 4},
            "data": {"tasks": ["2da"], "n_train": 16, "template": "raw"},
            "train": {"max_steps": 3, "batch_size": 4, "progress": False, "precision": "fp32", "lr": 1e-2},
            "eval": {"n": 4, "before": False, "tasks": ["2da"]}}
    # One thread per run, as a study override (which the runner never replaces): a local run and a Ray
    # task then add up their floats in the same order on any machine.
    study = {"name": "tiny-ray", "description": "two ranks on the tiny model", "seeds": 1, "base": base,
             "overrides": ["train.threads=1"], "axes": {"lora.r": [2, 4]}}
    path = folder / "tiny-ray.yaml"
    path.write_text(json.dumps(study))  # JSON is YAML
    return path


def _deterministic_rows(study_dir: Path) -> dict:
    rows = {(r["cell"], r["metric"]): r for r in csv.DictReader((study_dir / "results.csv").open())}
    return {k: v for k, v in rows.items() if k[1] not in VARYING}


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 2**20, log_to_driver=False)
    yield
    ray.shutdown()


def test_a_study_on_ray_gives_the_local_results(tmp_path, tiny_folder, local_ray):
    study_yaml = _tiny_study(tmp_path, tiny_folder)
    log = []
    runner.study_command(str(study_yaml), out=str(tmp_path / "local"), parallel=2, log=log.append)
    # `auto` finds the Ray this test started (the same process), so the study leaves it running
    assert main(["study", str(study_yaml), "--ray", "auto", "--out", str(tmp_path / "ray")]) == 0
    assert ray.is_initialized()
    local, on_ray = _deterministic_rows(tmp_path / "local"), _deterministic_rows(tmp_path / "ray")
    assert {m for _, m in local} >= {"final_train_loss", "final_val_loss", "trainable_params", "acc_2da", "steps"}
    assert on_ray == local  # every deterministic number, to the last digit written
    assert float(local[("r-4", "trainable_params")]["mean"]) == 2 * float(local[("r-2", "trainable_params")]["mean"])
    for cell in ("r-2", "r-4"):  # the same folder layout as a local run
        run = tmp_path / "ray" / "cells" / cell / "seed-1"
        cfg = yaml.safe_load((run / "cell.yaml").read_text())
        assert (run / "summary.json").is_file() and cfg["output_dir"] == str(run) and cfg["train"]["threads"] == 1
        assert json.loads((run / "run_info.json").read_text())["status"] == "ok"
    # rerunning resumes: every run is done, so no task is submitted
    records = runner.study_command(str(study_yaml), out=str(tmp_path / "ray"), ray="auto", log=log.append)["runs"]
    assert [r["status"] for r in records] == ["ok", "ok"]
    assert any("2 runs already done, skipped; 0 to run" in m for m in log)


def test_ray_tasks_report_exit_codes_and_unshared_folders(tmp_path, local_ray):
    run = RayRunner()
    assert run.slots() == 2  # two CPUs, one per run
    code = run([sys.executable, "-c", "import sys; print('loralab: error: boom'); sys.exit(3)"], tmp_path,
               tmp_path / "train.log")
    assert code == 3 and "loralab: error: boom" in (tmp_path / "train.log").read_text()
    missing = tmp_path / "not-shared"
    code = run([sys.executable, "-c", "0"], missing, missing / "train.log")
    assert isinstance(code, str) and "not visible on node" in code and str(missing) in code
    assert RayRunner(cpus=1, gpus=0.5).slots() == 1  # no GPU in this cluster: nothing could run, 1 is the floor


def _wait_for(condition, seconds=30.0):
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.1)
    return condition()


def test_stop_gives_a_run_in_flight_sigterm(tmp_path, local_ray):
    marker, log = tmp_path / "checkpointed", tmp_path / "train.log"
    script = ("import signal, sys, time\n"  # stands in for loralab train: SIGTERM -> checkpoint, exit
              f"signal.signal(signal.SIGTERM, lambda *a: (open({str(marker)!r}, 'w').write('yes'), sys.exit(0)))\n"
              "print('ready', flush=True)\n"
              "time.sleep(120)\n")
    run, result = RayRunner(stop_grace_s=20), []
    thread = threading.Thread(target=lambda: result.append(run([sys.executable, "-c", script], tmp_path, log)))
    thread.start()
    assert _wait_for(lambda: log.is_file() and "ready" in log.read_text())
    run.stop()
    thread.join(timeout=90)  # the task polls for the stop request every 0.2 s; a loaded machine is slow
    assert not thread.is_alive() and result == ["stopped: the study was interrupted"]
    assert _wait_for(marker.is_file, 30) and marker.read_text() == "yes"
    assert run([sys.executable, "-c", "0"], tmp_path, tmp_path / "x.log") == "stopped: the study was interrupted"
    assert not (tmp_path / "x.log").exists()  # nothing more is submitted


def test_the_task_ends_its_run_when_the_driver_asks_through_the_run_folder(tmp_path):
    # Ray's own cancel (a KeyboardInterrupt in the worker) can be lost while a task sleeps; the stop
    # request in the shared run folder is what the task watches. Tested here without Ray.
    from loralab.study.ray_runner import STOP_FILE, STOPPED, task_function

    marker, log = tmp_path / "checkpointed", tmp_path / "train.log"
    script = ("import signal, sys, time\n"
              f"signal.signal(signal.SIGTERM, lambda *a: (open({str(marker)!r}, 'w').write('yes'), sys.exit(0)))\n"
              "print('ready', flush=True)\n"
              "time.sleep(120)\n")
    result = []
    run = task_function()
    thread = threading.Thread(target=lambda: result.append(run(["python", "-c", script], str(tmp_path), str(log), 20)))
    thread.start()
    assert _wait_for(lambda: log.is_file() and "ready" in log.read_text())
    (tmp_path / STOP_FILE).touch()
    thread.join(timeout=60)
    assert not thread.is_alive() and result == [STOPPED] and marker.read_text() == "yes"
    assert run(["python", "-c", "0"], str(tmp_path), str(log), 20) == STOPPED  # a request before it starts


def test_ctrl_c_cancels_the_runs_not_started_and_stops_the_runner(tmp_path):
    calls, stopped = [], threading.Event()

    class Interrupted:
        def __call__(self, cmd, run_dir, log_path):
            calls.append(run_dir)
            if len(calls) == 1:
                raise KeyboardInterrupt
            stopped.wait(5)
            return "stopped: the study was interrupted"

        def stop(self):
            stopped.set()

    with pytest.raises(KeyboardInterrupt):
        runner.run_study(spec.load_study("qlora", seeds=3), tmp_path, runner=Interrupted(), log=lambda m: None)
    assert stopped.is_set() and len(calls) <= 2  # of 6 runs: the interrupted one, at most one already started


def test_a_lost_worker_is_a_failed_run_not_a_crash(tmp_path, monkeypatch):
    calls = []

    class FakeTask:
        def remote(self, cmd, run_dir, log_path, grace_s):
            calls.append(run_dir)
            return "ref"

    def lost(_ref):
        raise ray.exceptions.WorkerCrashedError()

    ray_runner = RayRunner()
    ray_runner._task = FakeTask()  # no cluster: the task handle is faked, and the task is done at once
    monkeypatch.setattr(ray, "wait", lambda refs, timeout: (refs, []))
    monkeypatch.setattr(ray, "get", lost)
    error = ray_runner(["python", "-m", "loralab.cli", "train", "cell.yaml"], tmp_path, tmp_path / "log")
    assert error.startswith("Ray: WorkerCrashedError:") and "\n" not in error and calls == [str(tmp_path)]

    # in a study: the run is recorded as failed with that error, and the others still run
    def flaky(cmd, run_dir, log_path):
        if run_dir.parent.name == "qlora":
            return error
        (run_dir / "summary.json").write_text("{}")
        return 0

    records = runner.run_study(spec.load_study("qlora", seeds=1), tmp_path / "study", runner=flaky, log=calls.append)
    status = {r["cell"]: (r["status"], r["error"]) for r in records}
    assert status == {"lora": ("ok", None), "qlora": ("failed", error)}
    info = json.loads((tmp_path / "study/cells/qlora/seed-1/run_info.json").read_text())
    assert info["status"] == "failed" and info["error"] == error


def test_a_runner_that_raises_fails_its_run_only(tmp_path):
    def broken(cmd, run_dir, log_path):
        raise RuntimeError("cannot pickle the task\nsecond line")

    records = runner.run_study(spec.load_study("qlora", seeds=1), tmp_path, runner=broken, log=lambda m: None)
    assert [r["error"] for r in records] == ["RuntimeError: cannot pickle the task"] * 2


def test_ray_options_need_ray_and_sane_values():
    with pytest.raises(UserError, match="add --ray"):
        runner.study_command("qlora", gpus_per_run=1)
    for kw, message in ((dict(cpus=0), "--cpus-per-run"), (dict(gpus=-1), "--gpus-per-run")):
        with pytest.raises(UserError, match=message):
            RayRunner(**kw)


def test_auto_without_a_cluster_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a fresh process
    monkeypatch.setattr(ray, "init", lambda **kw: (_ for _ in ()).throw(ConnectionError("Could not find any "
                                                                                       "running Ray instance.\nmore")))
    assert main(["study", "qlora", "--seeds", "1", "--ray", "auto", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ray start --head" in err and "--ray local" in err
    assert not any(tmp_path.iterdir())  # nothing written before the cluster was found


def test_connect_modes(monkeypatch):
    from loralab.study.ray_runner import connect

    inits = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: inits.append(kw))
    assert connect("local") and connect("10.0.0.5:6379") and connect("auto")
    assert inits == [{"address": "local", "include_dashboard": False}, {"address": "10.0.0.5:6379"},
                     {"address": "auto"}]  # auto: Ray's meaning, attach to a running cluster only
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    assert connect("local") is False and len(inits) == 3  # already attached: used as is, left running


def test_tune_runs_every_run_as_a_ray_task(tmp_path, tiny_folder, local_ray):
    from loralab.study import tune

    config = tmp_path / "tiny.yaml"
    config.write_text(json.dumps({
        "model": {"name": str(tiny_folder)}, "data": {"tasks": ["2da"], "n_train": 24, "template": "raw"},
        "train": {"max_steps": 6, "batch_size": 4, "lr": 1.0e-3, "precision": "fp32", "progress": False},
        "eval": {"n": 2, "before": False, "forgetting": False}}))
    log = []
    result = tune.tune_command(str(config), space="lr=[1.0e-3, 1.0e-2]", out=str(tmp_path / "t"), ray="auto",
                               log=log.append)
    assert any("[tune] on Ray (auto)" in m for m in log)
    assert result["chosen"] in ("lr-0.001", "lr-0.01")
    assert {r["status"] for r in result["runs"]} == {"ok"} and len(result["runs"]) == 6
    cfg = yaml.safe_load((tmp_path / "t" / "rung-0" / "cells" / "lr-0.001" / "seed-1" / "cell.yaml").read_text())
    assert cfg["train"]["threads"] == 1 and cfg["eval"]["tasks"] == []  # one CPU a task; a rung validates only

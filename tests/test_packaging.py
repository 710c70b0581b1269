"""A plain (non-editable) install carries everything loralab needs at run time: study presets, the
demo config and the bundled model configs are package data, found from any working directory."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_built_wheel_runs_the_studies_from_an_empty_folder(tmp_path):
    wheels, site, work = tmp_path / "wheels", tmp_path / "site", tmp_path / "empty"
    work.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(ROOT)], check=True, capture_output=True)
    wheel = next(wheels.glob("loralab-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    # the wheel's loralab, not the editable source tree (its dependencies come from this environment)
    env = {"PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}

    def loralab(*args):
        return subprocess.run([sys.executable, "-m", "loralab.cli", *args], cwd=work, env=env,
                              capture_output=True, text=True)

    where = subprocess.run([sys.executable, "-c", "import loralab; print(loralab.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(site))
    tasks = site / "loralab" / "eval" / "tasks"  # lm-eval task files travel with the wheel
    assert {"loralab_2da.yaml", "loralab_2da.jsonl", "loralab_tasks.py"} <= {p.name for p in tasks.iterdir()}
    listed = loralab("study", "list")
    assert listed.returncode == 0, listed.stderr
    assert {"consistency", "memory-7b", "qlora", "rank"} <= set(listed.stdout.split())
    dry = loralab("study", "qlora", "--dry-run")  # a training preset: its base is the packaged demo config
    assert dry.returncode == 0 and "qlora" in dry.stdout, dry.stderr
    est = loralab("study", "memory-7b", "--out", str(work / "mem"))
    assert est.returncode == 0, est.stderr
    assert (work / "mem" / "report.md").is_file() and "14.18" in (work / "mem" / "report.md").read_text()

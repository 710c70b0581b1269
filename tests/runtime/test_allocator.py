"""loralab/allocator.py: which malloc the `loralab` command preloads, and that the re-executed process runs on it."""
import json
import subprocess
import sys

import pytest
import yaml

from cli_cases import base_config
from loralab.errors import UserError
from loralab.runtime import allocator

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux's")


def fake_libs(monkeypatch, **libs):
    monkeypatch.setattr(allocator, "find", lambda name: libs.get(name))


@linux_only
def test_auto_prefers_tcmalloc_then_mimalloc_and_never_jemalloc(monkeypatch):
    fake_libs(monkeypatch, tcmalloc="libt.so", mimalloc="/x/libm.so", jemalloc="libj.so")
    assert allocator.choose({}) == ("tcmalloc", "libt.so")
    fake_libs(monkeypatch, mimalloc="/x/libm.so", jemalloc="libj.so")
    assert allocator.choose({"LORALAB_ALLOCATOR": "auto"}) == ("mimalloc", "/x/libm.so")
    fake_libs(monkeypatch, jemalloc="libj.so")
    assert allocator.choose({}) is None  # auto with neither: the system's malloc, no error
    assert allocator.choose({"LORALAB_ALLOCATOR": "jemalloc"}) == ("jemalloc", "libj.so")


@linux_only
def test_system_and_a_users_preload_are_left_alone(monkeypatch):
    fake_libs(monkeypatch, tcmalloc="libt.so")
    assert allocator.choose({"LORALAB_ALLOCATOR": "system"}) is None
    assert allocator.choose({"LD_PRELOAD": "/opt/libjemalloc.so.2"}) is None
    assert allocator.preload_env({"LORALAB_ALLOCATOR": "system"}) is None


def test_bad_or_missing_choice_is_a_user_error(monkeypatch):
    fake_libs(monkeypatch)
    with pytest.raises(UserError, match="LORALAB_ALLOCATOR='tcmaloc': expected one of auto, tcmalloc"):
        allocator.choose({"LORALAB_ALLOCATOR": "tcmaloc"})
    if sys.platform.startswith("linux"):
        with pytest.raises(UserError, match="LORALAB_ALLOCATOR=mimalloc: no libmimalloc found"):
            allocator.choose({"LORALAB_ALLOCATOR": "mimalloc"})


@linux_only
def test_preload_env_prepends_the_library_and_keeps_the_users_settings(monkeypatch):
    fake_libs(monkeypatch, mimalloc="/x/libmimalloc.so.3")
    env = allocator.preload_env({"LD_PRELOAD": "/opt/libfoo.so", "PATH": "/bin"})
    assert env["LD_PRELOAD"] == "/x/libmimalloc.so.3 /opt/libfoo.so" and env["PATH"] == "/bin"
    assert env["MIMALLOC_PURGE_DELAY"] == "10000"
    assert allocator.preload_env({"MIMALLOC_PURGE_DELAY": "10"})["MIMALLOC_PURGE_DELAY"] == "10"
    fake_libs(monkeypatch, tcmalloc="libtcmalloc_minimal.so.4")
    assert allocator.preload_env({})["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"] == str(1 << 40)


def test_the_dependency_ships_mimalloc():
    """pyproject's cmeel-mimalloc is what `auto` falls back to where the system has no tcmalloc."""
    if not sys.platform.startswith("linux"):
        pytest.skip("cmeel-mimalloc is a Linux dependency")
    assert allocator.find("mimalloc") is not None


REEXEC = ("import os, sys; from loralab.runtime.allocator import reexec_with_allocator, active; "
          "pid = os.getpid(); reexec_with_allocator(); print(pid, os.getpid(), active(), sys.argv[1:])")


@linux_only
@pytest.mark.parametrize("choice", ["tcmalloc", "mimalloc", "jemalloc", "system"])
def test_reexec_runs_the_same_command_on_the_chosen_malloc(choice):
    if choice != "system" and allocator.find(choice) is None:
        pytest.skip(f"no {choice} on this machine (.ci/run installs Debian's tcmalloc and jemalloc where it can)")
    env = {"PATH": "/usr/bin:/bin", "LORALAB_ALLOCATOR": choice}
    out = subprocess.run([sys.executable, "-c", REEXEC, "a", "b c"], env=env, capture_output=True, text=True,
                         timeout=60, check=True).stdout
    lines = out.splitlines()
    assert len(lines) == 1, out  # printed once: by the re-executed process, never by the first
    before, after, name, args = lines[0].split(" ", 3)
    assert before == after and name == choice and args == "['a', 'b c']"


@linux_only
def test_loralab_train_reports_the_malloc_it_ran_on(tiny_folder, tmp_path):
    """The command line re-executes itself before torch loads; summary.json and the printed summary say which."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(base_config(tiny_folder, tmp_path / "run")))
    env = {"PATH": "/usr/bin:/bin", "LORALAB_ALLOCATOR": "mimalloc", "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "loralab.cli", "train", str(cfg)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["allocator"] == "mimalloc"
    assert "malloc: mimalloc" in proc.stdout


RELEASE = ("import os; from loralab.runtime.allocator import reexec_with_allocator, active, release_free_pages; "
    "reexec_with_allocator(); "
    "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE') >> 20; "
    "blocks = [bytearray(65536) for _ in range(8000)]; full = rss(); del blocks; release_free_pages(); "
    "print(active(), full, rss())")


@linux_only
@pytest.mark.parametrize("choice", ["tcmalloc", "mimalloc", "system"])
def test_release_hands_freed_memory_back_on_each_malloc(choice):
    """What PeakMemory calls before it resets the peak: 500 MB of freed 64 KiB blocks leave the RSS."""
    if choice != "system" and allocator.find(choice) is None:
        pytest.skip(f"no {choice} on this machine")
    env = {"PATH": "/usr/bin:/bin", "LORALAB_ALLOCATOR": choice}
    out = subprocess.run([sys.executable, "-c", RELEASE], env=env, capture_output=True, text=True, timeout=60,
                         check=True).stdout.split()
    assert out[0] == choice and int(out[1]) > 500 and int(out[2]) < int(out[1]) - 400, out

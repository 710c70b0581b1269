"""The CLI's guard at the edge (cli.main + loralab.crash): a bug anywhere in a command ends in one
line naming a crash report and exit 1, never a traceback on the terminal; bad input keeps its one
`loralab: error:` line and exit 2; Ctrl-C keeps exit 130."""
import subprocess
import sys
from pathlib import Path

import pytest

from loralab import cli
from loralab.errors import UserError


def _raise(exc):
    def command(args):
        raise exc
    return command


def _one_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_a_bug_in_a_command_is_one_line_naming_the_crash_report(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LORALAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cli, "cmd_check", _raise(ZeroDivisionError("division by zero")))
    assert cli.main(["check", "some/adapter"]) == 1
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("loralab: internal error: ZeroDivisionError: division by zero")
    assert "bug in loralab" in line
    reports = list((tmp_path / "cache" / "crashes").glob("crash-*.txt"))
    assert len(reports) == 1 and str(reports[0]) in line
    text = reports[0].read_text()
    assert "command loralab check some/adapter" in text
    assert "Traceback (most recent call last)" in text and "ZeroDivisionError: division by zero" in text
    assert "in command" in text  # the frame that raised
    assert "\npython 3." in text and "\ntorch " in text and "\ntransformers " in text


def test_a_bug_whose_message_spans_lines_still_prints_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LORALAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cli, "cmd_estimate", _raise(KeyError("a\nmulti-line\nkey")))
    assert cli.main(["estimate"]) == 1
    assert "KeyError" in _one_line(capsys.readouterr().err)


def test_unwritable_cache_falls_back_to_the_temp_folder(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("LORALAB_CACHE", str(blocker))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    monkeypatch.setattr(cli, "cmd_check", _raise(AttributeError("'NoneType' object has no attribute 'shape'")))
    assert cli.main(["check", "x"]) == 1
    line = _one_line(capsys.readouterr().err)
    report = Path(line.rsplit("the full traceback is in ", 1)[1])
    assert report.parent == tmp_path / "tmp" and "AttributeError" in report.read_text()


def test_a_bug_before_the_command_runs_is_caught_too(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LORALAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cli, "build_parser", lambda: {}["parser"])  # a bug while setting up, not in a command
    assert cli.main(["estimate"]) == 1
    assert "KeyError: 'parser'" in _one_line(capsys.readouterr().err)


def test_a_user_error_keeps_its_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LORALAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cli, "cmd_check", _raise(UserError("adapter/adapter_config.json: not found")))
    assert cli.main(["check", "adapter"]) == 2
    assert _one_line(capsys.readouterr().err) == "loralab: error: adapter/adapter_config.json: not found"
    assert not (tmp_path / "cache" / "crashes").exists()  # bad input is not a crash


def test_ctrl_c_keeps_exit_130(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LORALAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cli, "cmd_check", _raise(KeyboardInterrupt()))
    assert cli.main(["check", "adapter"]) == 130
    assert _one_line(capsys.readouterr().err) == "loralab: interrupted"
    assert not (tmp_path / "cache" / "crashes").exists()


@pytest.mark.parametrize("exc", [SystemExit(3)], ids=["sys-exit"])
def test_system_exit_is_not_a_crash(exc, monkeypatch):
    monkeypatch.setattr(cli, "cmd_check", _raise(exc))
    with pytest.raises(SystemExit):
        cli.main(["check", "adapter"])


def test_a_bug_end_to_end_leaves_no_traceback_on_the_terminal(tmp_path):
    code = ("import sys\nimport loralab.cli as c\n"
            "def boom(args):\n    return {}['missing']\n"
            "c.cmd_check = boom\nsys.argv = ['loralab', 'check', 'x']\nsys.exit(c.main())\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "LORALAB_CACHE": str(tmp_path / "cache"),
                               "PYTHONPATH": ":".join(sys.path)})
    assert proc.returncode == 1, proc.stderr
    line = _one_line(proc.stderr)
    assert "KeyError: 'missing'" in line and str(tmp_path / "cache" / "crashes") in line

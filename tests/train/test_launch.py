"""train/launch.py: the one line a failed multi-process job ends with."""
from loralab.train.launch import failure_line

TORCHRUN_ERR = """Root Cause (first observed failure):
[0]:
  time      : 2026-12-04_16:00:00
  host      : h
  rank      : 1 (local_rank: 1)
  exitcode  : {code} (pid: 42)
"""


def _logs(tmp_path, rank_stderr: str):
    err = tmp_path / "job" / "attempt_0" / "1" / "stderr.log"
    err.parent.mkdir(parents=True)
    err.write_text(rank_stderr)
    return tmp_path


def test_a_crashed_rank_names_its_signal_and_its_last_words(tmp_path):
    logs = _logs(tmp_path, "loralab: 33 training examples\nterminate called after throwing 'gloo::IoException'\n\n")
    line = failure_line(logs, TORCHRUN_ERR.format(code=-6))
    assert line.startswith("rank 1 was killed (SIGABRT); it said: terminate called after throwing 'gloo::IoException'")
    assert line.endswith("the same command resumes")


def test_a_rank_killed_from_outside_has_no_last_words(tmp_path):
    logs = _logs(tmp_path, "loralab: 33 training examples\n")
    assert failure_line(logs, TORCHRUN_ERR.format(code=-9)).startswith("rank 1 was killed (SIGKILL). Checkpoints")


def test_a_ranks_own_error_lines_come_first_when_it_exited(tmp_path):
    logs = _logs(tmp_path, "loralab: error: data.path: no such file\n")
    assert failure_line(logs, TORCHRUN_ERR.format(code=2)) == "data.path: no such file"

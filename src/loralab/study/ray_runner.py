"""Running a study's (cell, seed)s as Ray tasks: the same `loralab train` command as a local run, on
whichever node of the cluster has the CPUs and GPUs free. Only the Runner differs from a local
study: runner.run_study still writes the configs, skips finished runs and records each outcome.

Where Ray runs (`--ray`):
  auto      Ray's meaning: connect to the cluster already running (RAY_ADDRESS, or the latest
            `ray start` on this machine); no cluster is an error, never a surprise local one.
  local     start a private Ray on this machine for the study, stopped when it ends.
  ADDRESS   a cluster's address: host:port of its head, or ray://host:port (Ray Client).
The study folder must be on a filesystem every node sees at the same path (NFS, a shared disk):
each task writes its run folder there and the driver reads the results back. A task that does not
find its run folder says so as its run's error. Ray is imported only here (`loralab[ray]`).
"""
from __future__ import annotations

import threading
from pathlib import Path

from ..errors import UserError

POLL_S = 1.0         # how often a waiting run checks whether the study was interrupted
STOP_GRACE_S = 60.0  # a cancelled run's time to write its checkpoint after SIGTERM, then it is killed
STOP_FILE = ".stop-requested"  # in the run folder: the driver's request to the task to stop its run
STOPPED = "stopped: the study was interrupted"


def _import_ray():
    try:
        import ray
    except ImportError:
        raise UserError("--ray needs Ray: pip install 'loralab[ray]'") from None
    return ray


def connect(address: str) -> bool:
    """Attach to (or for 'local', start) a Ray cluster; True if this call started or attached it
    (so the caller shuts it down), False if this process was already attached."""
    ray = _import_ray()
    if ray.is_initialized():
        return False
    try:
        if address == "local":
            ray.init(address="local", include_dashboard=False)
        else:
            ray.init(address=address)
    except Exception as e:  # noqa: BLE001  ConnectionError, or a version / authentication mismatch
        hint = " (start one with `ray start --head`, or use --ray local)" if address == "auto" else ""
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"--ray {address}: could not attach to a Ray cluster{hint}: {first}") from None
    return True


def disconnect() -> None:
    import ray

    ray.shutdown()


def task_function(stop_file: str = STOP_FILE, stopped: str = STOPPED):
    """The function a Ray task runs. Made here, so that Ray ships it by value: a worker needs
    loralab installed only for the `loralab train` it starts, not to unpickle this."""
    def run_in_task(cmd: list, run_dir: str, log_path: str, grace_s: float) -> int | str:
        """In the Ray worker: the training command, in this node's own Python, its output to the log.
        Asked to stop (the driver writes stop_file into the shared run folder; Ray's own cancel,
        a KeyboardInterrupt here, can be lost while a task sleeps), it sends the run SIGTERM, on which
        loralab train writes a checkpoint and exits; after grace_s it is killed."""
        import os
        import socket
        import subprocess
        import sys
        import time

        if not os.path.isdir(run_dir):
            return (f"run folder {run_dir} is not visible on node {socket.gethostname()}: a Ray study needs "
                    "its folder on a filesystem shared by every node, at the same path")
        stop_path = os.path.join(run_dir, stop_file)
        if os.path.exists(stop_path):  # asked to stop before it started
            return stopped

        def end(proc):
            proc.terminate()
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()

        with open(log_path, "w") as log:
            try:
                proc = subprocess.Popen([sys.executable, *cmd[1:]], stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL)
            except OSError as e:
                return f"could not start on node {socket.gethostname()}: {e}"
            try:
                while proc.poll() is None:  # a short sleep, not a blocking wait: a stop must get in
                    if os.path.exists(stop_path):
                        end(proc)
                        return stopped
                    time.sleep(0.2)
                return proc.returncode
            except KeyboardInterrupt:
                end(proc)
                raise
    return run_in_task


class RayRunner:
    """A study Runner: each call is one Ray task that holds `cpus` CPUs and `gpus` GPUs (fractions
    share a GPU) while its `loralab train` runs; Ray sets CUDA_VISIBLE_DEVICES to the GPUs it got.
    A Ray failure (a lost worker or node) comes back as the run's error, not an exception;
    stop() cancels the tasks in flight (Ctrl-C on the study)."""

    def __init__(self, *, cpus: int = 1, gpus: float = 0, stop_grace_s: float = STOP_GRACE_S):
        if not isinstance(cpus, int) or isinstance(cpus, bool) or cpus < 1:
            raise UserError(f"--cpus-per-run must be a positive integer, got {cpus!r}")
        if not isinstance(gpus, (int, float)) or isinstance(gpus, bool) or gpus < 0:
            raise UserError(f"--gpus-per-run must be 0 or more, got {gpus!r}")
        ray = _import_ray()
        self.cpus, self.gpus, self.stop_grace_s = cpus, gpus, stop_grace_s
        self._stopping = threading.Event()
        # No retries: a rerun of the study resumes the run (and training resumes from its checkpoint).
        self._task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=0)(task_function())

    def slots(self) -> int:
        """How many runs the cluster can hold at once (at least 1; an autoscaler may add more)."""
        import ray

        total = ray.cluster_resources()
        by_cpu = int(total.get("CPU", 0) // self.cpus)
        return max(1, min(by_cpu, int(total.get("GPU", 0) // self.gpus)) if self.gpus else by_cpu)

    def stop(self) -> None:
        """Cancel every task in flight (each run gets SIGTERM: a checkpoint, then exit); later calls return at once."""
        self._stopping.set()

    def __call__(self, cmd: list, run_dir: Path, log_path: Path) -> int | str:
        import ray

        if self._stopping.is_set():
            return STOPPED
        stop_path = Path(run_dir) / STOP_FILE
        stop_path.unlink(missing_ok=True)  # a request left by an earlier, interrupted study
        try:
            ref = self._task.remote(list(cmd), str(run_dir), str(log_path), self.stop_grace_s)
            while not ray.wait([ref], timeout=POLL_S)[0]:
                if self._stopping.is_set():
                    stop_path.touch()  # the task ends its run (SIGTERM, checkpoint) and returns
                    ray.cancel(ref)    # a task not started yet never runs
                    if not ray.wait([ref], timeout=self.stop_grace_s + 30)[0]:
                        ray.cancel(ref, force=True)  # neither reached it: end its worker
                        return STOPPED
                    break
            return ray.get(ref)
        except ray.exceptions.TaskCancelledError:
            return STOPPED
        except ray.exceptions.RayError as e:
            first = (str(e).strip().splitlines() or [""])[0][:200]
            return f"Ray: {type(e).__name__}: {first}"

"""Checkpoints for exact resume: written atomically, the newest K kept, never a pickle.

A checkpoint is a folder `checkpoints/step-00000050/` holding
  trainable.safetensors  the trainable parameters by name (LoRA factors, or all weights for full)
  optimizer.safetensors  every optimizer state tensor ("<param index>.<name>")
  rng.safetensors        each rank's torch (and CUDA) generator states and numpy key array ("<rank>.torch", ...)
  state.json             step, param groups, scheduler, each rank's python/numpy RNG scalars, metrics so far,
                         the config that produced it (a resume under another config is refused),
                         the training data's fingerprint (a resume on changed data is refused),
                         the sha256 of each tensor file and a checksum of itself
A run of N processes writes one checkpoint (rank 0 writes it; tensors are gathered whole first) that
holds all N ranks' RNG streams: it resumes with N processes.
It is written into a temporary sibling folder, each file fsynced, then renamed into place: a folder
named step-* is always complete, so a crash mid-save leaves the previous checkpoint as the last good one.
What happens to it afterwards (bit rot, a copy cut short) the checksums catch when it is read back:
`newest_readable` then falls back to the one before.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..io.fileio import _fsync_dir, atomic_save_safetensors, file_sha256, write_json

STEP_DIR = re.compile(r"^step-(\d{8})$")
TENSOR_FILES = ("trainable.safetensors", "optimizer.safetensors", "rng.safetensors")
# Keys that do not change the training trajectory: a resume may differ in these.
NEUTRAL_KEYS = {"output_dir", "resume", "train.progress", "train.log_every", "train.save_every",
                "train.keep_checkpoints", "train.threads", "train.distributed_timeout_s", "train.preflight",
                "eval.before", "eval.batch_size",
                "train.report_to", "train.run_name", "train.experiment", "train.mlflow_uri"}  # tracking
NEUTRAL_PREFIXES = ("eval.", "train.tags.")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_difference(saved: dict, current: dict) -> str | None:
    """The first trajectory-changing key whose value differs, as 'key: old vs new', else None.
    A key the checkpoint lacks (it predates the key) counts as the key's default."""
    from ..config import RunConfig

    a, b = _flatten(saved), _flatten(current)
    defaults = _flatten(RunConfig().to_dict())
    for key in sorted(set(a) | set(b)):
        if key in NEUTRAL_KEYS or key.startswith(NEUTRAL_PREFIXES):
            continue
        old = a.get(key, defaults.get(key))
        if old != b.get(key):
            return f"{key}: {old!r} in the checkpoint vs {b.get(key)!r} now"
    return None


def _state_checksum(state: dict) -> str:
    """sha256 of state.json's content without its own checksum (canonical JSON: keys sorted)."""
    body = {k: v for k, v in state.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def save(root: str | os.PathLike, snap: dict, config: dict, keep: int = 2, data_sha256: str | None = None) -> Path:
    """Write a snapshot (state.snapshot) as checkpoints/step-N atomically; prune to the newest `keep`.
    data_sha256: the training data's fingerprint, compared on resume."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{snap['step']:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        atomic_save_safetensors(snap["trainable"], tmp / "trainable.safetensors")
        opt = snap["optimizer"]
        tensors, scalars = {}, {}
        for idx, st in opt["state"].items():
            for name, value in st.items():
                if torch.is_tensor(value):
                    tensors[f"{idx}.{name}"] = value
                else:
                    scalars[f"{idx}.{name}"] = value
        atomic_save_safetensors(tensors, tmp / "optimizer.safetensors")
        rng_tensors, rng_scalars = _rng_parts(snap["rng"])
        atomic_save_safetensors(rng_tensors, tmp / "rng.safetensors")
        state = {"step": snap["step"], "total_steps": snap["total_steps"], "param_groups": opt["param_groups"],
                 "optimizer_scalars": scalars, "scheduler": snap["scheduler"],
                 "rng": rng_scalars, "result": snap["result"], "config": config,
                 "data_sha256": data_sha256, "sha256": {name: file_sha256(tmp / name) for name in TENSOR_FILES}}
        state["checksum"] = _state_checksum(json.loads(json.dumps(state)))  # as it will read back
        write_json(tmp / "state.json", state)  # last: its presence marks the content complete
        if final.exists():  # a re-save of the same step (e.g. resumed at the end): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"{final}: cannot write checkpoint ({e.strerror or e}); "
                        f"the previous checkpoint is intact") from None
    prune(root, keep)
    return final


def _rng_parts(per_rank: list[dict]) -> tuple[dict, list]:
    """Each rank's RNG state (state.get_rng) as tensors for safetensors and scalars for JSON."""
    tensors, scalars = {}, []
    for r, rng in enumerate(per_rank):
        np_state = rng["numpy"]
        tensors[f"{r}.torch"] = rng["torch"]
        tensors[f"{r}.numpy_key"] = torch.from_numpy(np_state[1].astype(np.int64))
        for i, s in enumerate(rng["cuda"]):
            tensors[f"{r}.cuda.{i}"] = s
        scalars.append({"python": [rng["python"][0], list(rng["python"][1]), rng["python"][2]],
                        "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
                        "n_cuda": len(rng["cuda"])})
    return tensors, scalars


def _rng_of_rank(r: int, scalars: dict, tensors: dict) -> dict:
    py, npk = scalars["python"], scalars["numpy"]
    return {"python": (py[0], tuple(py[1]), py[2]),
            "numpy": (npk[0], tensors[f"{r}.numpy_key"].numpy().astype(np.uint32), npk[1], npk[2], npk[3]),
            "torch": tensors[f"{r}.torch"], "cuda": [tensors[f"{r}.cuda.{i}"] for i in range(scalars["n_cuda"])]}


def checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / "state.json").exists()]
    return sorted(found, key=lambda p: p.name)


def latest(root: str | os.PathLike) -> Path | None:
    found = checkpoints(root)
    return found[-1] if found else None


def prune(root: str | os.PathLike, keep: int) -> None:
    for old in checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for tmp in Path(root).glob(".tmp-step-*"):  # leftovers of a crash mid-save
        if not tmp.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(tmp, ignore_errors=True)


def _verify(path: Path, state: dict) -> None:
    """Checksums written at save time (checkpoints from before they existed are taken as they are)."""
    if "checksum" in state and state["checksum"] != _state_checksum(state):
        raise ValueError("state.json does not match its checksum")
    for name, digest in (state.get("sha256") or {}).items():
        if file_sha256(path / name) != digest:
            raise ValueError(f"{name} does not match its sha256 (bit rot or an incomplete copy)")


def load(path: str | os.PathLike) -> dict:
    """Read a checkpoint folder back into the snapshot form `train(resume=...)` takes."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
        _verify(path, state)
        return _snapshot(state, load_file(path / "trainable.safetensors"), load_file(path / "optimizer.safetensors"),
                         load_file(path / "rng.safetensors"), path)
    # JSONDecodeError is a ValueError; the others: a state.json of the wrong shape
    except (OSError, ValueError, SafetensorError, KeyError, TypeError, AttributeError, IndexError) as e:
        raise UserError(f"{path}: unreadable checkpoint ({_reason(e)})") from None


def _reason(e: Exception) -> str:
    if isinstance(e, OSError) and e.filename:  # the file's name, not its (long) path
        return f"{type(e).__name__}: {Path(e.filename).name}: {e.strerror or e}"
    return f"{type(e).__name__}: {str(e)[:120]}"


def _snapshot(state: dict, trainable: dict, opt_tensors: dict, rng_t: dict, path: Path) -> dict:
    opt_state: dict = {}
    for key, value in list(opt_tensors.items()) + list(state["optimizer_scalars"].items()):
        idx, name = key.split(".", 1)
        opt_state.setdefault(int(idx), {})[name] = value
    try:
        rng = [_rng_of_rank(r, scalars, rng_t) for r, scalars in enumerate(state["rng"])]
    except KeyError as e:
        raise UserError(f"{path}: checkpoint lacks {e} (written by an older loralab?); resume=false starts over") \
            from None
    return {"step": state["step"], "total_steps": state["total_steps"], "trainable": trainable,
            "optimizer": {"state": opt_state, "param_groups": state["param_groups"]},
            "scheduler": state["scheduler"], "rng": rng, "result": state["result"], "config": state["config"],
            "data_sha256": state.get("data_sha256"), "path": str(path)}


def newest_readable(root: str | os.PathLike) -> tuple[dict | None, list[str]]:
    """(the newest checkpoint that reads back whole, or None if there is none at all, and one line
    per newer one skipped as unreadable). Raises UserError when every checkpoint is unreadable."""
    skipped = []
    for path in reversed(checkpoints(root)):
        try:
            return load(path), skipped
        except UserError as e:
            skipped.append(str(e))
    if skipped:
        raise UserError(f"{skipped[0]}; no older checkpoint reads back either; set resume=false to start over")
    return None, []


@torch.no_grad()
def restore_trainable(model: torch.nn.Module, trainable: dict, path: str) -> None:
    """Copy checkpointed trainable tensors into the model; a mismatch is a clear error."""
    own = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if own.keys() != trainable.keys():
        missing = sorted(own.keys() - trainable.keys())
        extra = sorted(trainable.keys() - own.keys())
        example = (missing or extra)[0]
        raise UserError(f"{path}: checkpoint does not match the model ({example} "
                        f"{'missing from' if missing else 'not in'} the checkpoint)")
    for name, p in own.items():
        if p.shape != trainable[name].shape:
            raise UserError(f"{path}: checkpoint tensor {name} has shape {tuple(trainable[name].shape)}, "
                            f"the model needs {tuple(p.shape)}")
        p.copy_(trainable[name])

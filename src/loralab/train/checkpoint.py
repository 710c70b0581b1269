"""Checkpoints for exact resume: written atomically, the newest K kept, never a pickle.

A checkpoint is a folder `checkpoints/step-00000050/` holding
  trainable.safetensors  the trainable parameters by name (LoRA factors, or all weights for full)
  optimizer.safetensors  every optimizer state tensor ("<param index>.<name>")
  rng.safetensors        torch (and CUDA) generator states, numpy's key array
  state.json             step, param groups, scheduler, python/numpy RNG scalars, metrics so far,
                         and the config that produced it (a resume under another config is refused)
It is written into a temporary sibling folder, each file fsynced, then renamed into place: a folder
named step-* is always complete, so a crash mid-save leaves the previous checkpoint as the last good one.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..io.fileio import _fsync_dir, atomic_save_safetensors, write_json

STEP_DIR = re.compile(r"^step-(\d{8})$")
# Keys that do not change the training trajectory: a resume may differ in these.
NEUTRAL_KEYS = {"output_dir", "resume", "train.progress", "train.log_every", "train.save_every",
                "train.keep_checkpoints", "train.threads", "eval.before", "eval.batch_size"}


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
        if key in NEUTRAL_KEYS or key.startswith("eval."):
            continue
        old = a.get(key, defaults.get(key))
        if old != b.get(key):
            return f"{key}: {old!r} in the checkpoint vs {b.get(key)!r} now"
    return None


def save(root: str | os.PathLike, snap: dict, config: dict, keep: int = 2) -> Path:
    """Write a snapshot (state.snapshot) as checkpoints/step-N atomically; prune to the newest `keep`."""
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
        rng = snap["rng"]
        np_state = rng["numpy"]
        rng_tensors = {"torch": rng["torch"], "numpy_key": torch.from_numpy(np_state[1].astype(np.int64))}
        for i, s in enumerate(rng["cuda"]):
            rng_tensors[f"cuda.{i}"] = s
        atomic_save_safetensors(rng_tensors, tmp / "rng.safetensors")
        state = {"step": snap["step"], "total_steps": snap["total_steps"], "param_groups": opt["param_groups"],
                 "optimizer_scalars": scalars, "scheduler": snap["scheduler"],
                 "python_rng": [rng["python"][0], list(rng["python"][1]), rng["python"][2]],
                 "numpy_rng": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
                 "n_cuda_rng": len(rng["cuda"]), "result": snap["result"], "config": config}
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


def load(path: str | os.PathLike) -> dict:
    """Read a checkpoint folder back into the snapshot form `train(resume=...)` takes."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
        trainable = load_file(path / "trainable.safetensors")
        opt_tensors = load_file(path / "optimizer.safetensors")
        rng_t = load_file(path / "rng.safetensors")
    except (OSError, json.JSONDecodeError, SafetensorError) as e:
        raise UserError(f"{path}: unreadable checkpoint ({type(e).__name__}: {str(e)[:120]})") from None
    opt_state: dict = {}
    for key, value in list(opt_tensors.items()) + list(state["optimizer_scalars"].items()):
        idx, name = key.split(".", 1)
        opt_state.setdefault(int(idx), {})[name] = value
    py = state["python_rng"]
    npk = state["numpy_rng"]
    rng = {"python": (py[0], tuple(py[1]), py[2]),
           "numpy": (npk[0], rng_t["numpy_key"].numpy().astype(np.uint32), npk[1], npk[2], npk[3]),
           "torch": rng_t["torch"], "cuda": [rng_t[f"cuda.{i}"] for i in range(state["n_cuda_rng"])]}
    return {"step": state["step"], "total_steps": state["total_steps"], "trainable": trainable,
            "optimizer": {"state": opt_state, "param_groups": state["param_groups"]},
            "scheduler": state["scheduler"], "rng": rng, "result": state["result"], "config": state["config"],
            "path": str(path)}


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

"""Adapters on disk in PEFT's format, so `peft.PeftModel.from_pretrained(base, dir)` loads ours
unchanged and our `load_adapter` loads PEFT's.

A folder holds:
  adapter_config.json        a LoraConfig as JSON (peft_type "LORA", r, lora_alpha, target_modules ...)
  adapter_model.safetensors  'base_model.model.<module path>.lora_A.weight' (r, in) and '.lora_B.weight'
                             (out, r); PEFT drops its adapter name ("default") from the keys on save.
Only safetensors is read: pickled adapter_model.bin files are refused (loading pickle runs code).
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from . import lora
from .errors import UserError
from .fileio import atomic_save_safetensors, write_json

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."  # PEFT's path to the wrapped transformers model

# Config entries that change what an adapter computes and that we do not implement. A value other
# than the "off" one listed here makes load_adapter refuse the adapter rather than load it wrongly.
_UNSUPPORTED = {
    "use_dora": False, "fan_in_fan_out": False, "lora_bias": False, "use_qalora": False,
    "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None, "layers_to_transform": None,
    "exclude_modules": None, "target_parameters": None, "trainable_token_indices": None,
    "layer_replication": None, "alora_invocation_tokens": None,
}


def _peft_target_modules(model: nn.Module, wrapped: list[str]) -> list[str] | str:
    """What to write as target_modules so PEFT wraps exactly `wrapped` in a fresh base model.

    Prefer the readable list of short names (PEFT matches list entries as dotted-name suffixes);
    if that would catch a module we did not wrap, fall back to a regex naming each module in full.
    """
    short = sorted({n.rpartition(".")[2] for n in wrapped})
    caught = {n for n in lora._visible_module_names(model) if any(lora._suffix_match(n, s) for s in short)}
    if caught == set(wrapped):
        return short
    return "(?:" + "|".join(re.escape(n) for n in wrapped) + ")"  # PEFT applies re.fullmatch to a string


def _num(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)  # lora_alpha is typed int in PEFT's config


def save_adapter(model: nn.Module, out_dir: str | os.PathLike, *, base_model_name_or_path: str, r: int,
                 alpha: float, dropout: float, target_modules: Sequence[str] | str | None = None) -> Path:
    """Write the model's LoRA factors as a PEFT adapter folder. Returns the folder.

    `target_modules` is what was passed to (or returned by) `inject`; it is checked against the
    modules actually wrapped, and written in the form PEFT needs to wrap the same set.
    """
    wrapped = dict(lora.lora_modules(model))
    if not wrapped:
        raise ValueError("save_adapter: the model has no LoRA modules")
    for name, m in wrapped.items():
        if m.r != r or not math.isclose(m.scaling, alpha / r, rel_tol=1e-6):
            raise ValueError(f"save_adapter: {name} has r={m.r}, scaling={m.scaling:g}, not r={r}, alpha={alpha}")
        if m.merged:
            raise ValueError(f"save_adapter: {name} is merged; unmerge before saving the adapter")
    if target_modules is not None and set(lora.resolve_targets(model, target_modules)) != set(wrapped):
        raise ValueError(f"save_adapter: target_modules {target_modules!r} do not name the wrapped modules")

    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_model_name_or_path),
        "revision": None,
        "r": r,
        "lora_alpha": _num(alpha),
        "lora_dropout": float(dropout),
        "target_modules": _peft_target_modules(model, list(wrapped)),
        "exclude_modules": None,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    tensors = {KEY_PREFIX + k: v for k, v in lora.lora_state_dict(model).items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Weights first, config last: a folder with a config is a complete adapter.
    atomic_save_safetensors(tensors, out / WEIGHTS_NAME)
    write_json(out / CONFIG_NAME, config)
    return out


def read_adapter_config(adapter_dir: str | os.PathLike) -> dict:
    path = Path(adapter_dir) / CONFIG_NAME
    if not Path(adapter_dir).is_dir():
        raise UserError(f"{adapter_dir}: adapter folder not found")
    if not path.is_file():
        raise UserError(f"{path}: adapter config not found")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a readable JSON adapter config ({e})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: adapter config must be a JSON object")
    return cfg


def _read_weights(adapter_dir: Path) -> dict[str, torch.Tensor]:
    path = adapter_dir / WEIGHTS_NAME
    if not path.is_file():
        if (adapter_dir / "adapter_model.bin").exists():
            raise UserError(f"{path}: not found; only safetensors adapters are loaded (adapter_model.bin is a "
                            f"pickle file and is never loaded)")
        raise UserError(f"{path}: adapter weights not found")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None


def _check_config(cfg: dict, path: Path) -> tuple[int, float, float, list[str] | str]:
    if cfg.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{path}: peft_type {cfg.get('peft_type')!r} is not supported (only LORA)")
    for key, off in _UNSUPPORTED.items():
        value = cfg.get(key, off)
        if value != off and not (off is None and value in ([], {})):
            raise UserError(f"{path}: {key}={value!r} is not supported by loralab")
    if cfg.get("bias", "none") != "none":
        raise UserError(f"{path}: bias={cfg['bias']!r} is not supported by loralab (only 'none')")
    targets = cfg.get("target_modules")
    if isinstance(targets, (list, tuple)) and targets and all(isinstance(t, str) for t in targets):
        targets = list(targets)
    elif not (isinstance(targets, str) and targets):
        raise UserError(f"{path}: target_modules must be a non-empty list of names or a regex, got {targets!r}")
    r, alpha, dropout = cfg.get("r", 8), cfg.get("lora_alpha", 8), cfg.get("lora_dropout", 0.0)
    try:
        lora._check_hparams(r, alpha, dropout)
    except UserError as e:
        raise UserError(f"{path}: {e}".replace("config key 'lora.", "'")) from None
    return r, alpha, dropout, targets


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike) -> dict:
    """Inject LoRA as the adapter's config says and load its weights. Returns the config dict.

    Everything is checked before the model is touched, so a mismatching adapter leaves it unchanged.
    """
    folder = Path(adapter_dir)
    cfg = read_adapter_config(folder)
    r, alpha, dropout, targets = _check_config(cfg, folder / CONFIG_NAME)
    weights = _read_weights(folder)

    def mismatch(detail: str) -> UserError:
        return UserError(f"{folder}: the adapter does not match the model ({detail}); was it trained on "
                         f"another base? (adapter base: {cfg.get('base_model_name_or_path')})")

    if targets == "all-linear":  # PEFT's only preset; every other string is a regex for PEFT
        names_spec = targets
    elif isinstance(targets, str):
        names_spec = targets if targets not in lora.TARGET_PRESETS else "(?:" + targets + ")"
    else:
        names_spec = targets
    try:
        names = lora.resolve_targets(model, names_spec)
    except UserError as e:
        raise mismatch(str(e)) from None

    expected = {}
    for name in names:
        base = model.get_submodule(name)
        expected[f"{name}.lora_A.weight"] = (r, base.in_features)
        expected[f"{name}.lora_B.weight"] = (base.out_features, r)
    sd = {}
    for key, tensor in weights.items():
        if not key.startswith(KEY_PREFIX):
            raise mismatch(f"weight {key!r} is not under {KEY_PREFIX!r}")
        sd[key[len(KEY_PREFIX):]] = tensor
    for key in sorted(expected.keys() - sd.keys()):
        raise mismatch(f"it has no weight {KEY_PREFIX + key}")
    for key in sorted(sd.keys() - expected.keys()):
        raise mismatch(f"weight {KEY_PREFIX + key} {tuple(sd[key].shape)} belongs to no LoRA target of the model")
    for key, shape in expected.items():
        if tuple(sd[key].shape) != shape:
            raise mismatch(f"weight {KEY_PREFIX + key} has shape {tuple(sd[key].shape)}, the model needs {shape}")

    lora.inject(model, names, r=r, alpha=alpha, dropout=dropout)
    if cfg.get("use_rslora"):  # rank-stabilized LoRA scales by alpha / sqrt(r)
        for _, m in lora.lora_modules(model):
            m.scaling = alpha / math.sqrt(r)
    lora.load_lora_state_dict(model, sd)
    return cfg

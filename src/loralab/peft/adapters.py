"""Adapters on disk in PEFT's format, so `peft.PeftModel.from_pretrained(base, dir)` loads ours
unchanged and our `load_adapter` loads PEFT's.

A folder holds:
  adapter_config.json        a LoraConfig as JSON (peft_type "LORA", r, lora_alpha, target_modules,
                             use_rslora, rank_pattern / alpha_pattern for per-module rank and alpha ...)
  adapter_model.safetensors  'base_model.model.<module path>.lora_A.weight' (r, in) and '.lora_B.weight'
                             (out, r); PEFT drops its adapter name ("default") from the keys on save.
Only safetensors is read: pickled adapter_model.bin files are refused (loading pickle runs code).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..io.fileio import atomic_save_safetensors, write_json
from .inject import inject, load_lora_state_dict, lora_state_dict
from .lora import LoraSpec, lora_modules
from .presets import TARGET_PRESETS
from .targets import resolve_targets, suffix_match, visible_module_names

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."  # PEFT's path to the wrapped transformers model

# Config entries that change what an adapter computes and that we do not implement. A value other
# than the "off" one listed here makes load_adapter refuse the adapter rather than load it wrongly.
_UNSUPPORTED = {
    "use_dora": False, "fan_in_fan_out": False, "lora_bias": False, "use_qalora": False,
    "modules_to_save": None, "layers_to_transform": None,
    "exclude_modules": None, "target_parameters": None, "trainable_token_indices": None,
    "layer_replication": None, "alora_invocation_tokens": None,
}


def _peft_target_modules(model: nn.Module, wrapped: list[str]) -> list[str] | str:
    """What to write as target_modules so PEFT wraps exactly `wrapped` in a fresh base model.

    Prefer the readable list of short names (PEFT matches list entries as dotted-name suffixes);
    if that would catch a module we did not wrap, fall back to a regex naming each module in full.
    """
    short = sorted({n.rpartition(".")[2] for n in wrapped})
    caught = {n for n in visible_module_names(model) if any(suffix_match(n, s) for s in short)}
    if caught == set(wrapped):
        return short
    return "(?:" + "|".join(re.escape(n) for n in wrapped) + ")"  # PEFT applies re.fullmatch to a string


def pattern_value(pattern: dict, name: str, default):
    """PEFT's rank_pattern / alpha_pattern rule: the first key (a regex) that matches the end of the
    full module name at a dot boundary gives the value; no key matching gives the default."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _pattern_for(values: dict[str, float], default: float) -> dict:
    """A small pattern PEFT resolves to exactly `values` (full name -> value): a short name
    ("q_proj": 16) where all modules of that name share one value, full names for the rest
    (escaped if a plain name would also match another module); full names come first."""
    by_short: dict[str, set] = {}
    for n, v in values.items():
        by_short.setdefault(n.rpartition(".")[2], set()).add(v)
    full = {n: v for n, v in values.items() if len(by_short[n.rpartition(".")[2]]) > 1 and v != default}
    short = {s: next(iter(vs)) for s, vs in sorted(by_short.items()) if len(vs) == 1 and next(iter(vs)) != default}
    for pattern in ({**full, **short}, {re.escape(n): v for n, v in values.items() if v != default}):
        if all(pattern_value(pattern, n, default) == v for n, v in values.items()):
            return pattern
    raise AssertionError("unreachable: escaped full names match only their own module")


def _num(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)  # lora_alpha is typed int in PEFT's config


def _most_common(values: list):
    return max(dict.fromkeys(values), key=values.count)  # ties: the first seen


def save_adapter(model: nn.Module, out_dir: str | os.PathLike, *, base_model_name_or_path: str,
                 weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the model's LoRA factors as a PEFT adapter folder. Returns the folder.

    Everything is read from the layers' LoraSpecs: the most common rank and alpha become `r` and
    `lora_alpha`, the modules that differ go to `rank_pattern` / `alpha_pattern` (PEFT's semantics).
    `weights` (by parameter name) replaces the layers' own factors: a sharded model's, gathered whole.
    """
    wrapped = dict(lora_modules(model))
    if not wrapped:
        raise ValueError("save_adapter: the model has no LoRA modules")
    for name, m in wrapped.items():
        if m.merged:
            raise ValueError(f"save_adapter: {name} is merged; unmerge before saving the adapter")
    specs = {name: m.spec for name, m in wrapped.items()}
    if len({s.use_rslora for s in specs.values()}) > 1:
        raise ValueError("save_adapter: PEFT's format has one use_rslora for all modules; these differ")
    r = _most_common([s.r for s in specs.values()])
    alpha = _most_common([s.alpha for s in specs.values()])
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_model_name_or_path),
        "revision": None,
        "r": r,
        "lora_alpha": _num(alpha),
        "lora_dropout": float(_most_common([s.dropout for s in specs.values()])),
        "target_modules": _peft_target_modules(model, list(wrapped)),
        "exclude_modules": None,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": next(iter(specs.values())).use_rslora,
        "use_dora": False,
        "lora_bias": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": _pattern_for({n: s.r for n, s in specs.items()}, r),
        "alpha_pattern": {k: _num(v) for k, v in _pattern_for({n: s.alpha for n, s in specs.items()}, alpha).items()},
    }
    own = lora_state_dict(model)
    tensors = {KEY_PREFIX + k: (weights[k] if weights is not None else v) for k, v in own.items()}
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


def _check_pattern(cfg: dict, key: str, path: Path) -> dict:
    pattern = cfg.get(key) or {}
    if not isinstance(pattern, dict) or not all(isinstance(k, str) and k for k in pattern):
        raise UserError(f"{path}: {key} must map module-name patterns to numbers, got {pattern!r}")
    for k in pattern:
        try:
            re.compile(k)
        except re.error as e:
            raise UserError(f"{path}: {key} key {k!r} is not a valid regular expression ({e})") from None
    return pattern


def _check_config(cfg: dict, path: Path) -> tuple[dict, list[str] | str]:
    """The adapter's per-module LoraSpec ingredients and its target_modules, checked."""
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
    hp = {"r": cfg.get("r", 8), "alpha": cfg.get("lora_alpha", 8), "dropout": cfg.get("lora_dropout", 0.0),
          "use_rslora": bool(cfg.get("use_rslora", False)),
          "rank_pattern": _check_pattern(cfg, "rank_pattern", path),
          "alpha_pattern": _check_pattern(cfg, "alpha_pattern", path)}
    return hp, targets


def _spec_for(hp: dict, name: str, path: Path) -> LoraSpec:
    r = pattern_value(hp["rank_pattern"], name, hp["r"])
    alpha = pattern_value(hp["alpha_pattern"], name, hp["alpha"])
    try:
        return LoraSpec(r=r, alpha=alpha, dropout=hp["dropout"], use_rslora=hp["use_rslora"])
    except UserError as e:
        raise UserError(f"{path}: {name}: {e}".replace("config key 'lora.", "'")) from None


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike) -> dict:
    """Inject LoRA as the adapter's config says and load its weights. Returns the config dict.

    Everything is checked before the model is touched, so a mismatching adapter leaves it unchanged.
    """
    folder = Path(adapter_dir)
    cfg = read_adapter_config(folder)
    hp, targets = _check_config(cfg, folder / CONFIG_NAME)
    weights = _read_weights(folder)

    def mismatch(detail: str) -> UserError:
        return UserError(f"{folder}: the adapter does not match the model ({detail}); was it trained on "
                         f"another base? (adapter base: {cfg.get('base_model_name_or_path')})")

    if isinstance(targets, str) and targets != "all-linear" and targets in TARGET_PRESETS:
        targets = "(?:" + targets + ")"  # "all-linear" is PEFT's only preset; any other string is a regex
    try:
        names = resolve_targets(model, targets)
    except UserError as e:
        raise mismatch(str(e)) from None
    specs = {name: _spec_for(hp, name, folder / CONFIG_NAME) for name in names}

    expected = {}
    for name in names:
        base = model.get_submodule(name)
        expected[f"{name}.lora_A.weight"] = (specs[name].r, base.in_features)
        expected[f"{name}.lora_B.weight"] = (base.out_features, specs[name].r)
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

    inject(model, names, specs.__getitem__)
    load_lora_state_dict(model, sd)
    return cfg

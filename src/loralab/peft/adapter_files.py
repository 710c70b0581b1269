"""PEFT's adapter folder, with no model in sight: reading and checking a folder into per-module
hyperparameters, and writing one from per-module tensors. adapters.py (a model's adapter in and
out), combine.py (adapters combined) and check.py (which runtime loads a folder) share it.

A folder holds:
  adapter_config.json        a LoraConfig as JSON (peft_type "LORA", r, lora_alpha, target_modules,
                             use_rslora, use_dora, rank_pattern / alpha_pattern, layers_to_transform ...)
  adapter_model.safetensors  'base_model.model.<module path>.lora_A.weight' (r, in), '.lora_B.weight'
                             (out, r) and, with DoRA, '.lora_magnitude_vector' (out,); PEFT drops its
                             adapter name ("default") from the keys on save. Fused expert weights
                             (target_parameters) keep A (r*E, in), B (out, r*E) under their experts
                             module's path, one '.base_layer' per wrapper nested outside (peft/experts.py).
fan_in_fan_out says the targets store their weight (in, out) (GPT-2's Conv1D). The factors' shapes do
not depend on it, and PEFT corrects the flag per layer from the layer's type when it loads (with a
warning), as loralab reads the layout from the layer itself: the flag is written true when the
targets are Conv1D, so PEFT loads quietly, and accepted either way when read.
Only safetensors is read: pickled adapter_model.bin files are refused (loading pickle runs code).
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..io import reading
from ..io.fileio import atomic_save_safetensors, write_json
from .lora import LoraSpec
from .names import pattern_regex, pattern_value
from .presets import check_init

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."  # PEFT's path to the wrapped transformers model
MAGNITUDE = "lora_magnitude_vector"
# A staged run (model.adapter: SFT, then DPO) trains on the base with an earlier adapter merged in, so its own
# adapter is relative to that merged model. PEFT's adapter_config.json cannot say so; this file beside it
# names the earlier adapter, and load_adapter merges it first (PEFT users: merge_and_unload it, then load).
STAGE_NAME = "loralab_stage.json"

# Config entries that change what an adapter computes and that we do not implement. A value other
# than the "off" one listed here makes the loader refuse the adapter rather than load it wrongly.
UNSUPPORTED = {
    "lora_bias": False, "use_qalora": False, "modules_to_save": None,
    "exclude_modules": None, "trainable_token_indices": None,
    "layer_replication": None, "alora_invocation_tokens": None,
}
# init_lora_weights values whose A and B need nothing from the base beyond the loaded tensors.
PLAIN_INITS = (True, False, None, "gaussian")


@dataclass(frozen=True)
class AdapterConfig:
    """What an adapter_config.json says about the LoRA layers it describes (checked)."""
    r: int
    alpha: float
    dropout: float
    use_rslora: bool
    use_dora: bool
    init: str                   # "kaiming" unless the A and B apply to a base changed by PiSSA / OLoRA
    rank_pattern: dict
    alpha_pattern: dict
    targets: list | str
    layers: list | None         # layers_to_transform (a list target_modules only, as PEFT)
    layers_pattern: list | str | None
    raw: dict
    parameters: tuple = ()      # target_parameters: fused expert weights (peft/experts.py)

    def spec(self, name: str, where: str = "") -> LoraSpec:
        """The LoraSpec of module `name`, PEFT's patterns applied."""
        try:
            return LoraSpec(r=pattern_value(self.rank_pattern, name, self.r),
                            alpha=pattern_value(self.alpha_pattern, name, self.alpha), dropout=self.dropout,
                            use_rslora=self.use_rslora, use_dora=self.use_dora, init=self.init)
        except UserError as e:
            raise UserError(f"{where}: {name}: {e}".replace("config key 'lora.", "'")) from None


def read_adapter_config(adapter_dir: str | os.PathLike) -> dict:
    path = Path(adapter_dir) / CONFIG_NAME
    if not Path(adapter_dir).is_dir():
        raise UserError(f"{adapter_dir}: adapter folder not found")
    if not path.exists():  # anything else there (a FIFO, a folder) is refused by name when read
        raise UserError(f"{path}: adapter config not found")
    text = reading.read_text(path, "adapter config", reading.JSON_CONFIG_CAP)  # not a FIFO, not huge, UTF-8
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not a readable JSON adapter config ({e.msg} at column {e.colno})") \
            from None
    except (ValueError, RecursionError) as e:  # a number of thousands of digits; deep nesting
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e).split(":")[0]
        raise UserError(f"{path}: not a readable JSON adapter config ({why})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: adapter config must be a JSON object")
    return cfg


def read_weights(adapter_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The weights by module-relative key ('<module path>.lora_A.weight'), KEY_PREFIX removed."""
    path = Path(adapter_dir) / WEIGHTS_NAME
    if not path.is_file():
        if (Path(adapter_dir) / "adapter_model.bin").exists():
            raise UserError(f"{path}: not found; only safetensors adapters are loaded (adapter_model.bin is a "
                            f"pickle file and is never loaded)")
        raise UserError(f"{path}: adapter weights not found")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        weights = load_file(path, device="cpu")
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None
    bad = [k for k in weights if not k.startswith(KEY_PREFIX)]
    if bad:
        raise UserError(f"{path}: weight {bad[0]!r} is not under {KEY_PREFIX!r}")
    return {k[len(KEY_PREFIX):]: v for k, v in weights.items()}


def module_names(weights: dict) -> list[str]:
    """The modules an adapter's weights cover, in the file's order."""
    return list(dict.fromkeys(k.rsplit(".lora_", 1)[0] for k in weights))


def _check_pattern(cfg: dict, key: str, path: Path) -> dict:
    pattern = cfg.get(key) or {}
    if not isinstance(pattern, dict) or not all(isinstance(k, str) and k for k in pattern):
        raise UserError(f"{path}: {key} must map module-name patterns to numbers, got {pattern!r}")
    for k, v in pattern.items():
        try:
            re.compile(pattern_regex(k))
        except (re.error, OverflowError, RecursionError) as e:  # a{99999999999}, thousands of nested groups
            raise UserError(f"{path}: {key} key {k!r} is not a valid regular expression ({e})") from None
        _number(v, f"{key} {k!r}", path, integer=key == "rank_pattern")
    return pattern


def _number(value, key: str, path: Path, *, integer: bool = False, below_one: bool = False):
    """A hyperparameter as a LoRA layer needs it: a number (an int for a rank), > 0 (dropout: in
    [0, 1)); a one-line error naming the file and key otherwise."""
    kinds = (int,) if integer else (int, float)
    ok = isinstance(value, kinds) and not isinstance(value, bool) and (isinstance(value, int) or math.isfinite(value))
    ok = ok and ((0 <= value < 1) if below_one else value > 0)
    if not ok:
        want = "a rank (an integer > 0)" if integer else "a number in [0, 1)" if below_one else "a number > 0"
        raise UserError(f"{path}: {key} must be {want}, got {value!r}")
    return value


def _init_of(value, path: Path) -> str:
    if value in PLAIN_INITS:
        return "kaiming"  # the factors are loaded; how they started does not matter
    try:
        init = check_init(value)
    except UserError:
        init = None
    if init is None or init in PLAIN_INITS:
        raise UserError(f"{path}: init_lora_weights={value!r} is not supported by loralab")
    return init


def check_config(cfg: dict, path: Path) -> AdapterConfig:
    """The config's LoRA hyperparameters, or a one-line error naming the file and key."""
    if cfg.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{path}: peft_type {cfg.get('peft_type')!r} is not supported (only LORA)")
    for key, off in UNSUPPORTED.items():
        value = cfg.get(key, off)
        if value != off and not (off is None and value in ([], {})):
            raise UserError(f"{path}: {key}={value!r} is not supported by loralab")
    if not isinstance(cfg.get("fan_in_fan_out", False), bool):
        raise UserError(f"{path}: fan_in_fan_out must be true or false, got {cfg['fan_in_fan_out']!r}")
    if cfg.get("bias", "none") != "none":
        raise UserError(f"{path}: bias={cfg['bias']!r} is not supported by loralab (only 'none')")
    parameters = cfg.get("target_parameters") or []
    if not (isinstance(parameters, list) and all(isinstance(t, str) and t for t in parameters)):
        raise UserError(f"{path}: target_parameters must be a list of parameter names, got {parameters!r}")
    targets = cfg.get("target_modules")
    if isinstance(targets, (list, tuple)) and (targets or parameters) and all(isinstance(t, str) for t in targets):
        targets = list(targets)
    elif not (isinstance(targets, str) and targets):
        raise UserError(f"{path}: target_modules must be a non-empty list of names or a regex, got {targets!r}")
    layers = cfg.get("layers_to_transform")
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if layers in ([], None) or isinstance(targets, str):
        layers = None  # PEFT applies layers_to_transform to list targets only
    elif not (isinstance(layers, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in layers)):
        raise UserError(f"{path}: layers_to_transform must be an integer or a list of integers, got {layers!r}")
    return AdapterConfig(
        r=_number(cfg.get("r", 8), "'r'", path, integer=True),
        alpha=_number(cfg.get("lora_alpha", 8), "'lora_alpha'", path),
        dropout=_number(cfg.get("lora_dropout") or 0.0, "'lora_dropout'", path, below_one=True),
        use_rslora=bool(cfg.get("use_rslora", False)), use_dora=bool(cfg.get("use_dora", False)),
        init=_init_of(cfg.get("init_lora_weights", True), path),
        rank_pattern=_check_pattern(cfg, "rank_pattern", path),
        alpha_pattern=_check_pattern(cfg, "alpha_pattern", path),
        targets=targets, layers=layers, layers_pattern=cfg.get("layers_pattern") or None, raw=cfg,
        parameters=tuple(parameters))


# ---------------------------------------------------------------------------------------------
# Writing

def pattern_for(values: dict[str, float], default: float) -> dict:
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


def converted(a: torch.Tensor, b: torch.Tensor, a0: torch.Tensor, b0: torch.Tensor,
              spec: LoraSpec) -> tuple[torch.Tensor, torch.Tensor, LoraSpec]:
    """PEFT's PiSSA / OLoRA conversion: s(B A - B0 A0) = s' [B | -B0] [A ; A0] at rank 2r, alpha set
    so the scaling s' stays s (2 alpha; sqrt(2) alpha with rsLoRA). Applies to the original base."""
    alpha = spec.alpha * (math.sqrt(2) if spec.use_rslora else 2)
    spec2 = LoraSpec(r=2 * spec.r, alpha=alpha, dropout=spec.dropout, use_rslora=spec.use_rslora,
                     use_dora=spec.use_dora)
    return torch.cat([a, a0.to(a.dtype)], dim=0), torch.cat([b, -b0.to(b.dtype)], dim=1), spec2


def write_adapter(out_dir: str | os.PathLike, modules: dict, *, target_modules, base_model_name_or_path: str,
                  layers_to_transform: list | None = None, fan_in_fan_out: bool = False,
                  parameters: dict | None = None, target_parameters: list | None = None) -> Path:
    """Write a PEFT adapter folder. `modules`: full name -> (A, B, LoraSpec, magnitude or None);
    `parameters`: full parameter name -> (the path its keys go under, A, B, LoraSpec), with
    `target_parameters` the config's list that selects them.
    fan_in_fan_out: the targets are Conv1D layers (weights stored (in, out)), PEFT's flag.

    The most common rank and alpha become `r` and `lora_alpha`, the modules that differ go to
    `rank_pattern` / `alpha_pattern` (PEFT's semantics). Weights first, config last: a folder
    with a config is a complete adapter."""
    parameters = parameters or {}
    specs = {**{n: m[2] for n, m in modules.items()}, **{n: p[3] for n, p in parameters.items()}}
    for key in ("use_rslora", "use_dora"):
        if len({getattr(s, key) for s in specs.values()}) > 1:
            raise ValueError(f"write_adapter: PEFT's format has one {key} for all modules; these differ")
    first = next(iter(specs.values()))
    r = _most_common([s.r for s in specs.values()])
    alpha = _most_common([s.alpha for s in specs.values()])
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_model_name_or_path),
        "revision": None, "r": r, "lora_alpha": _num(alpha),
        "lora_dropout": float(_most_common([s.dropout for s in specs.values()])),
        "target_modules": target_modules, "exclude_modules": None, "bias": "none",
        "fan_in_fan_out": bool(fan_in_fan_out),
        "inference_mode": True, "init_lora_weights": True, "use_rslora": first.use_rslora, "use_dora": first.use_dora,
        "lora_bias": False, "modules_to_save": None, "layers_to_transform": layers_to_transform,
        "layers_pattern": None, "target_parameters": list(target_parameters) if parameters else None,
        "rank_pattern": pattern_for({n: s.r for n, s in specs.items()}, r),
        "alpha_pattern": {k: _num(v) for k, v in pattern_for({n: s.alpha for n, s in specs.items()}, alpha).items()},
    }
    tensors = {}
    for name, (a, b, _, magnitude) in modules.items():
        tensors[f"{KEY_PREFIX}{name}.lora_A.weight"] = a.detach()
        tensors[f"{KEY_PREFIX}{name}.lora_B.weight"] = b.detach()
        if magnitude is not None:
            tensors[f"{KEY_PREFIX}{name}.{MAGNITUDE}"] = magnitude.detach()
    for path, a, b, _ in parameters.values():
        tensors[f"{KEY_PREFIX}{path}.lora_A.weight"] = a.detach()
        tensors[f"{KEY_PREFIX}{path}.lora_B.weight"] = b.detach()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(tensors, out / WEIGHTS_NAME)
    write_json(out / CONFIG_NAME, config)
    return out


def earlier_stage(adapter_dir: str | os.PathLike) -> Path | None:
    """The adapter a staged run's adapter was trained on top of (merged into the base), or None."""
    path = Path(adapter_dir) / STAGE_NAME
    if not path.exists():
        return None
    try:  # a relative path is relative to the adapter folder
        first = Path(adapter_dir) / json.loads(path.read_text())["merged_first"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{path}: not a stage file (expected {{\"merged_first\": \"adapter folder\"}})") from None
    if not (first / CONFIG_NAME).exists():
        raise UserError(f"{path}: the earlier stage's adapter {first} is gone (no {CONFIG_NAME}); "
                        f"this adapter applies only on top of it")
    return first


def write_stage(adapter_dir: str | os.PathLike, earlier: str | os.PathLike) -> None:
    write_json(Path(adapter_dir) / STAGE_NAME, {"merged_first": str(Path(earlier).resolve())})

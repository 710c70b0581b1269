"""A model's adapter in PEFT's on-disk format, both ways, so `peft.PeftModel.from_pretrained(base, dir)`
loads ours unchanged and our `load_adapter` loads PEFT's (the folder itself: adapter_files.py).

Every variant is saved the way PEFT saves it: rsLoRA as use_rslora, DoRA as use_dora plus one
`lora_magnitude_vector` per module, per-module rank / alpha as rank_pattern / alpha_pattern, a
subset of layers as layers_to_transform, Conv1D targets (GPT-2) with fan_in_fan_out, fused expert
weights as target_parameters with PEFT's key names (experts.py). PiSSA / OLoRA change the frozen base at
init; they are saved converted, as PEFT does when given `path_initial_model_for_weight_conversion`: rank 2r,
A = [A ; A0], B = [B | -B0], an adapter for the original, unmodified base.
"""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from .adapter_files import (
    CONFIG_NAME,
    KEY_PREFIX,
    MAGNITUDE,
    check_config,
    converted,
    earlier_stage,
    read_adapter_config,
    read_weights,
    write_adapter,
)
from .experts import (
    expected_shapes,
    expert_tensors,
    inject_experts,
    load_expert_weights,
    resolve_parameters,
    target_parameters_for,
)
from .inject import inject, load_lora_state_dict
from .layout import features
from .lora import lora_modules
from .merge import merge_and_unload
from .names import layer_index, suffix_match
from .presets import TARGET_PRESETS
from .targets import resolve_targets, visible_module_names

__all__ = ["save_adapter", "load_adapter", "read_adapter_config", "CONFIG_NAME", "adapter_delta", "merge_stage",
           "check_stage_adapter"]


def _peft_targets(model: nn.Module, wrapped: list[str]) -> tuple[list[str] | str, list[int] | None]:
    """(target_modules, layers_to_transform) that make PEFT wrap exactly `wrapped` in a fresh base.

    Prefer the readable list of short names (PEFT matches list entries as dotted-name suffixes),
    narrowed to some decoder layers if that is what was wrapped; if neither catches exactly the
    wrapped modules, a regex naming each module in full."""
    short = sorted({n.rpartition(".")[2] for n in wrapped})
    caught = [n for n in visible_module_names(model) if any(suffix_match(n, s) for s in short)]
    if set(caught) == set(wrapped):
        return short, None
    layers = {layer_index(n) for n in wrapped}
    if None not in layers and {n for n in caught if layer_index(n) in layers} == set(wrapped):
        return short, sorted(layers)
    return "(?:" + "|".join(re.escape(n) for n in wrapped) + ")", None  # PEFT applies re.fullmatch to a string


def save_adapter(model: nn.Module, out_dir: str | os.PathLike, *, base_model_name_or_path: str,
                 weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the model's LoRA layers as a PEFT adapter folder (read from their LoraSpecs). Returns it.
    `weights` (by parameter name) replaces the layers' own tensors: a sharded model's, gathered whole."""
    own = lambda name, t: weights.get(name, t) if weights is not None else t  # noqa: E731
    wrapped = dict(lora_modules(model))
    experts = expert_tensors(model, weights)
    if not wrapped and not experts:
        raise ValueError("save_adapter: the model has no LoRA modules")
    modules = {}
    for name, m in wrapped.items():
        if m.merged:
            raise ValueError(f"save_adapter: {name} is merged; unmerge before saving the adapter")
        a, b, spec = own(f"{name}.lora_A.weight", m.lora_A.weight), own(f"{name}.lora_B.weight", m.lora_B.weight), \
            m.spec
        if hasattr(m, "lora_A0"):  # PiSSA / OLoRA: for the original base, not the residual one
            a, b, spec = converted(a, b, m.lora_A0, m.lora_B0, spec)
        magnitude = own(f"{name}.lora_magnitude_vector", m.lora_magnitude_vector) if spec.use_dora else None
        modules[name] = (a, b, spec, magnitude)
    targets, layers = _peft_targets(model, list(wrapped)) if wrapped else ([], None)
    # PEFT has one flag for all targets; it sets it per layer from the layer's type on loading (a warning
    # where the flag disagrees), so true when any target is a Conv1D keeps GPT-2's usual targets quiet.
    return write_adapter(out_dir, modules, target_modules=targets, layers_to_transform=layers,
                         base_model_name_or_path=base_model_name_or_path,
                         fan_in_fan_out=any(m.fan_in_fan_out for m in wrapped.values()), parameters=experts,
                         target_parameters=target_parameters_for(model, list(experts)))


def check_stage_adapter(adapter_dir: str) -> None:
    """model.adapter, checked before the run's folder is touched: an adapter folder with a valid config."""
    folder = Path(adapter_dir)
    if not (folder / CONFIG_NAME).is_file():
        raise UserError(f"config key 'model.adapter': {adapter_dir} is not an adapter folder (no {CONFIG_NAME})")
    check_config(read_adapter_config(folder), folder / CONFIG_NAME)
    earlier_stage(folder)


def merge_stage(model: nn.Module, adapter_dir: str | os.PathLike, dtype: torch.dtype | None = None) -> nn.Module:
    """Fold an adapter (and the stages before it) into the model's weights for good: the base of a
    staged run, and so the reference model of its DPO (LoRA off)."""
    load_adapter(model, adapter_dir)
    return merge_and_unload(model, dtype)


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike) -> dict:
    """Inject LoRA as the adapter's config says and load its weights. Returns the config dict.

    Everything is checked before the model is touched, so a mismatching adapter leaves it unchanged.
    An adapter PEFT saved unconverted after a PiSSA / OLoRA init (init_lora_weights "pissa"...) is
    loaded as PEFT loads it: the init runs again on the base, then its A and B are loaded. A staged
    run's adapter (adapter_files.STAGE_NAME) has its earlier stage merged into the model first (a
    mismatch found after that leaves the merge in place)."""
    folder = Path(adapter_dir)
    if (first := earlier_stage(folder)) is not None:
        merge_stage(model, first)
    raw = read_adapter_config(folder)
    cfg = check_config(raw, folder / CONFIG_NAME)
    weights = read_weights(folder)

    def mismatch(detail: str) -> UserError:
        return UserError(f"{folder}: the adapter does not match the model ({detail}); was it trained on "
                         f"another base? (adapter base: {raw.get('base_model_name_or_path')})")

    targets = cfg.targets
    if isinstance(targets, str) and targets != "all-linear" and targets in TARGET_PRESETS:
        targets = "(?:" + targets + ")"  # "all-linear" is PEFT's only preset; any other string is a regex
    try:
        names = resolve_targets(model, targets) if targets else []  # [] : fused expert weights only
        params = resolve_parameters(model, list(cfg.parameters))
    except UserError as e:
        raise mismatch(str(e)) from None
    if cfg.layers is not None:
        names = [n for n in names if layer_index(n, cfg.layers_pattern) in cfg.layers]
    specs = {name: cfg.spec(name, str(folder / CONFIG_NAME)) for name in names}

    expected = {}
    for name in names:
        n_in, n_out = features(model.get_submodule(name))  # a Conv1D's weight is (in, out): read through layout
        expected[f"{name}.lora_A.weight"] = (specs[name].r, n_in)
        expected[f"{name}.lora_B.weight"] = (n_out, specs[name].r)
        if cfg.use_dora:
            expected[f"{name}.{MAGNITUDE}"] = (n_out,)
    expert_keys = expected_shapes(model, params, lambda n: cfg.spec(n, str(folder / CONFIG_NAME)).r)
    expected.update(expert_keys)
    for key in sorted(expected.keys() - weights.keys()):
        raise mismatch(f"it has no weight {KEY_PREFIX + key}")
    for key in sorted(weights.keys() - expected.keys()):
        raise mismatch(f"weight {KEY_PREFIX + key} {tuple(weights[key].shape)} belongs to no LoRA target of the model")
    for key, shape in expected.items():
        if tuple(weights[key].shape) != shape:
            raise mismatch(f"weight {KEY_PREFIX + key} has shape {tuple(weights[key].shape)}, the model needs {shape}")

    if names:
        inject(model, names, specs.__getitem__)
    # the factors are loaded: dropout (training only) and how they started do not matter here
    inject_experts(model, params, lambda n: dataclasses.replace(cfg.spec(n, str(folder / CONFIG_NAME)),
                                                                dropout=0.0, init="kaiming"))
    load_lora_state_dict(model, {k: v for k, v in weights.items() if k not in expert_keys})
    load_expert_weights(model, weights)
    return raw


def adapter_delta(adapter_dir: str | os.PathLike, name: str) -> torch.Tensor:
    """scaling * B @ A of one module of an adapter folder (fp32), for inspection and tests."""
    folder = Path(adapter_dir)
    cfg = check_config(read_adapter_config(folder), folder / CONFIG_NAME)
    w = read_weights(folder)
    spec = cfg.spec(name, str(folder))
    return (w[f"{name}.lora_B.weight"].float() @ w[f"{name}.lora_A.weight"].float()) * spec.scaling

"""Putting LoRA into a model: freeze it, wrap the targets (one LoraSpec per module), read and write
the factors, count parameters."""
from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..errors import UserError
from .init import check_base, seed_factors
from .lora import LoRALinear, LoraSpec, is_quantized, lora_modules
from .names import pattern_value
from .presets import mutates_base
from .targets import resolve_targets

SpecFor = LoraSpec | Callable[[str], LoraSpec]  # one spec for all, or a spec per full module name


class PerModule:
    """`spec` with PEFT's rank_pattern / alpha_pattern applied per full module name (names.pattern_value)."""

    def __init__(self, spec: LoraSpec, rank_pattern: dict, alpha_pattern: dict):
        self.spec, self.patterns = spec, {"lora.rank_pattern": rank_pattern, "lora.alpha_pattern": alpha_pattern}

    def __call__(self, name: str) -> LoraSpec:
        return dataclasses.replace(self.spec, r=pattern_value(self.patterns["lora.rank_pattern"], name, self.spec.r),
                                   alpha=pattern_value(self.patterns["lora.alpha_pattern"], name, self.spec.alpha))

    def check_names(self, names: list[str]) -> None:
        """A key that matches no wrapped module is a typo (PEFT ignores it: the run would silently
        train every module at the default rank)."""
        for key, pattern in self.patterns.items():
            for k in pattern:
                if names and not any(pattern_value({k: True}, n, False) for n in names):
                    raise UserError(f"config key '{key}': {k!r} matches none of the {len(names)} LoRA target modules "
                                    f"(such as {names[0]}); a key matches the end of a full module name")


def per_module(spec: LoraSpec, rank_pattern: dict | None = None, alpha_pattern: dict | None = None) -> SpecFor:
    """`spec`, or with rank / alpha patterns a PerModule giving each full module name its own."""
    if not rank_pattern and not alpha_pattern:
        return spec
    return PerModule(spec, rank_pattern or {}, alpha_pattern or {})


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def inject(model: nn.Module, targets: str | Sequence[str], spec: SpecFor) -> list[str]:
    """Freeze the whole model and wrap each target in a LoRALinear. Returns the wrapped names.

    `spec` is one LoraSpec for every target, or a function giving each full module name its own
    (per-module rank and alpha, as PEFT's rank_pattern / alpha_pattern)."""
    spec_for = spec if callable(spec) else (lambda _name: spec)
    names = resolve_targets(model, targets)
    for name in names:
        if isinstance(model.get_submodule(name), LoRALinear):
            raise UserError(f"module {name} already has a LoRA adapter")
    if isinstance(spec, PerModule):
        spec.check_names(names)
    specs = {name: spec_for(name) for name in names}  # every spec is checked before the model changes
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))  # tied weights: > 1
    for name in names:
        base = model.get_submodule(name)
        check_base(specs[name].init, specs[name].r, base, name)
        if mutates_base(specs[name].init) and uses[id(getattr(base, "weight", None))] > 1:
            raise UserError(f"config key 'lora.init': {specs[name].init} would rewrite {name}'s weight, which is "
                            f"shared (tied) with another module such as the input embeddings; leave {name} out "
                            f"of lora.targets or use another init")
    model.requires_grad_(False)  # only the LoRA factors created below will train
    seed = torch.initial_seed()  # the run's seed (set_seed before the model is built)
    for name in names:
        layer = LoRALinear(model.get_submodule(name), specs[name])
        seed_factors(layer.lora_A.weight, specs[name].init, seed, name)  # each module's start: (seed, name)
        set_submodule(model, name, layer)
    return names


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the trainable LoRA tensors, keyed by module path, e.g.
    'model.layers.0.self_attn.q_proj.lora_A.weight' (and '...lora_magnitude_vector' for DoRA)."""
    sd = {}
    for name, m in lora_modules(model):
        sd[f"{name}.lora_A.weight"] = m.lora_A.weight.detach()
        sd[f"{name}.lora_B.weight"] = m.lora_B.weight.detach()
        if m.spec.use_dora:
            sd[f"{name}.lora_magnitude_vector"] = m.lora_magnitude_vector.detach()
    return sd


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Copy LoRA factors into an injected model. Strict: every key, and only those, with equal shapes."""
    own = lora_state_dict(model)
    missing, unexpected = sorted(own.keys() - sd.keys()), sorted(sd.keys() - own.keys())
    if missing or unexpected:
        parts = ([f"missing {len(missing)} key(s), e.g. {missing[0]}"] if missing else []) + \
                ([f"unexpected {len(unexpected)} key(s), e.g. {unexpected[0]}"] if unexpected else [])
        raise UserError("LoRA weights do not match the model: " + "; ".join(parts))
    for key, target in own.items():
        if tuple(sd[key].shape) != tuple(target.shape):
            raise UserError(f"LoRA weight {key} has shape {tuple(sd[key].shape)} but the model needs "
                            f"{tuple(target.shape)}")
    for key, target in own.items():
        target.copy_(sd[key])  # casts dtype and moves device as needed


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total). Shared (tied) tensors count once; a quantized layer counts as in*out
    (+ bias) logical weights, whatever its packed storage holds."""
    seen: set[int] = set()
    trainable = total = 0
    for m in model.modules():
        if is_quantized(m) and not isinstance(m, LoRALinear):
            for t in list(m.parameters()) + list(m.buffers()):
                seen.add(id(t))
            bias = getattr(m, "bias", None)
            total += m.in_features * m.out_features + (bias.numel() if isinstance(bias, torch.Tensor) else 0)
    for p in model.parameters():  # already deduplicated by identity, so tied weights count once
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total

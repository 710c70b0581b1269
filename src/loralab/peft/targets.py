"""Which modules LoRA wraps: presets (presets.py), PEFT-style name lists, or a regular expression,
resolved against a model's actual linear layers (nn.Linear, quantized stand-ins, and GPT-2's Conv1D,
a linear layer with its weight stored transposed)."""
from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .layout import is_conv1d
from .lora import LoRALinear, is_quantized
from .names import suffix_match
from .presets import TARGET_PRESETS, WITH_HEAD


@torch.no_grad()
def _computes_linear(m: nn.Linear) -> bool:
    """An nn.Linear, or a subclass whose own forward still computes x W^T + b (Falcon's); not one that returns
    something else (Phi-MoE's and Llama 4's routers return tuples: LoRA's sum would break them)."""
    if type(m).forward is nn.Linear.forward:
        return True
    x = torch.linspace(-1, 1, 2 * m.in_features, device=m.weight.device).reshape(2, -1).to(m.weight.dtype)
    try:
        y = m(x)
    except Exception:  # noqa: BLE001 - a forward that takes other inputs is not a linear layer to wrap
        return False
    return isinstance(y, torch.Tensor) and y.shape == (2, m.out_features) and \
        torch.allclose(y.float(), F.linear(x, m.weight, m.bias).float(), rtol=1e-3, atol=1e-3)


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Linear-like modules by full name (LoRALinear counts as one; its inner layers are hidden)."""
    found: dict[str, nn.Module] = {}
    wrapped: list[str] = []
    for name, m in model.named_modules():
        if any(name.startswith(w + ".") for w in wrapped):
            continue
        if isinstance(m, LoRALinear):
            wrapped.append(name)
            found[name] = m
        elif (isinstance(m, nn.Linear) and _computes_linear(m)) or is_quantized(m) or is_conv1d(m):
            found[name] = m
    return found


def visible_module_names(model: nn.Module) -> list[str]:
    """All module names as a model without LoRA would have them (PEFT matches against these)."""
    wrapped = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    return [n for n, _ in model.named_modules() if n and not any(n.startswith(w + ".") for w in wrapped)]


def _output_layer_names(model: nn.Module, linear: dict[str, nn.Module]) -> set[str]:
    try:
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        head = None
    if head is None:  # not an HF model (or no head): fall back to the conventional name
        return {n for n in linear if n.rpartition(".")[2] == "lm_head"}
    return {n for n, m in linear.items() if m is head}


def resolve_targets(model: nn.Module, targets: str | Sequence[str]) -> list[str]:
    """Full names of the modules to wrap, in model order.

    `targets` is one of:
      - a preset name from presets.TARGET_PRESETS ("qv", "attn", "mlp", "all-linear", "all-linear+head");
      - a list of names, each matching a module whose full dotted name equals it or ends with
        "." + it: short names ("q_proj"), partial paths ("self_attn.q_proj") or full names;
      - any other single string: a regular expression that must match a linear module's whole
        dotted name (re.fullmatch), e.g. r"model\\.layers\\.[01]\\..*_proj".
    The last two are exactly PEFT's `target_modules` semantics, so its configs resolve the same.
    """
    linear = linear_modules(model)
    heads = _output_layer_names(model, linear)
    body_names = sorted({n.rpartition(".")[2] for n in linear if n not in heads})
    available = ", ".join(body_names) or "(none)"
    if heads:
        available += " (output layer: " + ", ".join(sorted(h.rpartition(".")[2] for h in heads)) + ")"

    if isinstance(targets, str) and targets in TARGET_PRESETS and TARGET_PRESETS[targets] is None:
        chosen = {n for n in linear if n not in heads or targets == WITH_HEAD}
    elif isinstance(targets, str) and targets not in TARGET_PRESETS:
        try:
            pattern = re.compile(targets)
        except re.error as e:
            raise UserError(f"LoRA target {targets!r} is not a preset ({', '.join(TARGET_PRESETS)}) "
                            f"nor a valid regular expression: {e}") from None
        chosen = {n for n in linear if pattern.fullmatch(n)}
        if not chosen:
            raise UserError(f"unknown LoRA target {targets!r} (a single string is a preset or a regex over full "
                            f"module names; use a list for short names); the model's linear modules are: {available}")
    else:
        entries = TARGET_PRESETS[targets] if isinstance(targets, str) else list(targets)
        if not entries:
            raise UserError("LoRA targets are empty")
        all_modules = dict(model.named_modules())
        visible = visible_module_names(model)
        chosen = set()
        for entry in entries:
            if not isinstance(entry, str) or not entry:
                raise UserError(f"LoRA target {entry!r} must be a non-empty module name")
            hits = [n for n in visible if suffix_match(n, entry)]
            if not hits:
                raise UserError(f"unknown LoRA target {entry!r}; the model's linear modules are: {available}")
            bad = [n for n in hits if n not in linear]
            if bad:
                raise UserError(f"LoRA target {entry!r} matches {bad[0]} ({type(all_modules[bad[0]]).__name__}), "
                                f"which is not a linear layer; the model's linear modules are: {available}")
            chosen.update(hits)
    if not chosen:
        raise UserError(f"LoRA targets {targets!r} select no module; the model's linear modules are: {available}")
    return [n for n in linear if n in chosen]

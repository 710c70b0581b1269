"""Every change loralab makes to how a loaded model computes, as named converters applied in one place.

A converter says whether it applies to a model (`check`: None, or the reason it does not, from the model's
structure alone: no forward of the real model) and changes the model (`apply`). Before any converter
touches the loaded model, those that apply are run on a tiny twin of it (twin.py: the same classes, its
sliding windows, soft-capping, extra norms and biases kept) and must give the untouched twin's loss and
gradients on every layout they touch (probe.py); a converter whose private torch / transformers names are
missing, whose check fails, or whose probe differs declines with its reason. `model.converters` chooses:
`auto` (all that pass), `off` (the model as transformers computes it), or a list of names. Every run
prints one line naming what applied and what declined (`Report.line`), and summary.json records it.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from . import attention, mlp, norm, rebuild
from .head import SELECTED_HEAD, body_and_head
from .prefix_cache import full_attention_only
from .shared_prefix import MASKED_KINDS

REPORT = "_loralab_converters"          # on the model: its Report, once converted
PACKED_ROWS = "_loralab_packed_rows"      # on the model: packed rows (restarting positions) keep examples apart
SHARED_PREFIX = "_loralab_shared_prefix"  # on the model: a shared prefix's 4D mask gives each example's logits


@dataclass(frozen=True)
class Target:
    """Where and how the converted model will run."""
    device: torch.device = torch.device("cpu")
    attn_implementation: str = "auto"  # model.attn_implementation as configured


@dataclass(frozen=True)
class Converter:
    name: str
    does: str                                              # one line: what it changes
    check: Callable[[nn.Module, Target], str | None]       # None where it applies, else why not
    apply: Callable[[nn.Module, Target], None]
    needs: tuple[str, ...] = ()                            # private names it relies on: "module:attr.attr"
    after: tuple[str, ...] = ()                            # converters it builds on


def _has(kind: str, found: int) -> str | None:
    return None if found else f"no {kind} in this model"


def _cpu_auto(model, target: Target) -> str | None:
    if target.device.type != "cpu":
        return f"on {target.device.type} attention runs as loaded"
    if target.attn_implementation != "auto":
        return f"model.attn_implementation={target.attn_implementation}"
    return None


def _set(attr: str):
    return lambda model, target: setattr(model, attr, True)


def _use_cpu_attention(model, target: Target) -> None:
    attention.register()
    setattr(model, attention._AUTO_ATTR, True)
    attention.attention_for_rows(model, 1)  # the short-row choice until a batch says otherwise


def _shared_prefix_check(model, target) -> str | None:
    if not full_attention_only(model.config):
        return "sliding-window or linear-attention layers (a prefix's distance to each example's tokens would change)"
    if model.config._attn_implementation not in MASKED_KINDS:
        return f"{model.config._attn_implementation} attention takes no 4D mask"
    return None


def _selected_head_check(model, target) -> str | None:
    return None if body_and_head(model) is not None else "no separate decoder body and output layer"


CONVERTERS = (
    Converter("lean_rmsnorm", "RMSNorm keeps its input in the compute dtype and has a closed-form backward",
              lambda m, t: _has("Llama-style RMSNorm", len(norm.lean_norms(m))),
              lambda m, t: norm.use_lean_rmsnorm(m)),
    Converter("lean_swiglu", "SwiGLU keeps gate and up only; down_proj's input is rebuilt in backward",
              lambda m, t: _has("SwiGLU MLP", len(mlp.lean_mlps(m))), lambda m, t: mlp.use_lean_swiglu(m)),
    Converter("rebuilt_inputs", "attention's input (the first norm's output) rebuilt in backward, not kept",
              lambda m, t: _has("decoder layer with self_attn and input_layernorm", len(rebuild.attention_layers(m))),
              lambda m, t: rebuild.rebuild_attention_inputs(m),
              needs=("torch._C._autograd:_top_saved_tensors_default_hooks",), after=("lean_rmsnorm",)),
    Converter("packed_rows", "examples packed end to end in rows, position ids restarting at each",
              lambda m, t: None, _set(PACKED_ROWS)),
    Converter("cpu_attention", "on the CPU, attention per micro batch: a packed row's examples as blocks, "
              "short bf16 rows recomputed in backward", _cpu_auto, _use_cpu_attention,
              needs=("transformers.masking_utils:AttentionMaskInterface", "transformers.masking_utils:eager_mask",
                     "transformers.integrations.sdpa_attention:sdpa_attention_forward"),
              after=("packed_rows",)),
    Converter("shared_prefix", "the first tokens a micro batch's examples share, held once per row",
              _shared_prefix_check, _set(SHARED_PREFIX), needs=("transformers.cache_utils:DynamicCache",)),
    Converter("selected_head", "the output layer only on labelled positions, its logits never kept",
              _selected_head_check, _set(SELECTED_HEAD)),
)
NAMES = tuple(c.name for c in CONVERTERS)


def missing_name(needs: tuple[str, ...]) -> str | None:
    """The first of `needs` ("module:attr.attr") this installation lacks, or None."""
    for need in needs:
        module, _, attrs = need.partition(":")
        try:
            obj = importlib.import_module(module)
            for a in attrs.split("."):
                obj = getattr(obj, a)
        except (ImportError, AttributeError):
            return need.replace(":", ".")
    return None


@dataclass
class Report:
    applied: list[str] = field(default_factory=list)
    declined: dict[str, str] = field(default_factory=dict)  # name -> reason

    def line(self) -> str:
        out = "model rewrites: " + (", ".join(self.applied) or "none")
        if self.declined:
            out += "; declined: " + "; ".join(f"{n} ({why})" for n, why in self.declined.items())
        return out

    def as_dict(self) -> dict:
        return {"applied": list(self.applied), "declined": dict(self.declined)}


def chosen(choice) -> list[str]:
    """model.converters as the converters' names, in their order (config.py validates the names)."""
    if choice == "auto":
        return list(NAMES)
    if choice in ("off", None, False):
        return []
    return [n for n in NAMES if n in set(choice)]


def _apply_all(model, converters: list[Converter], target: Target) -> None:
    for c in converters:
        c.apply(model, target)


_PROBED: dict = {}  # (model class, config, converters, target) -> the probe's answer: a process converts alike once


def _probe_once(model, converters: list[Converter], target: Target) -> str | None:
    from .probe import probe

    try:
        key = (type(model), model.config.to_json_string(use_diff=False), tuple(c.name for c in converters), target)
    except Exception:  # noqa: BLE001 - a config that does not serialise is probed every time
        key = None
    if key is None or key not in _PROBED:
        why = probe(model, lambda twin: _apply_all(twin, converters, target), {c.name for c in converters})
        if key is None:
            return why
        _PROBED[key] = why
    return _PROBED[key]


def convert(model: nn.Module, choice="auto", target: Target | None = None) -> Report:
    """Apply the chosen converters that pass their check and the probe; returns what applied and why the
    others declined. Converters not chosen are not mentioned."""
    target = target or Target()
    report, ok = Report(), []
    names = chosen(choice)
    for c in (c for c in CONVERTERS if c.name in names):
        missing = missing_name(c.needs)
        lacking = [a for a in c.after if a not in {o.name for o in ok}]
        why = (f"needs {missing}, which this torch / transformers lacks" if missing
               else f"needs {lacking[0]}" if lacking else c.check(model, target))
        if why:
            report.declined[c.name] = why
        else:
            ok.append(c)
    if ok and _probe_once(model, ok, target) is not None:
        passed: list[Converter] = []  # one at a time, each on top of those that passed: name the culprit
        for c in ok:
            if any(a not in {p.name for p in passed} for a in c.after):
                report.declined[c.name] = f"needs {c.after[0]}"
                continue
            why = _probe_once(model, passed + [c], target)
            if why:
                report.declined[c.name] = why
            else:
                passed.append(c)
        ok = passed
    setattr(model, SELECTED_HEAD, False)  # unless it applies: the loss takes the model's own logits, unchecked
    _apply_all(model, ok, target)
    report.applied = [c.name for c in ok]
    report.declined = {c.name: report.declined[c.name] for c in CONVERTERS if c.name in report.declined}
    setattr(model, REPORT, report)
    return report


def converted(model: nn.Module, attr: str) -> bool:
    """Whether a converter that marks the model with `attr` applied (PACKED_ROWS, SHARED_PREFIX)."""
    return bool(getattr(model, attr, False))

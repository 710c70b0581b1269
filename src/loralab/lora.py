"""Our LoRA engine: wrap frozen linear layers with a trainable low-rank update.

    y = base(x) + (B @ A) x * (alpha / r)        A: r x in (Kaiming-uniform), B: out x r (zeros)

B starts at zero, so an injected model computes exactly what the base did until it trains.
The base may be an nn.Linear or a quantized stand-in (anything with in_features, out_features,
forward and `dequantize() -> (out, in) tensor`); the LoRA factors stay in their own dtype (fp32
by default) so small updates are not rounded away in a bf16/4-bit base.
"""
from __future__ import annotations

import math
import re
from typing import Iterator, Sequence

import torch
from torch import nn
import torch.nn.functional as F

from .errors import UserError

# Name-based presets use Llama-style short names; None marks the structural presets, which find
# every linear layer whatever the architecture calls it.
TARGET_PRESETS: dict[str, list[str] | None] = {
    "qv": ["q_proj", "v_proj"],
    "attn": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mlp": ["gate_proj", "up_proj", "down_proj"],
    "all-linear": None,        # every linear layer except the output layer (lm_head)
    "all-linear+head": None,   # ... and the output layer too
}


def _is_quantized(m: nn.Module) -> bool:
    return callable(getattr(m, "dequantize", None)) and hasattr(m, "in_features") and hasattr(m, "out_features")


class FastDropout(nn.Dropout):
    """nn.Dropout with a 4x cheaper mask on the CPU.

    On the CPU, drawing one random number per element dominates a LoRA step (the bernoulli kernel
    draws ~100M numbers/s; 210 LoRA inputs per step on the default model). Here each 64-bit draw is
    split into four 16-bit uniforms: the same independent Bernoulli(1 - p) mask, with p rounded to a
    multiple of 1/65536. On CUDA the RNG is cheap and torch's own kernel is used.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        n = x.numel()
        bits = torch.randint(-2**63, 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
        uniform16 = bits.view(torch.int16)[:n].view(x.shape)  # each value uniform on [-32768, 32767]
        keep = uniform16 >= round(self.p * 65536) - 32768
        return x * (keep.to(x.dtype) * (1.0 / (1.0 - self.p)))


class LoRALinear(nn.Module):
    """A frozen `base` linear layer plus a trainable rank-`r` update scaled by alpha / r."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float,
                 lora_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha = r, alpha
        self.scaling = alpha / r
        self.quantized = _is_quantized(base)
        anchor = next(iter(list(base.parameters()) + list(base.buffers())), None)
        device = anchor.device if anchor is not None else None
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=lora_dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=lora_dtype)
        # The standard LoRA init (as PEFT's default): A random, B zero -> the update starts at 0.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = FastDropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_dtype = lora_dtype
        self.merged = False

    # Deliberately no `weight` attribute: code doing F.linear(x, m.weight) would silently skip LoRA.

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        # Dropout acts on the LoRA input only, so the frozen path is deterministic.
        h = self.lora_dropout(x)
        if x.dtype == self.lora_dtype:
            return torch.add(y, self.lora_B(self.lora_A(h)).to(y.dtype), alpha=self.scaling)
        # A bf16 activation meets fp32 factors: cast the two small factors (r x in, out x r) to the
        # activation's dtype rather than the large activation to fp32 (as autocast would). The
        # factors stay fp32 masters: their gradients flow back through the cast in fp32.
        a = self.lora_A.weight.to(x.dtype)
        b = (self.lora_B.weight * self.scaling).to(x.dtype)
        return y + F.linear(F.linear(h, a), b).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A in fp32, shaped like the base weight (out, in)."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into base.weight in place (fp32 math, cast back). Idempotent."""
        if self.quantized:
            raise UserError("cannot merge LoRA into a quantized layer in place; use merge_and_unload(model), "
                            "which writes a dequantized weight")
        if not self.merged:
            w = self.base.weight
            w.copy_(w.float() + self.delta_weight().to(w.device))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update again (exact in fp32; within rounding for bf16 bases). Idempotent."""
        if self.merged:
            w = self.base.weight
            w.copy_(w.float() - self.delta_weight().to(w.device))
            self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}, merged={self.merged}"


# ----------------------------------------------------------------------------------------------
# Finding targets

def _linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Linear-like modules by full name (LoRALinear counts as one; its inner layers are hidden)."""
    found: dict[str, nn.Module] = {}
    wrapped: list[str] = []
    for name, m in model.named_modules():
        if any(name.startswith(w + ".") for w in wrapped):
            continue
        if isinstance(m, LoRALinear):
            wrapped.append(name)
            found[name] = m
        elif isinstance(m, nn.Linear) or _is_quantized(m):
            found[name] = m
    return found


def _visible_module_names(model: nn.Module) -> list[str]:
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


def _suffix_match(name: str, entry: str) -> bool:
    # PEFT's list semantics: the full name, or a tail of it starting at a dot boundary.
    return name == entry or name.endswith("." + entry)


def resolve_targets(model: nn.Module, targets: str | Sequence[str]) -> list[str]:
    """Full names of the modules to wrap, in model order.

    `targets` is one of:
      - a preset name from TARGET_PRESETS ("qv", "attn", "mlp", "all-linear", "all-linear+head");
      - a list of names, each matching a module whose full dotted name equals it or ends with
        "." + it: short names ("q_proj"), partial paths ("self_attn.q_proj") or full names;
      - any other single string: a regular expression that must match a linear module's whole
        dotted name (re.fullmatch), e.g. r"model\\.layers\\.[01]\\..*_proj".
    The last two are exactly PEFT's `target_modules` semantics, so its configs resolve the same.
    """
    linear = _linear_modules(model)
    heads = _output_layer_names(model, linear)
    body_names = sorted({n.rpartition(".")[2] for n in linear if n not in heads})
    available = ", ".join(body_names) or "(none)"
    if heads:
        available += " (output layer: " + ", ".join(sorted(h.rpartition(".")[2] for h in heads)) + ")"

    if isinstance(targets, str) and targets in TARGET_PRESETS and TARGET_PRESETS[targets] is None:
        chosen = {n for n in linear if n not in heads or targets == "all-linear+head"}
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
        visible = _visible_module_names(model)
        chosen = set()
        for entry in entries:
            if not isinstance(entry, str) or not entry:
                raise UserError(f"LoRA target {entry!r} must be a non-empty module name")
            hits = [n for n in visible if _suffix_match(n, entry)]
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


# ----------------------------------------------------------------------------------------------
# Injecting, inspecting, saving state

def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _check_hparams(r, alpha, dropout) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise UserError(f"config key 'lora.r' must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise UserError(f"config key 'lora.alpha' must be > 0, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise UserError(f"config key 'lora.dropout' must be in [0, 1), got {dropout!r}")


def inject(model: nn.Module, targets: str | Sequence[str], r: int = 8, alpha: float = 16, dropout: float = 0.05,
           lora_dtype: torch.dtype = torch.float32) -> list[str]:
    """Freeze the whole model and wrap each target in a LoRALinear. Returns the wrapped names."""
    _check_hparams(r, alpha, dropout)
    names = resolve_targets(model, targets)
    for name in names:
        if isinstance(model.get_submodule(name), LoRALinear):
            raise UserError(f"module {name} already has a LoRA adapter")
    model.requires_grad_(False)  # only the LoRA factors created below will train
    for name in names:
        _set_submodule(model, name, LoRALinear(model.get_submodule(name), r, alpha, dropout, lora_dtype))
    return names


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """(full name, module) for every LoRALinear, in model order."""
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            yield name, m


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA factors, keyed by module path, e.g. 'model.layers.0.self_attn.q_proj.lora_A.weight'."""
    sd = {}
    for name, m in lora_modules(model):
        sd[f"{name}.lora_A.weight"] = m.lora_A.weight.detach()
        sd[f"{name}.lora_B.weight"] = m.lora_B.weight.detach()
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
        if _is_quantized(m) and not isinstance(m, LoRALinear):
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


# ----------------------------------------------------------------------------------------------
# Merging

def _shared_weight(model: nn.Module, m: LoRALinear) -> bool:
    w = getattr(m.base, "weight", None)
    return w is not None and sum(p is w for _, p in model.named_parameters(remove_duplicate=False)) > 1


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight in place (unmerge() undoes it)."""
    for name, m in lora_modules(model):
        if _shared_weight(model, m):  # e.g. an lm_head tied to the input embeddings
            raise UserError(f"cannot merge LoRA into {name} in place: its weight is shared (tied) with another "
                            f"module; use merge_and_unload(model)")
        m.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    for _, m in lora_modules(model):
        m.unmerge()
    return model


@torch.no_grad()
def merge_and_unload(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every LoRALinear by a plain nn.Linear holding base + scaling * B @ A.

    Quantized bases are dequantized (never re-quantized). The new weight's dtype is `dtype` if given,
    else the base's compute dtype (its weight dtype, or a quantized layer's `compute_dtype`/output).
    """
    untied_head = False
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, m in list(lora_modules(model)):
        base = m.base
        if m.quantized:
            w = base.dequantize()
            out_dtype = dtype or getattr(base, "compute_dtype", None) or w.dtype
        else:
            w = base.weight
            out_dtype = dtype or w.dtype
            untied_head |= m is head and _shared_weight(model, m)
        weight = w.detach().to(torch.float32, copy=True)  # fresh storage: never alias a tied/old weight
        if not m.merged:  # a merged plain base already contains the update
            weight += m.delta_weight().to(weight.device)
        bias = getattr(base, "bias", None)
        with torch.device("meta"):  # skip the pointless random init of a layer we overwrite
            linear = nn.Linear(m.in_features, m.out_features, bias=bias is not None)
        linear.weight = nn.Parameter(weight.to(out_dtype), requires_grad=False)
        if bias is not None:
            linear.bias = nn.Parameter(bias.detach().to(out_dtype, copy=True), requires_grad=False)
        _set_submodule(model, name, linear)
    if untied_head and getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False  # the head now has its own merged weight; keep it on save
    return model

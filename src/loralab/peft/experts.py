"""LoRA on fused MoE expert weights (`lora.target_parameters`), computing what PEFT's ParamWrapper does.

transformers keeps a mixture-of-experts block's experts as 3-D parameters of one module
(`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`), read inside its forward; no nn.Linear to wrap.
PEFT's `LoraConfig(target_parameters=[...])` reaches them, and this module does the same:

  - matching: an entry names a parameter by its full dotted name or a dotted tail of it
    ("experts.gate_up_proj"), as PEFT matches `target_parameters`;
  - factors per parameter of shape (E, d1, d2): in/out features are (d2, d1), or (d1, d2) when the
    experts module says `is_transposed` (gpt-oss stores x @ W); A is (r*E, in), B is (out, r*E);
    expert e's update is B[:, e::E] @ A[e*r:(e+1)*r] (B's columns strided, A's rows in blocks, PEFT's
    layout), so each expert has its own rank-r update, scaled by alpha/r (rsLoRA: alpha/sqrt(r));
    the factors stay fp32 over a bf16 base, as LoRALinear's do, and are cast to W's dtype to apply;
  - forward: the experts module runs with W + scaling * B_e @ A_e in place of W (one baddbmm over
    the experts, in W's dtype), so whatever the module does with W (its experts implementation,
    grouped or looped) sees the update; no dropout (PEFT refuses lora_dropout != 0 here: the input
    of each expert is not visible from outside the module);
  - saved keys: PEFT nests one wrapper per parameter, in the module's registration order, so the
    k-th of n targeted parameters of a module is saved under `<module>` + ".base_layer" * (n-1-k).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call

from ..errors import UserError
from .lora import LoRALinear, LoraSpec, lora_modules
from .names import pattern_value, suffix_match

KEY = "config key 'lora.target_parameters'"
PLAIN_INITS = ("kaiming", "gaussian")


class LoRAExperts(nn.Module):
    """A frozen experts module plus one rank-r-per-expert update for each of its targeted 3-D parameters."""

    is_lora_layer = True  # peft.lora.lora_disabled switches it off

    def __init__(self, base: nn.Module, specs: dict[str, LoraSpec]):
        super().__init__()
        self.base = base
        order = [n for n, _ in base.named_parameters(recurse=False)]
        self.names = [n for n in order if n in specs]  # registration order: PEFT's nesting order
        self.specs = dict(specs)
        self.transposed = bool(getattr(base, "is_transposed", False))
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.merged = False
        for name in self.names:
            spec = specs[name]
            w = getattr(base, name)
            w.requires_grad_(False)
            experts, d1, d2 = w.shape
            fan_in, fan_out = (d1, d2) if self.transposed else (d2, d1)
            a = torch.empty(spec.r * experts, fan_in, device=w.device, dtype=spec.dtype)
            if spec.init == "gaussian":
                nn.init.normal_(a, std=1 / spec.r)  # PEFT: 1/r, r per expert
            else:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # nn.Linear's (and PEFT's default) init
            self.lora_A[name] = nn.Parameter(a)
            self.lora_B[name] = nn.Parameter(torch.zeros(fan_out, spec.r * experts, device=w.device,
                                                         dtype=spec.dtype))

    def num_experts(self, name: str) -> int:
        return getattr(self.base, name).shape[0]

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(lhs, rhs) with the update of expert e = scaling * lhs[e] @ rhs[e], shaped like W[e]."""
        e = self.num_experts(name)
        a = self.lora_A[name].reshape(e, -1, self.lora_A[name].shape[-1])                    # (E, r, in)
        b = self.lora_B[name].reshape(self.lora_B[name].shape[0], -1, e).permute(2, 0, 1)  # (E, out, r)
        return (a.transpose(-2, -1), b.transpose(-2, -1)) if self.transposed else (b, a)

    def delta(self, name: str) -> torch.Tensor:
        """scaling * the update of every expert, fp32, shaped like the parameter."""
        lhs, rhs = self.factors(name)
        return torch.bmm(lhs.float(), rhs.float()) * self.specs[name].scaling

    def updated(self, name: str) -> torch.Tensor:
        w = getattr(self.base, name)
        lhs, rhs = self.factors(name)
        # in W's dtype with autocast off, as PEFT folds it: an autocast region must not change W's dtype
        with torch.autocast(device_type=w.device.type, enabled=False):
            return torch.baddbmm(w, lhs.to(w.dtype), rhs.to(w.dtype), alpha=self.specs[name].scaling)

    def forward(self, *args, **kwargs):
        if self.merged:
            return self.base(*args, **kwargs)
        return functional_call(self.base, {n: self.updated(n) for n in self.names}, args, kwargs, strict=False)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold every update into its parameter in place (fp32 math, cast back). Idempotent."""
        if not self.merged:
            for n in self.names:
                w = getattr(self.base, n)
                w.copy_(w.float() + self.delta(n))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            for n in self.names:
                w = getattr(self.base, n)
                w.copy_(w.float() - self.delta(n))
            self.merged = False

    def extra_repr(self) -> str:
        parts = [f"{n}: r={s.r}, alpha={s.alpha:g}, experts={self.num_experts(n)}" for n, s in self.specs.items()]
        return "; ".join(parts) + f", merged={self.merged}"


def expert_modules(model: nn.Module):
    """(full name, LoRAExperts) in model order."""
    for name, m in model.named_modules():
        if isinstance(m, LoRAExperts):
            yield name, m


def _hidden(name: str, wrappers: list[str]) -> bool:
    return any(name.startswith(w + ".") for w in wrappers)


def visible_parameters(model: nn.Module) -> dict[str, tuple[str, str, torch.Tensor]]:
    """Every parameter by the name it has without loralab's wrappers (PEFT matches these):
    full name -> (the module holding it, its own name, the tensor)."""
    wrappers = [n for n, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAExperts))]
    out = {}
    for mod_name, m in model.named_modules():
        if isinstance(m, LoRAExperts):
            for p_name, p in m.base.named_parameters(recurse=False):
                out[f"{mod_name}.{p_name}"] = (mod_name, p_name, p)
        elif not _hidden(mod_name, wrappers):
            for p_name, p in m.named_parameters(recurse=False):
                full = f"{mod_name}.{p_name}" if mod_name else p_name
                out[full] = (mod_name, p_name, p)
    return out


def fused_expert_names(model: nn.Module) -> list[str]:
    """Full names of the 3-D parameters a module holds itself: fused expert weights, which no
    nn.Linear target reaches."""
    return [n for n, (_, _, p) in visible_parameters(model).items() if p.ndim == 3]


def _short_list(names: list[str]) -> str:
    short = sorted({".".join(n.split(".")[-2:]) for n in names})
    return ", ".join(short) or "(none)"


def resolve_parameters(model: nn.Module, entries: list[str]) -> list[str]:
    """Full names of the parameters `entries` target (PEFT's suffix match), in model order; every
    entry must match, and only 3-D parameters outside LoRA-wrapped linears."""
    params = visible_parameters(model)
    fused = _short_list([n for n, (_, _, p) in params.items() if p.ndim == 3])
    linear_wrapped = {n for n, m in lora_modules(model)}
    chosen = set()
    for entry in entries:
        if not isinstance(entry, str) or not entry:
            raise UserError(f"{KEY}: {entry!r} must be a non-empty parameter name")
        hits = [n for n in params if suffix_match(n, entry)]
        if not hits:
            raise UserError(f"{KEY}: {entry!r} matches no parameter of the model; its fused expert weights are: "
                            f"{fused}")
        for n in hits:
            mod_name, _, p = params[n]
            if p.ndim != 3:
                raise UserError(f"{KEY}: {entry!r} matches {n} of shape {tuple(p.shape)}; only 3-D fused expert "
                                f"weights are targeted this way (the model's: {fused}); use lora.targets for "
                                f"linear layers")
            if not mod_name or mod_name in linear_wrapped:
                raise UserError(f"{KEY}: {n} cannot be targeted (it sits in "
                                f"{'the top-level model' if not mod_name else 'a module lora.targets wraps'})")
        chosen.update(hits)
    return [n for n in params if n in chosen]


def _check_spec(spec: LoraSpec, name: str) -> None:
    if spec.dropout:
        raise UserError(f"{KEY}: expert LoRA has no dropout (as PEFT's target_parameters); set lora.dropout=0 "
                        f"(got {spec.dropout:g} for {name})")
    if spec.use_dora:
        raise UserError(f"{KEY}: DoRA (lora.use_dora) does not apply to fused expert weights (PEFT refuses it too)")
    if spec.init not in PLAIN_INITS:
        raise UserError(f"{KEY}: lora.init={spec.init} does not apply to fused expert weights "
                        f"(use {' or '.join(PLAIN_INITS)})")


def inject_experts(model: nn.Module, entries: list[str], spec) -> list[str]:
    """Wrap the experts modules holding the targeted parameters. `spec`: one LoraSpec, or a function
    of the full parameter name (rank_pattern / alpha_pattern apply to it, as in PEFT). Returns the
    targeted full parameter names. Freezes the base model; LoRA factors already injected keep training."""
    if not entries:
        return []
    spec_for = spec if callable(spec) else (lambda _name: spec)
    names = resolve_parameters(model, list(entries))
    params = visible_parameters(model)
    by_module: dict[str, dict[str, LoraSpec]] = {}
    for n in names:
        mod_name, p_name, _ = params[n]
        s = spec_for(n)
        _check_spec(s, n)
        by_module.setdefault(mod_name, {})[p_name] = s
    for mod_name in by_module:
        if isinstance(model.get_submodule(mod_name), LoRAExperts):
            raise UserError(f"{KEY}: {mod_name} already has expert LoRA")
    keep = [p for _, m in lora_modules(model) for p in m.parameters() if p.requires_grad]
    model.requires_grad_(False)
    for p in keep:
        p.requires_grad_(True)
    for mod_name, specs in by_module.items():
        parent, _, child = mod_name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child,
                LoRAExperts(model.get_submodule(mod_name), specs))
    return names


def per_parameter(spec: LoraSpec, rank_pattern: dict | None, alpha_pattern: dict | None):
    """`spec` with PEFT's rank_pattern / alpha_pattern applied to each full parameter name."""
    import dataclasses

    return lambda name: dataclasses.replace(spec, r=pattern_value(rank_pattern or {}, name, spec.r),
                                            alpha=pattern_value(alpha_pattern or {}, name, spec.alpha))


# ---------------------------------------------------------------------------------------------
# PEFT's key names, both ways

def peft_paths(model: nn.Module) -> dict[str, str]:
    """Full parameter name -> the module path PEFT saves its factors under (nested wrappers)."""
    out = {}
    for mod_name, m in expert_modules(model):
        for k, n in enumerate(m.names):
            out[f"{mod_name}.{n}"] = mod_name + ".base_layer" * (len(m.names) - 1 - k)
    return out


def expert_tensors(model: nn.Module, weights: dict | None = None) -> dict[str, tuple]:
    """Full parameter name -> (PEFT module path, A, B, LoraSpec). `weights` (by the model's parameter
    names) replaces the factors: a sharded model's, gathered whole."""
    paths = peft_paths(model)
    out = {}
    for mod_name, m in expert_modules(model):
        if m.merged:
            raise ValueError(f"save_adapter: {mod_name} is merged; unmerge before saving the adapter")
        for n in m.names:
            a, b = m.lora_A[n], m.lora_B[n]
            if weights is not None:
                a = weights.get(f"{mod_name}.lora_A.{n}", a)
                b = weights.get(f"{mod_name}.lora_B.{n}", b)
            out[f"{mod_name}.{n}"] = (paths[f"{mod_name}.{n}"], a, b, m.specs[n])
    return out


def expected_shapes(model: nn.Module, names: list[str], rank_of) -> dict[str, tuple]:
    """PEFT key (without its prefix) -> shape, for the parameters `names` once wrapped at ranks rank_of(name)."""
    params = visible_parameters(model)
    by_module: dict[str, list[str]] = {}
    for n in names:
        by_module.setdefault(params[n][0], []).append(params[n][1])
    out = {}
    for mod_name, wanted in by_module.items():
        m = model.get_submodule(mod_name)
        base = m.base if isinstance(m, LoRAExperts) else m
        order = [p for p, _ in base.named_parameters(recurse=False) if p in wanted]
        transposed = bool(getattr(base, "is_transposed", False))
        for k, p in enumerate(order):
            experts, d1, d2 = getattr(base, p).shape
            fan_in, fan_out = (d1, d2) if transposed else (d2, d1)
            r = rank_of(f"{mod_name}.{p}") * experts
            path = mod_name + ".base_layer" * (len(order) - 1 - k)
            out[f"{path}.lora_A.weight"] = (r, fan_in)
            out[f"{path}.lora_B.weight"] = (fan_out, r)
    return out


def target_parameters_for(model: nn.Module, names: list[str]) -> list[str]:
    """A target_parameters list that makes PEFT wrap exactly `names` in a fresh base: their last two
    name parts ("experts.gate_up_proj") when those catch nothing else, else the full names."""
    if not names:
        return []
    short = sorted({".".join(n.split(".")[-2:]) for n in names})
    caught = {n for n in visible_parameters(model) if any(suffix_match(n, s) for s in short)}
    return short if caught == set(names) else list(names)


@torch.no_grad()
def load_expert_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy PEFT-keyed factors (prefix removed) into the model's LoRAExperts; shapes checked by the caller."""
    paths = peft_paths(model)
    for mod_name, m in expert_modules(model):
        for n in m.names:
            path = paths[f"{mod_name}.{n}"]
            m.lora_A[n].copy_(weights[f"{path}.lora_A.weight"])
            m.lora_B[n].copy_(weights[f"{path}.lora_B.weight"])


# ---------------------------------------------------------------------------------------------
# Folding in, and what all-linear leaves out

@torch.no_grad()
def unload_experts(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every LoRAExperts by its experts module with the update added to each fused weight
    (fp32 math; the weight's dtype kept, or `dtype`): a plain transformers model again."""
    for mod_name, m in list(expert_modules(model)):
        m.merge()
        if dtype is not None:
            for n in m.names:
                getattr(m.base, n).data = getattr(m.base, n).data.to(dtype)
        parent, _, child = mod_name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, m.base)
    return model


def all_linear_note(model: nn.Module, targets, target_parameters: list) -> str | None:
    """One line when lora.targets=all-linear leaves fused expert weights without LoRA (none targeted)."""
    if not isinstance(targets, str) or not targets.startswith("all-linear"):
        return None
    covered = set(resolve_parameters(model, target_parameters)) if target_parameters else set()
    left = [n for n in fused_expert_names(model) if n not in covered]
    if not left:
        return None
    return (f"lora.targets={targets} wraps linear layers only; this model's fused expert weights "
            f"({_short_list(left)}, {len(left)} tensors) get no LoRA unless listed in lora.target_parameters, "
            f"e.g. lora.target_parameters=[{_short_list(left).replace(' ', '')}] lora.dropout=0")


def add_expert_lora(model: nn.Module, lora_cfg, spec) -> list[str]:
    """A run's expert LoRA (lora.target_parameters; `spec` as inject's: rank and alpha patterns apply
    to full parameter names), after the linear targets are injected. Returns the log's warning lines."""
    note = all_linear_note(model, lora_cfg.targets, lora_cfg.target_parameters)
    inject_experts(model, lora_cfg.target_parameters, spec)
    return [f"warning: {note}"] if note else []

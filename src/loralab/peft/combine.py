"""Combining LoRA adapters into one (`loralab combine`), computed as PEFT's `add_weighted_adapter`
computes it, from the adapter folders alone (no base model is loaded).

For each module, with w_i the weight given to adapter i and s_i its scaling:
  cat              A = [w_1 s_1 A_1 ; w_2 s_2 A_2 ...], B = [B_1 | B_2 ...]: exactly sum_i w_i dW_i, rank sum r_i
  svd              sum_i w_i dW_i (dW_i = s_i B_i A_i), truncated to rank R by SVD: B = U_R S_R, A = V_R^T
                   (from the stacked factors, never the dense update: _low_rank_svd)
  linear           A = sum_i c_i A_i, B = sum_i |c_i| B_i with c_i = sign(w_i s_i) sqrt|w_i s_i|: the factors
                   mixed, not the updates (cross terms B_i A_j included), as PEFT does; equal ranks only
  ties             each factor: keep the top `density` share by magnitude, elect a sign per entry (the
                   larger summed mass), average the weighted entries that agree with it
  dare_linear      each factor: keep entries at random with probability `density`, rescale by 1/density, sum
  dare_ties        DARE's random pruning, then TIES's sign election
  magnitude_prune  TIES's pruning without the sign election: a weighted sum
The combined adapter has scaling 1 (lora_alpha = r per module). Modules present in only some
adapters combine those. DARE draws its masks from a generator seeded by `seed`, module by module
in name order, A factors then B factors, adapter by adapter (PEFT draws from the global RNG in the
same order within a module). PEFT keeps the first adapter's use_rslora with alpha = r, which
rescales the result by sqrt(r); the combined adapter here is always plain (use_rslora false).
"""
from __future__ import annotations

import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from .adapter_files import (
    CONFIG_NAME,
    check_config,
    earlier_stage,
    module_names,
    read_adapter_config,
    read_weights,
    write_adapter,
)
from .lora import LoraSpec
from .presets import COMBINE_METHODS as METHODS
from .presets import NEEDS_DENSITY


@dataclass
class Source:
    """One input adapter: its folder, weight, config and per-module (A, B, scaling)."""
    folder: Path
    weight: float
    config: object
    modules: dict


def _read_source(folder: str | os.PathLike, weight: float) -> Source:
    folder = Path(folder)
    raw = read_adapter_config(folder)
    cfg = check_config(raw, folder / CONFIG_NAME)
    if cfg.use_dora:
        raise UserError(f"{folder}: a DoRA adapter cannot be combined (its magnitude vectors rescale whole rows; "
                        f"they do not add); merge it instead")
    if cfg.parameters:
        raise UserError(f"{folder}: LoRA on fused expert weights (target_parameters) cannot be combined yet; "
                        f"merge it instead")
    if cfg.init != "kaiming":
        raise UserError(f"{folder}: init_lora_weights={raw.get('init_lora_weights')!r}: its A and B apply to a base "
                        f"the init changed; save it converted (PEFT: path_initial_model_for_weight_conversion)")
    if (first := earlier_stage(folder)) is not None:
        raise UserError(f"{folder}: a staged run's adapter applies on top of {first} merged into the base; "
                        f"its update does not add to other adapters of the plain base")
    weights = read_weights(folder)
    modules = {}
    for name in module_names(weights):
        a, b = weights.get(f"{name}.lora_A.weight"), weights.get(f"{name}.lora_B.weight")
        if a is None or b is None or a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise UserError(f"{folder}: module {name} lacks a matching lora_A / lora_B pair")
        modules[name] = (a.float(), b.float(), cfg.spec(name, str(folder)).scaling)
    return Source(folder, float(weight), cfg, modules)


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


# --- the merge rules, on stacked task tensors ---------------------------------------------------

def _weighted(tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    stacked = torch.stack(tensors)
    return stacked * weights.view(-1, *([1] * (stacked.dim() - 1)))


def _top_share(t: torch.Tensor, density: float) -> torch.Tensor:
    """t with all but its int(density * numel) largest-magnitude entries zeroed."""
    if density >= 1:
        return t
    keep = torch.zeros(t.numel(), dtype=t.dtype)
    keep[torch.topk(t.abs().reshape(-1), k=int(density * t.numel()), largest=True).indices] = 1
    return t * keep.view(t.shape)


def _random_share(t: torch.Tensor, density: float, gen: torch.Generator) -> torch.Tensor:
    """DARE: each entry kept with probability density, rescaled by 1 / density."""
    if density >= 1:
        return t
    return t * torch.bernoulli(torch.full_like(t, density), generator=gen) / density


def _sign_elected(tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """TIES: per entry, the sign of the summed (unweighted) values wins; the weighted values of
    that sign are averaged (entries pruned to zero have no sign and do not count)."""
    stacked = torch.stack(tensors)
    majority = torch.where(stacked.sum(dim=0) >= 0, 1.0, -1.0)
    agree = stacked.sign() == majority
    return (_weighted(tensors, weights) * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1.0)


def _merge_factor(method: str, tensors: list[torch.Tensor], weights: torch.Tensor, density: float | None,
                  gen: torch.Generator) -> torch.Tensor:
    if method == "linear":
        return _weighted(tensors, weights).sum(dim=0)
    if method in ("ties", "magnitude_prune"):
        pruned = [_top_share(t, density) for t in tensors]
    else:
        pruned = [_random_share(t, density, gen) for t in tensors]
    if method in ("ties", "dare_ties"):
        return _sign_elected(pruned, weights)
    return _weighted(pruned, weights).sum(dim=0)


def _combine_module(method, parts, density, svd_rank, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """parts: [(A, B, scaling, weight)] of the adapters holding this module -> (A, B) at scaling 1."""
    if method == "cat":
        return (torch.cat([a * w * s for a, _, s, w in parts], dim=0), torch.cat([b for _, b, _, _ in parts], dim=1))
    if method == "svd":
        return _low_rank_svd(parts, svd_rank)
    ws = [w * s for _, _, s, w in parts]
    wa = torch.tensor([math.copysign(math.sqrt(abs(x)), x) for x in ws])
    wb = torch.tensor([math.sqrt(abs(x)) for x in ws])
    a = _merge_factor(method, [p[0] for p in parts], wa, density, gen)
    b = _merge_factor(method, [p[1] for p in parts], wb, density, gen)
    return a, b


def _low_rank_svd(parts, svd_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-`svd_rank` SVD truncation of sum_i w_i s_i B_i A_i, from the factors alone.

    The sum is B_cat @ A_cat with B_cat = [w_1 s_1 B_1 | ...] (out x R) and A_cat = [A_1 ; ...]
    (R x in), R = sum r_i. With B_cat = Q_b R_b and A_cat^T = Q_a R_a it is Q_b (R_b R_a^T) Q_a^T,
    so the SVD of the small R x R core, rotated back by Q_b and Q_a, is the SVD of the dense out x in
    update, without ever forming it: O((out + in) R^2) instead of O(out x in x min(out, in))."""
    # float64: the factors are thin, so the precision is cheap, and a truncation is sensitive to it
    b_cat = torch.cat([b.double() * (w * s) for _, b, s, w in parts], dim=1)
    a_cat = torch.cat([a.double() for a, *_ in parts], dim=0)
    q_b, r_b = torch.linalg.qr(b_cat)
    q_a, r_a = torch.linalg.qr(a_cat.T)
    u, sv, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    k = min(svd_rank, sv.numel())
    a, b = (q_a @ vh[:k].T).T, (q_b @ u[:, :k]) * sv[:k]
    # The dense SVD returned min(out, in) components; beyond R they carry zero singular values. Pad
    # with zero rows / columns so a requested --svd-rank above R still gives that rank.
    pad = min(svd_rank, b_cat.shape[0], a_cat.shape[1]) - k
    if pad > 0:
        a = torch.cat([a, a.new_zeros(pad, a.shape[1])])
        b = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1)
    return a.to(parts[0][0].dtype), b.to(parts[0][0].dtype)


def _target_modules(sources: list[Source], names: list[str]):
    """What PEFT would write: the union of the inputs' target lists, or their regexes joined; a
    full-name regex when neither rule is exact (mixed kinds, or PEFT's 'all-linear')."""
    targets = [s.config.targets for s in sources]
    if all(isinstance(t, list) for t in targets) and all(s.config.layers is None for s in sources):
        return sorted(set().union(*targets)), None
    if all(isinstance(t, str) and t != "all-linear" for t in targets):
        return "|".join(f"({t})" for t in targets), None
    return "(?:" + "|".join(re.escape(n) for n in names) + ")", None


def combine_adapters(adapters: list[tuple[str | os.PathLike, float]], out_dir: str | os.PathLike, *,
                     method: str = "svd", density: float | None = None, svd_rank: int | None = None,
                     seed: int = 0, threads: int | None = None, progress: bool = False) -> Path:
    """Combine adapter folders with weights into one PEFT adapter folder at `out_dir`. Returns it.

    Everything is read and checked before anything is written; an existing non-empty `out_dir`
    is refused, so nothing already there is damaged. threads: torch's CPU threads for the
    arithmetic (default: torch's own choice); progress: a bar on stderr, module by module."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads <= 0):
        raise UserError(f"--threads must be a positive integer, got {threads!r}")
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _combine(adapters, out_dir, method, density, svd_rank, seed, progress)
    finally:
        torch.set_num_threads(before)  # a library call leaves the caller's setting as it found it


def _combine(adapters, out_dir, method, density, svd_rank, seed, progress) -> Path:
    if method not in METHODS:
        raise UserError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if not adapters:
        raise UserError("combine needs at least one --adapter DIR:WEIGHT")
    if method in NEEDS_DENSITY and (density is None or not 0 < density <= 1):
        raise UserError(f"--density must be in (0, 1] for {method}, got {density!r}")
    if svd_rank is not None and (isinstance(svd_rank, bool) or svd_rank <= 0):
        raise UserError(f"--svd-rank must be a positive integer, got {svd_rank!r}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: exists and is not an empty folder; choose a new output folder")
    sources = [_read_source(folder, w) for folder, w in adapters]
    if len(sources) == 1:
        method = "linear"  # as PEFT: one adapter is only weighted
    names = sorted(set().union(*(s.modules for s in sources)), key=_natural)
    if method == "svd":
        svd_rank = svd_rank or max(max(a.shape[0] for a, _, _ in s.modules.values()) for s in sources)
    gen = torch.Generator().manual_seed(seed)
    modules = {}
    from tqdm import tqdm

    bar = tqdm(names, desc="combine", unit="module", file=sys.stderr, disable=not progress or len(names) < 2,
               leave=False)
    for name in bar:
        parts = [(*s.modules[name], s.weight) for s in sources if name in s.modules]
        shapes = {(a.shape[1], b.shape[0]) for a, b, _, _ in parts}
        if len(shapes) > 1:
            raise UserError(f"combine: module {name} has different shapes in the adapters ({sorted(shapes)}): "
                            f"were they trained on different bases?")
        ranks = {a.shape[0] for a, *_ in parts}
        if method not in ("cat", "svd") and len(ranks) > 1:
            raise UserError(f"combine: --method {method} needs equal ranks, module {name} has {sorted(ranks)}; "
                            f"use cat or svd")
        a, b = _combine_module(method, parts, density, svd_rank, gen)
        r = a.shape[0]
        modules[name] = (a.contiguous(), b.contiguous(), LoraSpec(r=r, alpha=r, dropout=sources[0].config.dropout),
                         None)
    targets, layers = _target_modules(sources, names)
    base = sources[0].config.raw.get("base_model_name_or_path") or ""
    return write_adapter(out, modules, target_modules=targets, layers_to_transform=layers,
                         base_model_name_or_path=base,
                         fan_in_fan_out=any(s.config.raw.get("fan_in_fan_out", False) for s in sources))


def parse_adapter_arg(text: str) -> tuple[str, float]:
    """'DIR:WEIGHT' -> (DIR, WEIGHT); a bare DIR has weight 1."""
    folder, sep, weight = text.rpartition(":")
    if sep:
        try:
            return folder, float(weight)
        except ValueError:
            pass
    return text, 1.0

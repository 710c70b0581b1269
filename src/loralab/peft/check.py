"""`loralab check ADAPTER_DIR`: which runtimes load an adapter folder as it is, and why not.

The rules, from each runtime's loader:
  loralab   this package's loader (adapter_files.check_config and the weight names).
  PEFT      PeftModel.from_pretrained: every LoRA setting loralab writes. use_dora needs PEFT >= 0.9,
            use_rslora >= 0.7.
  vLLM      vllm/lora/peft_helper.py reads r, lora_alpha, use_rslora, use_dora, modules_to_save and
            bias, and refuses DoRA, modules_to_save and adapter bias. It scales every module by the
            top-level lora_alpha / r (or / sqrt(r)), so per-module rank or alpha (rank_pattern /
            alpha_pattern) would be scaled wrongly. The server needs --max-lora-rank >= the rank.
  GGUF      llama.cpp's convert_lora_to_gguf.py keeps lora_A / lora_B tensors and one lora_alpha;
            llama.cpp scales each tensor by alpha / its rank. It stops at any other tensor (DoRA's
            magnitudes, modules_to_save, biases), and it cannot hold rsLoRA's alpha / sqrt(r) or a
            per-module alpha unless the scale is folded into B first. Per-module rank is fine.
An adapter saved unconverted after a PiSSA / OLoRA init applies to a base the init changed: only
PEFT and loralab, which redo the init, load it. LoRA on fused expert weights (target_parameters,
PEFT >= 0.17) is loaded by PEFT and loralab; loralab's GGUF export has no mapping for it, and vLLM's
reading of it is not checked here, so both say no. A staged run's adapter (model.adapter; a
loralab_stage.json beside it) applies to the base with the earlier adapter merged in: only loralab
merges that by itself.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError
from .adapter_files import CONFIG_NAME, MAGNITUDE, check_config, earlier_stage, read_adapter_config, read_weights

RUNTIMES = ("loralab", "PEFT", "vLLM", "GGUF (llama.cpp)")


def _off(cfg: dict, key: str) -> bool:
    return cfg.get(key) in (None, False, [], {}, "none")


def runtime_support(adapter_dir: str | os.PathLike) -> list[dict]:
    """One row per runtime: {runtime, loads: bool, why: str}."""
    folder = Path(adapter_dir)
    cfg = read_adapter_config(folder)
    weights = read_weights(folder)  # also refuses pickled adapter_model.bin files
    rows = []
    try:
        check_config(cfg, folder / CONFIG_NAME)
        bad = [k for k in weights if not k.endswith((".lora_A.weight", ".lora_B.weight", "." + MAGNITUDE))]
        ours = (False, f"weight {bad[0]} is not a LoRA factor") if bad else (True, "")
    except UserError as e:
        ours = (False, str(e).split(": ", 1)[-1])
    rows.append(("loralab", *ours))

    init = cfg.get("init_lora_weights", True)
    unconverted = isinstance(init, str) and init != "gaussian"
    if cfg.get("peft_type", "LORA") != "LORA":
        rows.append(("PEFT", True, f"a {cfg.get('peft_type')} adapter (not checked further)"))
    else:
        notes = [n for n, on in (("use_dora needs PEFT >= 0.9", cfg.get("use_dora")),
                                 ("use_rslora needs PEFT >= 0.7", cfg.get("use_rslora")),
                                 ("target_parameters needs PEFT >= 0.17", cfg.get("target_parameters")),
                                 (f"redoes the {init} init on the base when loading" + (
                                     " (randomized: not reproducible)" if "niter" in str(init) else ""), unconverted))
                 if on]
        rows.append(("PEFT", True, "; ".join(notes)))

    ranks = [t.shape[0] for k, t in weights.items() if k.endswith(".lora_A.weight")]
    vllm = [why for why, bad in (
        ("DoRA (use_dora) is refused", cfg.get("use_dora")),
        ("LoRA on fused expert weights (target_parameters) is not checked for vLLM", cfg.get("target_parameters")),
        ("modules_to_save is refused", not _off(cfg, "modules_to_save")),
        ("adapter bias is refused", not _off(cfg, "bias") or cfg.get("lora_bias")),
        ("per-module rank / alpha: one scale lora_alpha / r is applied to every module",
         not _off(cfg, "rank_pattern") or not _off(cfg, "alpha_pattern")),
        (f"init_lora_weights={init!r}: A and B apply to a base the init changed", unconverted)) if bad]
    rows.append(("vLLM", not vllm, "; ".join(vllm) or (f"needs --max-lora-rank >= {max(ranks)}" if ranks else "")))

    gguf = [why for why, bad in (
        ("DoRA's magnitude vectors are not LoRA tensors", cfg.get("use_dora")),
        ("LoRA on fused expert weights (target_parameters) has no GGUF mapping", cfg.get("target_parameters")),
        ("modules_to_save / bias tensors are refused",
         not _off(cfg, "modules_to_save") or not _off(cfg, "bias") or cfg.get("lora_bias")),
        ("rsLoRA's alpha / sqrt(r) cannot be stored (one lora_alpha, applied as alpha / r): fold the scale into B",
         cfg.get("use_rslora")),
        ("a per-module alpha cannot be stored (one lora_alpha): fold the scale into B", not _off(cfg, "alpha_pattern")),
        (f"init_lora_weights={init!r}: A and B apply to a base the init changed", unconverted)) if bad]
    rows.append(("GGUF (llama.cpp)", not gguf, "; ".join(gguf)))
    if (first := _stage(folder)) is not None:  # only loralab merges the earlier stage by itself
        why = f"it applies on top of {first} merged into the base (a staged run): merge that first"
        rows = [(n, ok, w) if n == "loralab" else (n, False, "; ".join(filter(None, [w, why]))) for n, ok, w in rows]
    return [{"runtime": n, "loads": ok, "why": why} for n, ok, why in rows]


def _stage(folder: Path):
    try:
        return earlier_stage(folder)
    except UserError as e:
        return f"a missing earlier stage ({e})"


def format_table(adapter_dir, rows: list[dict]) -> str:
    width = max(len(r["runtime"]) for r in rows)
    lines = [f"loralab check: {adapter_dir}", f"  {'runtime':<{width}}  loads as is  notes"]
    for r in rows:
        lines.append(f"  {r['runtime']:<{width}}  {'yes' if r['loads'] else 'no ':<11}  {r['why'] or '-'}")
    return "\n".join(lines)

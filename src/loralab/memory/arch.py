"""A decoder's shape and exact parameter counts from its Hugging Face config.json alone (no weights).

Llama / Mistral / Qwen2 style: embeddings, per layer RMSNorm + q/k/v/o with GQA head counts + RMSNorm
+ SwiGLU gate/up/down, final norm, lm_head unless tied. Configs come from a bundled name (config
data only, shipped in loralab/bundled/configs), an HF model folder, or a config.json file.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import UserError
from ..peft.names import pattern_value, suffix_match
from ..peft.presets import LLAMA_LINEARS, OUTPUT_LAYER, TARGET_PRESETS, llama_modules


def bundled_names() -> list[str]:
    folder = resources.files("loralab") / "bundled" / "configs"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json"))


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read model config ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a model config must be a JSON object")
    return data


def resolve_model_config(spec: str) -> dict:
    """A bundled name (llama-2-7b...), an HF model folder, or a path to a config.json -> the config dict."""
    spec = str(spec)
    if spec in bundled_names():
        return json.loads((resources.files("loralab") / "bundled" / "configs" / f"{spec}.json").read_text())
    p = Path(spec).expanduser()
    if p.is_dir() and (p / "config.json").is_file():
        return _read_json(p / "config.json")
    if p.is_file() and p.suffix == ".json":
        return _read_json(p)
    raise UserError(f"unknown model '{spec}': not a bundled config ({', '.join(bundled_names())}), "
                    "an HF model folder with config.json, or a config.json file")


@dataclass(frozen=True)
class Arch:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    inter: int
    vocab: int
    tied: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int, bool]]:
        """Per-layer linear layers: name -> (in_features, out_features, has_bias)."""
        H, Q, K, I = self.hidden, self.q_dim, self.kv_dim, self.inter
        return {"q_proj": (H, Q, self.qkv_bias), "k_proj": (H, K, self.qkv_bias), "v_proj": (H, K, self.qkv_bias),
                "o_proj": (Q, H, self.o_bias), "gate_proj": (H, I, self.mlp_bias), "up_proj": (H, I, self.mlp_bias),
                "down_proj": (I, H, self.mlp_bias)}


def arch_from_config(cfg: dict) -> Arch:
    if "hidden_size" not in cfg and isinstance(cfg.get("text_config"), dict):
        cfg = cfg["text_config"]  # multimodal wrappers nest the language model's config
    need = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    missing = [k for k in need if not isinstance(cfg.get(k), int) or cfg[k] <= 0]
    if missing:
        raise UserError(f"model config lacks {', '.join(missing)}: only Llama/Mistral/Qwen2-style decoders "
                        f"are supported (model_type {cfg.get('model_type', '?')!r})")
    heads = cfg["num_attention_heads"]
    qkv_bias = bool(cfg.get("attention_bias", cfg.get("model_type") == "qwen2"))  # Qwen2 has q/k/v biases
    return Arch(hidden=cfg["hidden_size"], layers=cfg["num_hidden_layers"], heads=heads,
                kv_heads=cfg.get("num_key_value_heads") or heads,
                head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads, inter=cfg["intermediate_size"],
                vocab=cfg["vocab_size"], tied=bool(cfg.get("tie_word_embeddings", False)), qkv_bias=qkv_bias,
                o_bias=bool(cfg.get("attention_bias", False)), mlp_bias=bool(cfg.get("mlp_bias", False)))


def target_names(targets) -> tuple[str, ...]:
    if isinstance(targets, str):
        if targets not in TARGET_PRESETS:
            raise UserError(f"targets must be one of {', '.join(TARGET_PRESETS)} or a list of module names, "
                            f"got {targets!r}")
        return llama_modules(targets)
    names = tuple(str(t).rpartition(".")[2] for t in targets)
    bad = [n for n in names if n not in LLAMA_LINEARS + (OUTPUT_LAYER,)]
    if bad or not names:
        raise UserError(f"unknown LoRA target(s) {', '.join(bad) or '(none)'}: "
                        f"known {', '.join(LLAMA_LINEARS)}, {OUTPUT_LAYER}")
    return names


def count_params(model_config: dict, targets="all-linear", r: int = 8) -> dict:
    """Exact parameter counts from the config: total (tied embeddings once), its parts, and the LoRA
    parameters r x (in + out) of each targeted module."""
    a = arch_from_config(model_config)
    lin = a.linears()
    per_layer_linear = sum(i * o + (o if b else 0) for i, o, b in lin.values())
    embed = a.vocab * a.hidden
    head = 0 if a.tied else a.vocab * a.hidden
    norms = (2 * a.layers + 1) * a.hidden
    names = target_names(targets)
    lora = sum(r * (lin[n][0] + lin[n][1]) for n in names if n != "lm_head") * a.layers
    if "lm_head" in names:
        lora += r * (a.hidden + a.vocab)
    return {"total": embed + head + norms + per_layer_linear * a.layers, "embedding": embed, "lm_head": head,
            "norms": norms, "layer_linears": per_layer_linear * a.layers, "lora": lora}


def expert_shapes(model_config: dict) -> tuple[dict[str, tuple[int, int, int]], list[int]]:
    """A mixture-of-experts decoder's fused expert weights from its config: (short name -> (experts,
    in_features, out_features) of each layer's gate_up_proj and down_proj, the layers that have them).
    ({}, []) for a dense model. Mixtral / gpt-oss: every layer; Qwen-MoE: decoder_sparse_step and
    mlp_only_layers say which."""
    cfg = model_config.get("text_config") if "hidden_size" not in model_config else model_config
    cfg = cfg if isinstance(cfg, dict) else {}
    experts = cfg.get("num_local_experts") or cfg.get("num_experts")
    if not isinstance(experts, int) or experts <= 0 or not isinstance(cfg.get("hidden_size"), int):
        return {}, []
    hidden, inter = cfg["hidden_size"], cfg.get("moe_intermediate_size") or cfg.get("intermediate_size")
    step, dense = cfg.get("decoder_sparse_step") or 1, set(cfg.get("mlp_only_layers") or [])
    layers = [i for i in range(cfg.get("num_hidden_layers", 0)) if i not in dense and (i + 1) % step == 0]
    return {"gate_up_proj": (experts, hidden, 2 * inter), "down_proj": (experts, inter, hidden)}, layers


def expert_lora_params(model_config: dict, target_parameters, r: int, rank_pattern: dict | None = None) -> list[int]:
    """LoRA parameters on fused expert weights per decoder layer, as PEFT's target_parameters makes
    them: rank r per expert, A (r*E, in) and B (out, r*E), i.e. r*E*(in + out) per targeted weight
    (rank_pattern by full name "model.layers.<i>.mlp.experts.<weight>")."""
    shapes, moe_layers = expert_shapes(model_config)
    per_layer = []
    for i in range(model_config.get("num_hidden_layers") or len(moe_layers)):
        total = 0
        for name, (experts, fan_in, fan_out) in shapes.items():
            full = f"model.layers.{i}.mlp.experts.{name}"
            if i in moe_layers and any(suffix_match(full, t) for t in target_parameters or ()):
                total += pattern_value(rank_pattern or {}, full, r) * experts * (fan_in + fan_out)
        per_layer.append(total)
    return per_layer

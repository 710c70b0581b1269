"""A decoder's shape and exact parameter counts from its Hugging Face config.json alone (no weights).

Llama / Mistral / Qwen2 style: embeddings, per layer RMSNorm + q/k/v/o with GQA head counts + RMSNorm
+ SwiGLU gate/up/down, final norm, lm_head unless tied. Mixture-of-experts kin (Mixtral, Qwen2-MoE,
Qwen3-MoE, OLMoE, gpt-oss): the sparse layers' MLP is a router (E x H, gpt-oss with a bias), E fused
experts of 3 x H x I (gpt-oss: with biases), and Qwen2-MoE's shared SwiGLU expert and its 1-wide gate;
Qwen3/OLMoE q/k norms, gpt-oss' attention sinks. GPT-2: learned positions, LayerNorms with biases,
Conv1D c_attn / c_proj / c_fc / c_proj with biases, tied head. Configs come from a bundled name (config
data only, shipped in loralab/bundled/configs), an HF model folder, or a config.json file.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import UserError
from ..peft.names import pattern_value, suffix_match
from ..peft.presets import OUTPUT_LAYER, TARGET_PRESETS, WITH_HEAD


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
    """A decoder's shape. Llama family (the default) or GPT-2 (`family`); a mixture-of-experts decoder
    has `experts` > 0 and names the layers whose MLP is the sparse block (`moe_layers`; the others keep a
    dense MLP of `inter`)."""
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
    family: str = "llama"
    model_type: str = "llama"
    experts: int = 0
    top_k: int = 0
    expert_inter: int = 0
    moe_layers: tuple[int, ...] = ()
    shared_inter: int = 0           # Qwen2-MoE: a dense SwiGLU beside the experts, and a 1-wide gate for it
    router_bias: bool = False       # gpt-oss
    expert_bias: bool = False       # gpt-oss: gate_up and down carry a bias per expert
    qk_norm: tuple[int, int] = (0, 0)  # q_norm / k_norm weights (Qwen3: per head_dim, OLMoE: over q / kv dim)
    sinks: bool = False             # gpt-oss: a learned attention sink per head, which SDPA cannot run
    positions: int = 0              # GPT-2: learned position embeddings
    norm_bias: bool = False         # GPT-2's LayerNorm
    resid_dropout: bool = False     # GPT-2's dropouts (0.1 by default), active while training
    attn_dropout: bool = False

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def prefix(self) -> str:
        return "transformer.h" if self.family == "gpt2" else "model.layers"

    def is_moe(self, layer: int) -> bool:
        return layer in self.moe_layers

    def linears(self, layer: int = 0) -> dict[str, tuple[int, int, bool]]:
        """Layer `layer`'s modules LoRA can wrap (nn.Linear, GPT-2's Conv1D): key -> (in_features,
        out_features, has_bias). Fused experts and routers are not among them: transformers 5 keeps
        them as bare parameters. Keys are short names, unique within a layer (paths() gives their place)."""
        H, Q, K, I = self.hidden, self.q_dim, self.kv_dim, self.inter
        if self.family == "gpt2":
            return {"attn.c_attn": (H, 3 * H, True), "attn.c_proj": (H, H, True), "mlp.c_fc": (H, I, True),
                    "mlp.c_proj": (I, H, True)}
        out = {"q_proj": (H, Q, self.qkv_bias), "k_proj": (H, K, self.qkv_bias), "v_proj": (H, K, self.qkv_bias),
               "o_proj": (Q, H, self.o_bias)}
        mlp = self.shared_inter if self.is_moe(layer) else I
        if mlp:
            out.update({"gate_proj": (H, mlp, self.mlp_bias), "up_proj": (H, mlp, self.mlp_bias),
                        "down_proj": (mlp, H, self.mlp_bias)})
        if self.is_moe(layer) and self.shared_inter:
            out["shared_expert_gate"] = (H, 1, False)
        return out

    def paths(self, layer: int = 0) -> dict[str, str]:
        """Each of linears(layer)'s keys -> its full module name."""
        mlp = "mlp.shared_expert" if self.is_moe(layer) and self.shared_inter else "mlp"
        place = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
                 "gate_proj": mlp, "up_proj": mlp, "down_proj": mlp, "shared_expert_gate": "mlp"}
        return {k: f"{self.prefix}.{layer}." + (k if self.family == "gpt2" else f"{place[k]}.{k}")
                for k in self.linears(layer)}

    def expert_params(self) -> dict[str, int]:
        """One MoE layer's router and experts (weights and biases), which no LoRA target wraps."""
        E, H, I = self.experts, self.hidden, self.expert_inter
        return {"router": E * H + (E if self.router_bias else 0),
                "experts": E * 3 * H * I + (E * (2 * I + H) if self.expert_bias else 0)}

    def layer_params(self, layer: int) -> dict[str, int]:
        """Layer `layer`'s parameters: its linears (weights and biases), its norms, and the rest."""
        lin = sum(i * o + (o if b else 0) for i, o, b in self.linears(layer).values())
        norms = 2 * self.hidden * (2 if self.norm_bias else 1) + sum(self.qk_norm)
        moe = self.expert_params() if self.is_moe(layer) else {"router": 0, "experts": 0}
        return {"linears": lin, "norms": norms, **moe, "sinks": self.heads if self.sinks else 0}


# Mixture-of-experts families whose blocks are modelled: their config's expert width key, whether they
# have a shared expert, and the expert intermediate widths autograd keeps per routed token (docs/memory.md).
MOE_FAMILIES = {"mixtral": ("intermediate_size", False, 3), "qwen2_moe": ("moe_intermediate_size", True, 3),
                "qwen3_moe": ("moe_intermediate_size", False, 3), "olmoe": ("intermediate_size", False, 3),
                "gpt_oss": ("intermediate_size", False, 6)}


def _positive(cfg: dict, keys, kind: str) -> None:
    missing = [k for k in keys if not isinstance(cfg.get(k), int) or cfg[k] <= 0]
    if missing:
        raise UserError(f"model config lacks {', '.join(missing)}: only Llama/Mistral/Qwen2-style decoders, "
                        f"their mixture-of-experts kin ({', '.join(MOE_FAMILIES)}) and GPT-2 are supported "
                        f"({kind}, model_type {cfg.get('model_type', '?')!r})")


def _gpt2(cfg: dict) -> Arch:
    _positive(cfg, ("n_embd", "n_layer", "n_head", "vocab_size", "n_positions"), "GPT-2")
    H, heads = cfg["n_embd"], cfg["n_head"]
    return Arch(hidden=H, layers=cfg["n_layer"], heads=heads, kv_heads=heads, head_dim=H // heads,
                inter=cfg.get("n_inner") or 4 * H, vocab=cfg["vocab_size"],
                tied=bool(cfg.get("tie_word_embeddings", True)), qkv_bias=True, o_bias=True, mlp_bias=True,
                family="gpt2", model_type="gpt2", positions=cfg["n_positions"], norm_bias=True,
                resid_dropout=cfg.get("resid_pdrop", 0.1) > 0, attn_dropout=cfg.get("attn_pdrop", 0.1) > 0)


def _moe_layers(cfg: dict) -> tuple[int, ...]:
    # Qwen-MoE: decoder_sparse_step and mlp_only_layers say which layers are sparse; others: every layer
    step, dense = cfg.get("decoder_sparse_step") or 1, set(cfg.get("mlp_only_layers") or [])
    return tuple(i for i in range(cfg["num_hidden_layers"]) if i not in dense and (i + 1) % step == 0)


def arch_from_config(cfg: dict) -> Arch:
    if "hidden_size" not in cfg and "n_embd" not in cfg and isinstance(cfg.get("text_config"), dict):
        cfg = cfg["text_config"]  # multimodal wrappers nest the language model's config
    kind = cfg.get("model_type")
    if kind == "gpt2":  # not its kin by key names alone (GPT-BigCode, GPT-Neo shape attention otherwise)
        return _gpt2(cfg)
    experts = cfg.get("num_local_experts") or cfg.get("num_experts") or 0
    if experts and kind not in MOE_FAMILIES:  # a dense reading would miss the experts: refuse, not undercount
        raise UserError(f"no memory model for the mixture-of-experts family {kind!r} (modelled: "
                        f"{', '.join(MOE_FAMILIES)})")
    need = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    _positive(cfg, need + (("num_experts_per_tok",) if experts else ()), "decoder")
    heads, H = cfg["num_attention_heads"], cfg["hidden_size"]
    head_dim = cfg.get("head_dim") or H // heads
    kv_heads = cfg.get("num_key_value_heads") or heads
    qkv_bias = bool(cfg.get("attention_bias", kind == "qwen2"))  # Qwen2 has q/k/v biases
    if kind == "qwen2_moe":
        qkv_bias = bool(cfg.get("qkv_bias", True))
    moe = {}
    if experts:
        width_key, shared, _ = MOE_FAMILIES[kind]
        _positive(cfg, (width_key,), kind)
        moe = dict(experts=experts, top_k=cfg["num_experts_per_tok"], expert_inter=cfg[width_key],
                   moe_layers=_moe_layers(cfg), shared_inter=(cfg.get("shared_expert_intermediate_size") or 0)
                   if shared else 0, router_bias=kind == "gpt_oss", expert_bias=kind == "gpt_oss",
                   sinks=kind == "gpt_oss")
    qk_norm = {"qwen3": (head_dim, head_dim), "qwen3_moe": (head_dim, head_dim),
               "olmoe": (heads * head_dim, kv_heads * head_dim)}.get(kind, (0, 0))
    return Arch(hidden=H, layers=cfg["num_hidden_layers"], heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                inter=cfg["intermediate_size"], vocab=cfg["vocab_size"],
                tied=bool(cfg.get("tie_word_embeddings", False)), qkv_bias=qkv_bias,
                o_bias=bool(cfg.get("attention_bias", False)), mlp_bias=bool(cfg.get("mlp_bias", False)),
                model_type=kind or "llama", qk_norm=qk_norm, **moe)


def lora_layers(a: Arch, targets) -> tuple[list[tuple[str, ...]], bool]:
    """What LoRA wraps for `targets` (a preset or PEFT-style names, as peft/targets.py resolves them):
    ([the keys of linears(i) wrapped in layer i], whether the output layer is). The structural presets
    take every linear a layer has; names match a full module name or a dotted tail of it, and a name
    matching nothing is an error, as it is when the model loads."""
    if isinstance(targets, str):
        if targets not in TARGET_PRESETS:
            raise UserError(f"targets must be one of {', '.join(TARGET_PRESETS)} or a list of module names, "
                            f"got {targets!r}")
        if TARGET_PRESETS[targets] is None:
            return [tuple(a.linears(i)) for i in range(a.layers)], targets == WITH_HEAD
        entries = list(TARGET_PRESETS[targets])
    else:
        entries = [str(t) for t in targets]
    layers = [tuple(k for k, path in a.paths(i).items() if any(suffix_match(path, e) for e in entries))
              for i in range(a.layers)]
    head = OUTPUT_LAYER in entries
    found = {k for keys in layers for k in keys}
    unknown = [e for e in entries if e != OUTPUT_LAYER and not any(
        suffix_match(path, e) for i in range(a.layers) for path in a.paths(i).values())]
    if unknown or not (found or head):
        known = sorted({k.rpartition(".")[2] for i in range(a.layers) for k in a.linears(i)})
        raise UserError(f"unknown LoRA target(s) {', '.join(unknown) or '(none)'}: the model's linear modules are "
                        f"{', '.join(known)} (output layer: {OUTPUT_LAYER})")
    return layers, head


def target_names(targets, a: Arch | None = None) -> tuple[str, ...]:
    """The keys LoRA wraps in any layer of `a` (default: a Llama-style decoder), and lm_head if targeted."""
    if a is None:
        a = Arch(hidden=1, layers=1, heads=1, kv_heads=1, head_dim=1, inter=1, vocab=1, tied=False,
                 qkv_bias=False, o_bias=False, mlp_bias=False)
    layers, head = lora_layers(a, targets)
    keys = [k for i in range(a.layers) for k in a.linears(i) if k in layers[i]]
    return tuple(dict.fromkeys(keys)) + ((OUTPUT_LAYER,) if head else ())


def count_params(model_config: dict, targets="all-linear", r: int = 8) -> dict:
    """Exact parameter counts from the config: total (tied embeddings once), its parts, and the LoRA
    parameters r x (in + out) of each targeted module (fused experts: expert_lora_params)."""
    a = arch_from_config(model_config)
    per_layer = [a.layer_params(i) for i in range(a.layers)]
    part = {k: sum(p[k] for p in per_layer) for k in ("linears", "norms", "router", "experts", "sinks")}
    embed = a.vocab * a.hidden
    head = 0 if a.tied else a.vocab * a.hidden
    norms = part["norms"] + a.hidden * (2 if a.norm_bias else 1)
    positions = a.positions * a.hidden
    layers, with_head = lora_layers(a, targets)
    lin = [a.linears(i) for i in range(a.layers)]
    lora = sum(r * (lin[i][k][0] + lin[i][k][1]) for i in range(a.layers) for k in layers[i])
    if with_head:
        lora += r * (a.hidden + a.vocab)
    total = embed + head + positions + norms + part["linears"] + part["router"] + part["experts"] + part["sinks"]
    # weights one token multiplies by: each MoE layer runs top_k of its experts (throughput.py's FLOPs)
    active = part["linears"] + part["router"] + (part["experts"] * a.top_k // a.experts if a.experts else 0)
    return {"total": total, "embedding": embed, "lm_head": head, "positions": positions, "norms": norms,
            "layer_linears": part["linears"], "routers": part["router"], "experts": part["experts"],
            "active_layer_weights": active, "lora": lora}


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


def expert_ranks(model_config: dict, target_parameters, r: int, rank_pattern: dict | None = None) -> list[dict]:
    """Per decoder layer, its fused expert weights LoRA targets (PEFT's target_parameters, suffix match)
    -> their rank (rank_pattern by full name "model.layers.<i>.mlp.experts.<weight>")."""
    shapes, moe_layers = expert_shapes(model_config)
    out = []
    for i in range(model_config.get("num_hidden_layers") or len(moe_layers)):
        ranks = {}
        for name in shapes if i in moe_layers else ():
            full = f"model.layers.{i}.mlp.experts.{name}"
            if any(suffix_match(full, t) for t in target_parameters or ()):
                ranks[name] = pattern_value(rank_pattern or {}, full, r)
        out.append(ranks)
    return out


def expert_lora_params(model_config: dict, target_parameters, r: int, rank_pattern: dict | None = None) -> list[int]:
    """LoRA parameters on fused expert weights per decoder layer, as PEFT's target_parameters makes
    them: rank r per expert, A (r*E, in) and B (out, r*E), i.e. r*E*(in + out) per targeted weight."""
    shapes, _ = expert_shapes(model_config)
    return [sum(k * shapes[n][0] * (shapes[n][1] + shapes[n][2]) for n, k in layer.items())
            for layer in expert_ranks(model_config, target_parameters, r, rank_pattern)]

"""Analytic peak-memory model of a fine-tuning run, from a Hugging Face config.json alone (no weights).

    peak = frozen_weights + trainable_weights + gradients + optimizer_state + activations + other

Decoder: Llama / Mistral / Qwen2 style (embeddings, per layer RMSNorm + q/k/v/o with GQA head counts
+ RMSNorm + SwiGLU gate/up/down, final norm, lm_head unless tied). Assumptions, in bytes:
  - frozen weights in the compute dtype (bf16: 2, fp32: 4). QLoRA: quantized linears at 4.127 bits
    per weight (NF4 in blocks of 64, double-quantized scales); embeddings, norms, lm_head stay 16-bit.
  - trainable weights fp32 (LoRA factors and full fine-tuning masters: 4 per parameter, plus a bf16
    autocast copy, 2, for full fine-tuning in bf16); gradients fp32 (4); optimizer state AdamW 8
    (two fp32 moments), SGD with momentum 4, 8-bit AdamW 2 (+ an fp32 absmax per 256 per moment).
  - activations saved for backward, per layer and token (b = 2 bf16 / 4 fp32):
      norms        2 x 4H      (each RMSNorm keeps an fp32 copy of its input)
      attention    SDPA/flash: q, k, v, output (2Q + 2K) x b + a logsumexp per head (fp32);
                   eager:      q, k, v per head (3Q x b) + scores heads x seq x (4 + 2 if bf16),
                               the fp32 softmax and its bf16 copy, i.e. quadratic in seq
      MLP          3I x b      (gate output, its SiLU, up output; frozen linears keep no input)
      LoRA         per target: its input twice (dropout mask + dropped input) x b, plus r x b
      QLoRA        bitsandbytes-style 4-bit matmuls also keep the input of every quantized linear
      full FT      inputs of every linear (2H + Q + I) x b and the normalised input of each norm
    With gradient checkpointing: each layer's input (H x b) plus one full layer being recomputed.
    Attention: SDPA on CUDA, eager on the CPU (loralab's default there, see models.pick_attention).
  - logits: rows x vocab x 12 (the saved fp32 log-softmax, its gradient, and the fp32 logits or their
    gradient: measured 12.0 on the CPU in bf16 and fp32), with rows = batch x seq (every position
    labelled, no chunking; loralab's own loss holds at most 1024 rows at once).
  - other: CUDA: the CUDA context + cuBLAS workspace (0.5 GB, typical, not calibrated here: the
    article's numbers are torch.cuda.max_memory_allocated, which excludes it). CPU: the Python,
    torch, transformers and tokenizer runtime in the peak RSS (370 MiB measured), plus heap slack:
    glibc keeps the forward pass's freed temporaries as holes between the saved tensors, 0.37-0.66 x
    the layers' saved bytes measured (0.45 used; with MALLOC_MMAP_THRESHOLD_=65536 it is ~0).
    See docs/memory.md and benchmarks/memory_estimate.py.
Everything is summed: the peak is taken as if activations, gradients and optimizer state coexist.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .errors import UserError

NF4_BITS = 4.127
CUDA_OTHER_BYTES = 0.5e9         # CUDA context + cuBLAS workspace (typical; no GPU here to calibrate)
CPU_RUNTIME_BYTES = 370 * 2**20  # RSS of the runtime after loading a model (measured, docs/memory.md)
CPU_HEAP_SLACK = 0.45            # glibc keeps freed forward temporaries as heap holes: RSS = saved x 1.45
LOSS_CHUNK_ROWS = 1024           # loralab.loss.CHUNK_ROWS: labelled rows whose logits exist at once

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TARGETS = {
    "qv": ("q_proj", "v_proj"),
    "attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
    "all-linear": LINEARS,
    "all-linear+head": LINEARS + ("lm_head",),
}
METHODS = ("lora", "qlora", "full")
OPTIMIZERS = {"adamw": 8.0, "sgd": 4.0, "adamw8bit": 2.0 + 2 * 4 / 256}  # state bytes per trainable param
PRECISIONS = {"bf16": 2, "fp32": 4}
DEVICES = ("cuda", "cpu")
GB = 1e9


# ---------------------------------------------------------------------------------------------
# Model configs

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


def _target_names(targets) -> tuple[str, ...]:
    if isinstance(targets, str):
        if targets not in TARGETS:
            raise UserError(f"targets must be one of {', '.join(TARGETS)} or a list of module names, got {targets!r}")
        return TARGETS[targets]
    names = tuple(str(t).rpartition(".")[2] for t in targets)
    bad = [n for n in names if n not in LINEARS + ("lm_head",)]
    if bad or not names:
        raise UserError(f"unknown LoRA target(s) {', '.join(bad) or '(none)'}: known {', '.join(LINEARS)}, lm_head")
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
    names = _target_names(targets)
    lora = sum(r * (lin[n][0] + lin[n][1]) for n in names if n != "lm_head") * a.layers
    if "lm_head" in names:
        lora += r * (a.hidden + a.vocab)
    return {"total": embed + head + norms + per_layer_linear * a.layers, "embedding": embed, "lm_head": head,
            "norms": norms, "layer_linears": per_layer_linear * a.layers, "lora": lora}


# ---------------------------------------------------------------------------------------------
# The estimate

def _check(method, optimizer, precision, device, attention, r, seq, batch) -> None:
    for key, value, allowed in (("method", method, METHODS), ("optimizer", optimizer, tuple(OPTIMIZERS)),
                                ("precision", precision, tuple(PRECISIONS)), ("device", device, DEVICES),
                                ("attention", attention, ("auto", "eager", "sdpa"))):
        if value not in allowed:
            raise UserError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")
    for key, value in (("r", r), ("seq", seq), ("batch", batch)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise UserError(f"{key} must be a positive integer, got {value!r}")


def _layer_bytes_per_token(a: Arch, *, b: int, seq: int, eager: bool, method: str, lora_names, r: int,
                           dropout: bool, quantized, saves_quant_inputs: bool) -> float:
    """Bytes one decoder layer keeps for backward, per token (see the module docstring)."""
    H, Q, K, I = a.hidden, a.q_dim, a.kv_dim, a.inter
    total = 2 * H * 4                                        # RMSNorms: fp32 copies of their inputs
    if eager:
        total += 3 * Q * b + a.heads * seq * (4 + (2 if b == 2 else 0))
    else:
        total += (2 * Q + 2 * K) * b + a.heads * 4
    total += 3 * I * b                                        # SwiGLU
    lin = a.linears()
    # Distinct linear inputs: q/k/v share the first norm's output, gate/up the second's.
    groups = {"attn_in": (("q_proj", "k_proj", "v_proj"), H), "o_in": (("o_proj",), Q),
              "mlp_in": (("gate_proj", "up_proj"), H), "down_in": (("down_proj",), I)}
    if method == "full":
        total += sum(width for _, width in groups.values()) * b + 2 * H * 4
    elif saves_quant_inputs:
        total += sum(width for mods, width in groups.values() if any(m in quantized for m in mods)) * b
    for n in lora_names:
        if n != "lm_head":
            total += lin[n][0] * b * (2 if dropout else 1) + r * b
    return total


def estimate(model_config: dict, *, method: str = "lora", r: int = 8, targets="all-linear", seq: int = 512,
             batch: int = 1, optimizer: str = "adamw", precision: str = "bf16", grad_checkpointing: bool = False,
             device: str = "cuda", attention: str = "auto", lora_dropout: float = 0.05, quantize: str = "all-linear",
             qlora_saves_inputs: bool = True, loss_rows: int | None = None, sgd_momentum: bool = True) -> dict:
    """Predicted peak memory (bytes) of one training step, with its breakdown. Pure arithmetic.

    method lora | qlora (NF4 base) | full; targets a preset (qv, attn, mlp, all-linear, all-linear+head)
    or module names; attention auto (SDPA on cuda, eager on cpu) | eager | sdpa; quantize which frozen
    linears QLoRA stores in NF4 (all-linear: every decoder linear, as QLoRA does; targets: only the
    LoRA-wrapped ones, loralab's default); qlora_saves_inputs: the 4-bit matmul keeps its input for
    backward (bitsandbytes does); loss_rows: logit rows alive at once (default batch x seq).
    """
    _check(method, optimizer, precision, device, attention, r, seq, batch)
    a = arch_from_config(model_config)
    names = () if method == "full" else _target_names(targets)
    params = count_params(model_config, names or "qv", r)
    b = PRECISIONS[precision]
    eager = attention == "eager" or (attention == "auto" and device == "cpu")
    tokens = batch * seq
    lin = a.linears()
    quantized = set()
    if method == "qlora":
        quantized = set(LINEARS) if quantize == "all-linear" else {n for n in names if n != "lm_head"}

    # Weights
    if method == "full":
        trainable = params["total"]
        frozen = 0.0
        trainable_bytes = trainable * (4 + (2 if precision == "bf16" else 0))  # fp32 master + autocast copy
    else:
        trainable = params["lora"]
        q_weights = sum(lin[n][0] * lin[n][1] for n in quantized) * a.layers
        frozen = (params["total"] - q_weights) * b + q_weights * NF4_BITS / 8
        trainable_bytes = trainable * 4
    grads = trainable * 4
    state = trainable * (OPTIMIZERS[optimizer] if optimizer != "sgd" or sgd_momentum else 0.0)

    # Activations
    per_token = _layer_bytes_per_token(a, b=b, seq=seq, eager=eager, method=method, lora_names=names, r=r,
                                       dropout=lora_dropout > 0, quantized=quantized,
                                       saves_quant_inputs=qlora_saves_inputs)
    if grad_checkpointing:
        layers_bytes = tokens * (a.layers * a.hidden * b + per_token)
    else:
        layers_bytes = tokens * a.layers * per_token
    rows = tokens if loss_rows is None else min(loss_rows, tokens)
    logits = rows * a.vocab * 12
    final_norm = tokens * a.hidden * 4
    activations = layers_bytes + logits + final_norm
    other = CUDA_OTHER_BYTES if device == "cuda" else CPU_RUNTIME_BYTES + CPU_HEAP_SLACK * layers_bytes

    breakdown = {"frozen_weights": frozen, "trainable_weights": trainable_bytes, "gradients": grads,
                 "optimizer_state": state, "activations": activations, "other": other}
    breakdown = {k: int(round(v)) for k, v in breakdown.items()}
    return {
        "peak_bytes": sum(breakdown.values()),
        "breakdown": breakdown,
        "activation_detail": {"per_layer_per_token_bytes": int(round(per_token)), "layers_bytes": int(layers_bytes),
                              "logits_bytes": int(logits), "attention": "eager" if eager else "sdpa"},
        "params": {"total": params["total"], "trainable": trainable, "quantized": len(quantized) * a.layers},
        "settings": {"method": method, "r": r, "targets": targets if isinstance(targets, str) else list(names),
                     "seq": seq, "batch": batch, "optimizer": optimizer, "precision": precision,
                     "grad_checkpointing": grad_checkpointing, "device": device},
    }


def estimate_for_run(cfg, model_config: dict, device, seq: int | None = None) -> dict:
    """The estimate for a loralab RunConfig (precision already resolved by the run), shaped like
    loralab trains: its attention choice, its chunked loss, NF4 on the LoRA targets unless
    model.quant_all_linear, and an NF4 matmul that keeps only the packed weight for backward.
    seq: the longest sequence of the run (default data.max_seq_len)."""
    dev = "cuda" if str(device).startswith("cuda") else "cpu"
    method = "full" if cfg.train.method == "full" else ("qlora" if cfg.model.quant == "nf4" else "lora")
    precision = cfg.train.precision if cfg.train.precision in PRECISIONS else "bf16"
    return estimate(model_config, method=method, r=cfg.lora.r, targets=cfg.lora.targets, seq=seq or cfg.data.max_seq_len,
                    batch=cfg.train.batch_size, optimizer=cfg.train.optimizer, precision=precision,
                    grad_checkpointing=cfg.train.gradient_checkpointing, device=dev,
                    attention=cfg.model.attn_implementation, lora_dropout=cfg.lora.dropout,
                    quantize="all-linear" if cfg.model.quant_all_linear else "targets",
                    qlora_saves_inputs=False, loss_rows=LOSS_CHUNK_ROWS, sgd_momentum=cfg.train.momentum > 0)


def run_memory_breakdown(cfg, folder, device, seq: int | None = None) -> dict | None:
    """For a run's summary.json, beside the measured peak: the estimate for a micro batch of the
    run's longest example (`seq`; default data.max_seq_len), an upper bound of its peak, or None for
    an architecture this model does not cover (a run must never fail over its memory estimate)."""
    try:
        est = estimate_for_run(cfg, resolve_model_config(str(folder)), device, seq=seq)
    except UserError:
        return None
    return {"estimated_peak_bytes": est["peak_bytes"], **est["breakdown"]}


# ---------------------------------------------------------------------------------------------
# Making it fit

def gpu_bytes(gpu_gb: float) -> float:
    """A GPU's memory as printed on the card: GPU makers' "GB" are GiB (a 24 GB card holds 24 x 2^30)."""
    return gpu_gb * 2**30


def _largest_fitting(lo: int, hi: int, fits) -> int | None:
    """The largest n in [lo, hi] with fits(n), assuming fits is monotone (smaller always fits better)."""
    if not fits(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def suggest_fixes(model_config: dict, gpu_gb: float, **settings) -> list[dict]:
    """If the estimate exceeds gpu_gb, the cheapest single changes that make it fit, cheapest first
    (each with its new estimate); if none fits alone, them combined in that order. [] if it fits."""
    limit = gpu_bytes(gpu_gb)
    peak = lambda **kw: estimate(model_config, **{**settings, **kw})["peak_bytes"]
    if peak() <= limit:
        return []
    s = {"method": "lora", "batch": 1, "seq": 512, "grad_checkpointing": False, "optimizer": "adamw", **settings}
    options = []  # (what, changes): cheapest (no quality cost, least slowdown) first
    if s["batch"] > 1:
        b = _largest_fitting(1, s["batch"] - 1, lambda n: peak(batch=n) <= limit) or 1
        accum = math.ceil(s["batch"] / b)
        options.append((f"micro batch {s['batch']} -> {b} (gradient accumulation x{accum} keeps the batch)",
                        {"batch": b}))
    if not s["grad_checkpointing"]:
        options.append(("gradient checkpointing (recomputes activations: ~30% more compute)",
                        {"grad_checkpointing": True}))
    if s["method"] == "full":
        if s["optimizer"] == "adamw":
            options.append(("8-bit AdamW (optimizer state 8 -> 2 bytes per parameter)", {"optimizer": "adamw8bit"}))
        options.append(("LoRA instead of full fine-tuning", {"method": "lora"}))
    elif s["method"] == "lora":
        options.append(("QLoRA: NF4 base weights (slower steps, small quality cost)", {"method": "qlora"}))
    if s["seq"] > 1:
        n = _largest_fitting(1, s["seq"] - 1, lambda n: peak(seq=n) <= limit) or 1
        options.append((f"shorter sequences {s['seq']} -> {n} tokens (longer examples are truncated)", {"seq": n}))
    out = [{"change": what, "settings": ch, "peak_bytes": peak(**ch), "fits": peak(**ch) <= limit}
           for what, ch in options]
    fitting = [f for f in out if f["fits"]]
    if fitting:
        return fitting
    combined, whats = {}, []
    for what, ch in options:
        if "seq" in ch:  # shorten only as much as the other changes leave necessary
            n = _largest_fitting(1, s["seq"], lambda n: peak(**combined, seq=n) <= limit)
            if n is None or n == s["seq"]:
                continue
            ch, what = {"seq": n}, f"shorter sequences {s['seq']} -> {n} tokens"
        combined.update(ch)
        whats.append(what.split(" (")[0])
        if peak(**combined) <= limit:
            break
    p = peak(**combined)
    return out + [{"change": "all of: " + "; ".join(whats), "settings": combined, "peak_bytes": p, "fits": p <= limit}]


# ---------------------------------------------------------------------------------------------
# Printing

def _gib(n: float) -> str:
    return f"{n / 2**30:8.2f} GiB"


def format_estimate(result: dict, name: str = "", gpu_gb: float | None = None, fixes: list | None = None) -> str:
    s = result["settings"]
    lora = "" if s["method"] == "full" else f" r={s['r']} targets={s['targets']}"
    lines = [f"loralab estimate: {name} {s['method']}{lora}, seq {s['seq']} x micro batch {s['batch']}, "
             f"{s['optimizer']}, {s['precision']}{', grad checkpointing' if s['grad_checkpointing'] else ''}, "
             f"{s['device']}",
             f"  parameters          {result['params']['total']:,} ({result['params']['trainable']:,} trainable)"]
    for key, value in result["breakdown"].items():
        lines.append(f"  {key.replace('_', ' '):<18}{_gib(value)}")
    peak = result["peak_bytes"]
    lines.append(f"  {'predicted peak':<18}{_gib(peak)}   ({peak / GB:.2f} GB)")
    if gpu_gb is not None:
        spare = gpu_bytes(gpu_gb) - peak
        lines.append(f"  fits in {gpu_gb:g} GiB: " + (f"yes ({spare / 2**30:.2f} GiB to spare)" if spare >= 0
                                                    else f"no ({-spare / 2**30:.2f} GiB over)"))
        for f in fixes or []:
            mark = "fits" if f["fits"] else "still over"
            lines.append(f"    - {f['change']}: {f['peak_bytes'] / 2**30:.2f} GiB ({mark})")
    return "\n".join(lines)

"""GGUF out, for llama.cpp: a LoRA adapter GGUF, and a complete (merged) model GGUF with its tokenizer.

Everything is written through the `gguf` package's GGUFWriter (no byte layout here). What llama.cpp
expects, in one place:
  - tensor names: the base model's GGUF names (`blk.0.attn_q.weight`), from gguf's own
    TensorNameMap for the architecture; an adapter's factors are `<name>.lora_a` (A, r x in) and
    `<name>.lora_b` (B, out x r);
  - llama.cpp's converter reorders the rows of Llama-family q/k projections (its RoPE pairs
    neighbouring dimensions, HF's pairs the two halves of each head): `rope_row_order`. Merged
    weights get it, and so does an adapter's B (the rows of B @ A are the rows of the weight);
  - llama.cpp scales an adapter by adapter.lora.alpha / rank, one alpha per file: rsLoRA and
    per-module alpha are folded into B so every module keeps its own scaling;
  - the tokenizer: byte-level BPE as `gpt2` tokens + merges, special tokens typed CONTROL, and the
    pre-tokenizer named after what the tokenizer's pre_tokenizer does (`tokenizer_pre_name`).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError

# HF model_type -> (GGUF architecture, whether llama.cpp's converter reorders q/k rows)
ARCHES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
Q8_BLOCK = 32  # Q8_0 quantizes rows in blocks of 32 values; other widths are written as f16

# A tokenizer.json pre_tokenizer, described as ("digits" | "bytelevel" | "split:<regex>") steps,
# -> llama.cpp's pre-tokenizer name (src/llama-vocab.cpp). Each entry splits text the same way.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    ("bytelevel-regex",): "gpt-2",                       # GPT-2's regex inside ByteLevel
    ("digits", "bytelevel-regex"): "smollm",             # each digit alone, then GPT-2's regex (SmolLM, StarCoder)
    ("split:" + _LLAMA3_SPLIT, "bytelevel"): "llama-bpe",
    ("split:" + _QWEN2_SPLIT, "bytelevel"): "qwen2",
}


@dataclass
class LoraFactors:
    """One LoRA module for the adapter GGUF."""
    name: str                 # HF module path, e.g. model.layers.0.self_attn.q_proj
    a: torch.Tensor           # (r, in)
    b: torch.Tensor           # (out, r)
    scaling: float            # what the module multiplies B @ A by (alpha / r, rsLoRA alpha / sqrt(r))


def arch_of(config) -> tuple[str, bool]:
    kind = getattr(config, "model_type", None)
    if kind not in ARCHES:
        raise UserError(f"GGUF export supports {', '.join(ARCHES)} models, not {kind!r}")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise UserError(f"GGUF export: RoPE scaling {rope.get('rope_type')!r} is not supported (default RoPE only)")
    return ARCHES[kind]


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_row_order(n_rows: int, n_heads: int) -> torch.Tensor:
    """Row indices that turn an HF q/k projection into llama.cpp's layout: within each head, the
    first half's row i and the second half's row i become neighbours (2i, 2i + 1)."""
    half = n_rows // n_heads // 2
    return torch.arange(n_rows).view(n_heads, 2, half).transpose(1, 2).reshape(-1)


def _rows_for_llamacpp(hf_name: str, rows: torch.Tensor, config) -> torch.Tensor:
    """`rows` (a weight, or a LoRA B) of module/parameter hf_name, in llama.cpp's row order."""
    _, permute = arch_of(config)
    if not permute:
        return rows
    if re.search(r"\.q_proj(\.weight|\.bias)?$", hf_name):
        return rows[rope_row_order(rows.shape[0], config.num_attention_heads)]
    if re.search(r"\.k_proj(\.weight|\.bias)?$", hf_name):
        return rows[rope_row_order(rows.shape[0], config.num_key_value_heads or config.num_attention_heads)]
    return rows


def gguf_name(hf_name: str, config) -> str:
    """The GGUF tensor name of an HF parameter (`model.layers.0.self_attn.q_proj.weight` -> `blk.0.attn_q.weight`)."""
    import gguf

    arch, _ = arch_of(config)
    enum = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    name = gguf.get_tensor_name_map(enum, config.num_hidden_layers).get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise UserError(f"GGUF export: no GGUF tensor name for {hf_name}")
    return name


def _atomic_gguf(path: str | os.PathLike, fill) -> Path:
    """Write a GGUF through GGUFWriter into a temporary sibling, renamed into place when complete."""
    import gguf

    out = Path(path)
    if out.exists():
        raise UserError(f"{out}: exists; remove it or choose another output file")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    writer = None
    try:
        writer = fill(lambda arch: gguf.GGUFWriter(str(tmp), arch))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def write_lora_gguf(path, config, modules: list[LoraFactors], *, alpha: float, name: str = "") -> Path:
    """A llama.cpp LoRA adapter GGUF. llama.cpp computes B @ A * alpha / r per tensor (r: A's rows);
    each module's own scaling is folded into B, so any alpha, rank or rsLoRA comes out right."""
    import gguf

    arch, _ = arch_of(config)
    tied = getattr(config, "tie_word_embeddings", False)
    tensors = {}
    for m in modules:
        if tied and m.name.endswith("lm_head"):
            raise UserError("GGUF adapter: LoRA on an output head tied to the embeddings has no tensor to attach "
                            "to in llama.cpp; export with --merged-gguf instead")
        target = gguf_name(m.name + ".weight", config)
        r = m.a.shape[0]
        b = m.b.float() * (m.scaling * r / alpha)  # llama.cpp multiplies by alpha / r again
        tensors[target + ".lora_a"] = m.a.float()
        tensors[target + ".lora_b"] = _rows_for_llamacpp(m.name, b, config)

    def fill(new):
        w = new(arch)
        w.add_type("adapter")
        w.add_name(name or "loralab adapter")
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        for key, t in tensors.items():
            w.add_tensor(key, t.detach().cpu().contiguous().numpy())
        return w

    return _atomic_gguf(path, fill)


# ---------------------------------------------------------------------------------------------
# Merged model

def _pre_steps(pre: dict | None) -> tuple[str, ...]:
    if not pre:
        return ()
    kind = pre.get("type")
    if kind == "Sequence":
        return tuple(s for p in pre.get("pretokenizers", []) for s in _pre_steps(p))
    if kind == "ByteLevel":
        return ("bytelevel-regex" if pre.get("use_regex", True) else "bytelevel",)
    if kind == "Digits" and pre.get("individual_digits"):
        return ("digits",)
    if kind == "Split" and isinstance(pre.get("pattern"), dict) and "Regex" in pre["pattern"]:
        return ("split:" + pre["pattern"]["Regex"],)
    return (json.dumps(pre, sort_keys=True),)


def tokenizer_pre_name(tokenizer_json: dict) -> str:
    """llama.cpp's name for what this tokenizer.json does before BPE, so llama.cpp splits text as
    training did; a pre-tokenizer it has no name for is an error, not a silent mismatch."""
    steps = _pre_steps(tokenizer_json.get("pre_tokenizer"))
    if steps not in PRE_TOKENIZERS:
        raise UserError(f"GGUF export: llama.cpp has no pre-tokenizer matching this tokenizer's ({', '.join(steps)}); "
                        f"known: {', '.join(sorted(set(PRE_TOKENIZERS.values())))}")
    return PRE_TOKENIZERS[steps]


def _add_tokenizer(w, tok_dir: Path, vocab_size: int, *, adds_bos: bool, eot_id: int | None) -> None:
    import gguf

    tj = json.loads((tok_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = tj.get("model", {})
    decoder = (tj.get("decoder") or {}).get("type")
    normalizer = (tj.get("normalizer") or {}).get("type")  # NFC (Qwen2's): llama.cpp's converter keeps such too
    if model.get("type") != "BPE" or decoder != "ByteLevel" or normalizer not in (None, "NFC"):
        raise UserError("GGUF export: only byte-level BPE tokenizers (GPT-2 style) are supported; "
                        "the LoRA GGUF (--gguf) works with any base GGUF")
    tokens: list[str | None] = [None] * vocab_size
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, i in model["vocab"].items():
        if i < vocab_size:
            tokens[i], types[i] = text, gguf.TokenType.NORMAL
    for added in tj.get("added_tokens", []):
        i = added["id"]
        if i >= vocab_size:
            raise UserError(f"GGUF export: token {added['content']!r} (id {i}) lies beyond the model's "
                            f"{vocab_size} embeddings")
        tokens[i] = added["content"]
        types[i] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]  # embedding rows past the vocab
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tokenizer_pre_name(tj))
    w.add_token_list(tokens)
    w.add_token_types(types)
    gguf.SpecialVocab(tok_dir, load_merges=True, n_vocab=vocab_size).add_to_gguf(w, quiet=True)
    w.add_add_bos_token(adds_bos)
    if eot_id is not None:
        w.add_eot_token_id(eot_id)


def _tensor_for(w, name: str, t: torch.Tensor, outtype: str) -> None:
    import gguf

    data = t.detach().to(torch.float32).cpu().contiguous().numpy()
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[outtype]
    if data.ndim == 1:  # norms and biases stay f32, as llama.cpp's converter keeps them
        qtype = gguf.GGMLQuantizationType.F32
    elif qtype == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % Q8_BLOCK:
        qtype = gguf.GGMLQuantizationType.F16
    w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)


def write_model_gguf(path, config, state_dict: dict[str, torch.Tensor], tok_dir: Path, *, outtype: str = "f16",
                     name: str = "", adds_bos: bool = False, eot_id: int | None = None) -> Path:
    """A complete llama.cpp model GGUF: hyper-parameters, every weight (q/k rows in llama.cpp's
    order, 2D weights in `outtype`, 1D ones in f32) and the tokenizer saved in tok_dir."""
    import gguf

    if outtype not in OUTTYPES:
        raise UserError(f"--outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    arch, _ = arch_of(config)
    tied = getattr(config, "tie_word_embeddings", False)
    weights = {k: v for k, v in state_dict.items() if not (tied and k == "lm_head.weight") and "rotary_emb" not in k}
    names = {k: gguf_name(k, config) for k in weights}  # every name checked before anything is written
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
    head_dim = _head_dim(config)
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))

    def fill(new):
        w = new(arch)
        w.add_type("model")
        w.add_name(name or "loralab merged model")
        w.add_context_length(config.max_position_embeddings)
        w.add_embedding_length(config.hidden_size)
        w.add_block_count(config.num_hidden_layers)
        w.add_feed_forward_length(config.intermediate_size)
        w.add_head_count(config.num_attention_heads)
        w.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
        w.add_rope_dimension_count(head_dim)
        w.add_rope_freq_base(float(theta))
        w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_vocab_size(config.vocab_size)
        w.add_file_type(file_type)
        _add_tokenizer(w, Path(tok_dir), config.vocab_size, adds_bos=adds_bos, eot_id=eot_id)
        for hf_name, t in weights.items():
            _tensor_for(w, names[hf_name], _rows_for_llamacpp(hf_name, t, config), outtype)
        return w

    return _atomic_gguf(path, fill)

"""Tiny random models of every decoder-only family the architecture matrix covers (tests/model/test_matrix.py).

Each family is built from its own transformers config class at a tiny size (hidden 64, 2 layers, 4 heads /
2 KV heads where the family has grouped heads) with the features that make it differ from Llama switched
ON: sliding windows far shorter than a training example (8 tokens; examples are ~100), sliding and full
layers mixed, soft-capping, attention sinks, q/k norms, experts, biases. A window the data never exceeds,
or a cap the logits never reach, would let a broken rewrite pass.

`ARCHS`: name -> Arch(model_type, config overrides, the features it switches on, in words).
`save_arch_folder(name, folder)`: an HF folder (weights + the tiny tokenizer) `model.name=<folder>` loads.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

WINDOW = 8                     # tokens: a training example (~100 with the chat template) spans many windows
MIXED = ["sliding_attention", "full_attention"]  # layer 0 slides, layer 1 sees everything
EXPERTS = dict(num_local_experts=4, num_experts_per_tok=2)
# Tiny caps: the tiny model's scores reach them, so tanh bends (at Gemma 2's own 50 / 30 it would be linear)
SOFTCAP = dict(attn_logit_softcapping=2.0, final_logit_softcapping=3.0)
NOISE = 0.05                   # added to every weight: biases and norm scales that init leaves 0 / 1 matter too


@dataclass(frozen=True)
class Arch:
    model_type: str
    overrides: dict = field(default_factory=dict)
    features: str = ""         # what the tiny model switches on, for docs/models.md


A = Arch
ARCHS: dict[str, Arch] = {
    "llama": A("llama", dict(attention_bias=True, mlp_bias=True), "GQA, q/k/v/o and MLP biases"),
    "mistral": A("mistral", dict(sliding_window=WINDOW), f"sliding window {WINDOW}"),
    "ministral": A("ministral", dict(sliding_window=WINDOW, layer_types=MIXED),
                   f"sliding window {WINDOW} on 1 of 2 layers"),
    "mixtral": A("mixtral", dict(sliding_window=WINDOW, **EXPERTS), f"4 experts top-2, sliding window {WINDOW}"),
    "qwen2": A("qwen2", dict(use_sliding_window=True, sliding_window=WINDOW, layer_types=MIXED),
               f"q/k/v biases, sliding window {WINDOW} on 1 of 2 layers"),
    "qwen2_moe": A("qwen2_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                     shared_expert_intermediate_size=64),
                   "4 experts top-2 + gated shared expert, q/k/v biases"),
    "qwen3": A("qwen3", dict(use_sliding_window=True, sliding_window=WINDOW, layer_types=MIXED),
               f"q/k norms, sliding window {WINDOW} on 1 of 2 layers"),
    "qwen3_moe": A("qwen3_moe", dict(num_experts=4, num_local_experts=4, num_experts_per_tok=2,
                                     moe_intermediate_size=32),
                   "q/k norms, 4 experts top-2"),
    "gemma": A("gemma", {}, "scaled embeddings, (1 + w) RMSNorm, GeGLU, tied head"),
    "gemma2": A("gemma2", dict(sliding_window=WINDOW, layer_types=MIXED, query_pre_attn_scalar=16, **SOFTCAP),
                f"attention and logit soft-capping, sliding window {WINDOW} on 1 of 2 layers, sandwich norms"),
    "gemma3_text": A("gemma3_text", dict(sliding_window=WINDOW, layer_types=MIXED, query_pre_attn_scalar=16),
                     f"q/k norms, sliding window {WINDOW} on 1 of 2 layers (own RoPE base), sandwich norms"),
    "vaultgemma": A("vaultgemma", dict(sliding_window=WINDOW, layer_types=MIXED, query_pre_attn_scalar=16,
                                       **SOFTCAP),
                    f"soft-capping, sliding window {WINDOW} on 1 of 2 layers"),
    "cohere": A("cohere", dict(use_qk_norm=True, logit_scale=0.5), "parallel block, q/k LayerNorms, logit scale"),
    "cohere2": A("cohere2", dict(sliding_window=WINDOW, layer_types=MIXED, logit_scale=0.5),
                 f"parallel block, sliding window {WINDOW} on 1 of 2 layers (no RoPE on full layers)"),
    "gpt_oss": A("gpt_oss", dict(sliding_window=WINDOW, layer_types=MIXED, **EXPERTS),
                 f"attention sinks, 4 experts top-2, biases, sliding window {WINDOW} on 1 of 2 layers"),
    "phi": A("phi", dict(qk_layernorm=True), "parallel block, partial RoPE, biases, q/k LayerNorms"),
    "phi3": A("phi3", dict(sliding_window=WINDOW), f"fused qkv / gate_up, sliding window {WINDOW}"),
    "phimoe": A("phimoe", dict(sliding_window=WINDOW, **EXPERTS), f"4 experts top-2, sliding window {WINDOW}"),
    "olmo": A("olmo", dict(clip_qkv=0.5), "non-parametric LayerNorm, q/k/v clipping"),
    "olmo2": A("olmo2", {}, "q/k norms over all heads, post-norms"),
    "olmo3": A("olmo3", dict(sliding_window=WINDOW, layer_types=MIXED),
               f"q/k norms, sliding window {WINDOW} on 1 of 2 layers"),
    "olmoe": A("olmoe", dict(num_experts=4, num_experts_per_tok=2, clip_qkv=0.5), "4 experts top-2, q/k norms"),
    "granite": A("granite", dict(embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.1,
                                 logits_scaling=4.0),
                 "embedding / residual / attention / logit multipliers"),
    "granitemoe": A("granitemoe", dict(embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.1,
                                       logits_scaling=4.0, **EXPERTS), "4 experts top-2, multipliers"),
    "starcoder2": A("starcoder2", dict(sliding_window=WINDOW, use_bias=True),
                    f"LayerNorm, biases, sliding window {WINDOW}"),
    "gpt_neox": A("gpt_neox", dict(use_parallel_residual=True), "parallel residual, partial RoPE, fused qkv, biases"),
    "stablelm": A("stablelm", dict(use_qkv_bias=True, qk_layernorm=True),
                  "partial RoPE, q/k/v biases, per-head q/k LayerNorms"),
    "smollm3": A("smollm3", dict(no_rope_layer_interval=2), "no RoPE on every 2nd layer"),
    "glm": A("glm", {}, "interleaved partial RoPE, fused gate_up, q/k/v biases"),
    "glm4": A("glm4", {}, "interleaved partial RoPE, sandwich norms, q/k/v biases"),
    "exaone4": A("exaone4", dict(sliding_window=WINDOW, layer_types=MIXED),
                 f"q/k norms, post-norms, sliding window {WINDOW} on 1 of 2 layers"),
    "hunyuan_v1_dense": A("hunyuan_v1_dense", {}, "q/k norms"),
    "helium": A("helium", {}, "Llama-like"),
    "seed_oss": A("seed_oss", dict(attention_dropout=0.0), "q/k/v biases"),
    "ernie4_5": A("ernie4_5", dict(use_bias=True), "biases"),
    "arcee": A("arcee", {}, "ReLU^2 MLP (no gate)"),
    "apertus": A("apertus", {}, "xIELU MLP (no gate), q/k norms"),
    "internlm3": A("internlm3", dict(bias=True, qkv_bias=True), "Llama-like"),
    "nemotron": A("nemotron", {}, "(1 + w) LayerNorm, partial RoPE, ReLU^2 MLP"),
    "falcon": A("falcon", dict(new_decoder_architecture=True, num_kv_heads=2, bias=True),
                "new decoder (two LayerNorms, parallel block), fused qkv, biases"),
    "gptj": A("gptj", dict(rotary_dim=8), "parallel block, interleaved partial RoPE"),
    "gpt_neo": A("gpt_neo", dict(num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
                                 window_size=WINDOW),
                 f"learned positions, local attention (window {WINDOW}) on 1 of 2 layers"),
    "gpt_bigcode": A("gpt_bigcode", dict(n_inner=96, n_positions=512, multi_query=True),
                     "multi-query attention, learned positions"),
    "bloom": A("bloom", dict(n_head=4, n_layer=2), "ALiBi, embedding LayerNorm, fused qkv"),
    "opt": A("opt", dict(ffn_dim=96, word_embed_proj_dim=64, enable_bias=True), "learned positions, ReLU MLP, biases"),
    "codegen": A("codegen", dict(n_inner=96, n_positions=512, rotary_dim=8, n_ctx=512),
                 "parallel block, fused qkv, partial RoPE"),
    "mpt": A("mpt", dict(n_heads=4, n_layers=2, d_model=64, expansion_ratio=2, max_seq_len=512),
             "ALiBi, fused Wqkv, no biases"),
    "persimmon": A("persimmon", dict(qk_layernorm=True), "ReLU^2 MLP, fused qkv, q/k LayerNorms, partial RoPE"),
    "exaone": A("exaone", {}, "Llama-like (EXAONE 3)"),
    "bitnet": A("bitnet", {}, "ternary-quantised linear layers (BitLinear), sub-norms"),
    "lfm2": A("lfm2", dict(layer_types=["conv", "full_attention"], full_attn_idxs=[1]),
              "short convolutions on 1 of 2 layers, q/k norms"),
    "jetmoe": A("jetmoe", dict(kv_channels=16, **EXPERTS), "mixture of attention heads and of MLP experts"),
    "dbrx": A("dbrx", dict(d_model=64, n_heads=4, n_layers=2, max_seq_len=512,
                           attn_config=dict(kv_n_heads=2, clip_qkv=0.5, rope_theta=10000.0),
                           ffn_config=dict(ffn_hidden_size=32, moe_num_experts=4, moe_top_k=2)),
              "fused Wqkv with clipping, 4 experts top-2"),
    "deepseek_v3": A("deepseek_v3", dict(n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                                         moe_intermediate_size=32, first_k_dense_replace=1, kv_lora_rank=16,
                                         q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                                         head_dim=8, num_key_value_heads=4),
                     "multi-head latent attention, 4 experts top-2 + shared expert, 1 dense layer"),
    "glm4_moe": A("glm4_moe", dict(n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                                   moe_intermediate_size=32, first_k_dense_replace=1, use_qk_norm=True),
                  "4 experts top-2 + shared expert, q/k norms, partial RoPE"),
    "minicpm3": A("minicpm3", dict(kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                   v_head_dim=16, head_dim=8, num_key_value_heads=4),
                     "multi-head latent attention, scaled residuals"),
    "granitemoehybrid": A("granitemoehybrid", dict(layer_types=["mamba", "attention"], mamba_n_heads=4,
                                                   mamba_d_head=32, mamba_d_state=16, mamba_n_groups=1,
                                                   num_local_experts=0),
                          "Mamba-2 layer + attention layer"),
    "falcon_h1": A("falcon_h1", dict(mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=16,
                                     mamba_n_groups=1), "parallel attention + Mamba-2 in every layer"),
    "qwen3_next": A("qwen3_next", dict(layer_types=["linear_attention", "full_attention"], **EXPERTS,
                                       num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                                       linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                                       linear_value_head_dim=16),
                    "gated DeltaNet + gated attention, 4 experts top-2"),
    "gpt2": A("gpt2", dict(scale_attn_by_inverse_layer_idx=True), "Conv1D layers, learned positions"),
}

# Dropout or router jitter in the base itself would make the step random; the oracle compares one step exactly.
NO_DROPOUT = dict(attention_dropout=0.0, hidden_dropout=0.0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                  summary_first_dropout=0.0, residual_dropout=0.0, dropout=0.0, router_jitter_noise=0.0)
HEAD_DIM_DERIVED = {"falcon"}  # head_dim is a read-only property of these configs (hidden / heads = 16 anyway)


def tiny_config(name: str, vocab: int, pad_id: int, eos_id: int):
    """The family's config class at tiny size, its features on."""
    from transformers import AutoConfig

    arch = ARCHS[name]
    # hidden 64 / 4 heads: head_dim 16. Families that spell sizes their own way get them under both
    # names (the config's attribute_map forwards the shared ones; unknown keys are only stored).
    kw = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=512, pad_token_id=pad_id, eos_token_id=eos_id,
              bos_token_id=1, tie_word_embeddings=False, **NO_DROPOUT)
    if arch.model_type in HEAD_DIM_DERIVED:
        del kw["head_dim"]
    if arch.model_type in ("gpt2", "gptj"):
        kw.update(n_inner=96, n_positions=512)
    return AutoConfig.for_model(arch.model_type, **{**kw, **arch.overrides})


def build_model(name: str, vocab: int, pad_id: int, eos_id: int, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(name, vocab, pad_id, eos_id), dtype=torch.float32)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=g) * NOISE)
    return model.eval()


def save_arch_folder(name: str, folder: Path) -> Path:
    """An HF model folder of the family (weights + the tiny character tokenizer) that `model.name=<folder>`,
    `AutoModelForCausalLM.from_pretrained` and PEFT all load."""
    from tiny_tokenizer import make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    model = build_model(name, len(tok), tok.pad_token_id, tok.eos_token_id)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return Path(folder)

"""Tiny random-init Llama (and GPT-2) models (instant, offline) and tiny model folders on disk, for any test."""
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from loralab.data.prompts import IGNORE_INDEX, Encoded


def tiny_llama_config(**overrides) -> LlamaConfig:
    cfg = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
               tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides))
    return model.eval()


def with_lora(model, seed: int | None = None):
    """`model` with LoRA (r=4, alpha=8, no dropout) on every linear layer and a non-zero update (B drawn
    small), so every LoRA gradient is non-trivial; in training mode. seed: draws A and B from it."""
    from loralab.peft.inject import inject
    from loralab.peft.lora import LoraSpec, lora_modules

    if seed is not None:
        torch.manual_seed(seed)
    inject(model, "all-linear", LoraSpec(r=4, alpha=8, dropout=0.0))
    for _, m in lora_modules(model):
        torch.nn.init.normal_(m.lora_B.weight, std=0.02)
    return model.train()


def save_tiny_folder(folder: Path, **overrides) -> Path:
    """An HF model folder (weights + the tiny tokenizer) that `model.name=<folder>` loads."""
    from tiny_tokenizer import make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    settings = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    tiny_llama(0, **{**settings, **overrides}).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def tiny_gpt2(seed: int = 0, **overrides):
    """A tiny random-init GPT-2: its attention and MLP layers are transformers' Conv1D (weights (in, out)),
    its lm_head an nn.Linear tied to the input embeddings. GPT-2's own dropouts are off, so a model in
    training mode is deterministic (as tiny_llama's, which has none)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = dict(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=128, bos_token_id=1, eos_token_id=2,
               pad_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    cfg.update(overrides)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**cfg)).eval()


def save_tiny_gpt2_folder(folder: Path, **overrides) -> Path:
    """A GPT-2 HF model folder (weights + the tiny tokenizer) that `model.name=<folder>` loads."""
    from tiny_tokenizer import make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    settings = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                    bos_token_id=tok.bos_token_id)
    tiny_gpt2(0, **{**settings, **overrides}).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def random_encoded(lengths, seed: int = 0, vocab: int = 128) -> list[Encoded]:
    """Encoded examples of the given lengths: random token ids (3 .. vocab - 1), the first third of each
    masked as prompt."""
    rng = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=rng).tolist()
        prompt = max(1, n // 3)
        out.append(Encoded(input_ids=ids, labels=[IGNORE_INDEX] * prompt + ids[prompt:]))
    return out


def randomize_lora(model, seed=1, scale=0.2, generator=None):
    """Non-zero A and B in every LoRA layer (as if trained), so the update really changes the output."""
    import torch

    from loralab.peft.lora import lora_modules

    g = generator or torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(model):
            for w in (m.lora_A.weight, m.lora_B.weight):
                w.copy_(torch.randn(w.shape, generator=g) * scale)
    return model


@contextmanager
def saved_bytes(exclude=()):
    """Bytes autograd keeps for backward while the block runs: each storage once, `exclude`'s tensors'
    storages (parameters, weights) left out. Yields a dict storage -> bytes, filled as the block runs."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t):
        if (ptr := t.untyped_storage().data_ptr()) not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield seen


def alive_after_forward(model, ids, refs: list, outer_hooks: bool = False):
    """Forward (inside a pass-through saved-tensor hook, activation checkpointing's kind, if outer_hooks), then
    backward of the logits' mean square. `refs`: weakrefs the model's forward hooks append to. Returns whether
    each was still alive after forward, the logits and the trainable parameters' gradients."""
    import gc

    torch.manual_seed(2)
    if outer_hooks:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            logits = model(input_ids=ids).logits
    else:
        logits = model(input_ids=ids).logits
    gc.collect()
    alive = [r() is not None for r in refs]
    logits.float().square().mean().backward()
    return alive, logits, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def load_converted(folder: Path, dtype=torch.float32, attn_implementation: str = "auto", converters="auto"):
    """A model folder loaded and converted as a training run does it (model.load.load_weights, then
    model.convert.convert with the run's attention setting)."""
    from loralab.model.convert import Target, convert
    from loralab.model.load import load_weights

    model = load_weights(folder, dtype, attn_implementation=attn_implementation)
    convert(model, converters, Target(torch.device("cpu"), attn_implementation))
    return model
MOE_KINDS = ("mixtral", "qwen3_moe", "gpt_oss")


def tiny_moe(kind: str = "mixtral", seed: int = 0, **overrides):
    """A tiny random-init MoE decoder whose experts are fused 3-D parameters (transformers 5):
    hidden 64, 2 layers, 4 heads / 2 KV heads, 4 experts, 2 per token."""
    from transformers import (
        GptOssConfig,
        GptOssForCausalLM,
        MixtralConfig,
        MixtralForCausalLM,
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
    )

    common = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  num_experts_per_tok=2, max_position_embeddings=128, tie_word_embeddings=False, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2)
    if kind == "mixtral":
        cls, cfg = MixtralForCausalLM, MixtralConfig(intermediate_size=32, num_local_experts=4, **common)
    elif kind == "qwen3_moe":
        cls, cfg = Qwen3MoeForCausalLM, Qwen3MoeConfig(moe_intermediate_size=32, intermediate_size=64, num_experts=4,
                                                       head_dim=16, decoder_sparse_step=1, mlp_only_layers=[],
                                                       **common)
    elif kind == "gpt_oss":
        cls, cfg = GptOssForCausalLM, GptOssConfig(intermediate_size=32, num_local_experts=4, head_dim=16,
                                                   layer_types=["full_attention"] * 2, **common)
    else:
        raise ValueError(kind)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    torch.manual_seed(seed)
    model = cls(cfg)
    with torch.no_grad():  # gpt-oss' router starts at zero (every expert tied): give every model a real routing
        for name, p in model.named_parameters():
            if name.endswith(("router.weight", "router.bias")):
                p.normal_(std=0.5)
    return model.eval()


def save_tiny_moe_folder(folder: Path, kind: str = "mixtral") -> Path:
    """An HF folder of tiny_moe(kind) with the tiny tokenizer, as save_tiny_folder."""
    from tiny_tokenizer import make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    tiny_moe(kind, 0, vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id) \
        .save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder

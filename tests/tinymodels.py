"""Tiny random-init Llama models (instant, offline) and a tiny model folder on disk, for any test."""
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM


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


def save_tiny_folder(folder: Path, **overrides) -> Path:
    """An HF model folder (weights + the tiny tokenizer) that `model.name=<folder>` loads."""
    from tiny_tokenizer import make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    tiny_llama(0, vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
               **overrides).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder

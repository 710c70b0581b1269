"""Shared fixtures: tiny random-init Llama models and a tokenizer, all instant and offline."""
import pytest
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


@pytest.fixture
def tiny_model():
    return tiny_llama()


@pytest.fixture
def tiny_tokenizer():
    from tiny_tokenizer import make_tiny_tokenizer
    return make_tiny_tokenizer()

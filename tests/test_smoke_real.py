"""Smoke test on the real default model (SmolLM2-135M-Instruct, fetched once into the cache)."""
import json

import pytest
import torch

from loralab.config import load_config
from loralab.model.load import load_model
from loralab.pipeline import run_training

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real():
    return load_model("smollm2-135m", torch.float32)


def test_converted_default_model_knows_paris(real):
    model, tok, folder = real
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])


def test_short_lora_run_on_the_real_model(tmp_path):
    cfg = load_config("configs/demo.yaml", ["train.max_steps=4", "train.batch_size=8", "data.n_train=64",
                                            "eval.n=8", "train.progress=false", f"output_dir={tmp_path}"])
    s = run_training(cfg, quiet=True)
    assert s["steps"] == 4 and s["trainable_params"] == 30 * 16 * (4 * 576 + 2 * 192 + 2 * 576 + 3 * (576 + 1536))
    assert s["total_params"] > 134_000_000 and s["tokens_per_s"] > 0
    losses = [json.loads(l)["loss"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert len(losses) == 4 and all(l == l and l < 20 for l in losses)  # finite, sane
    assert (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size > 1_000_000

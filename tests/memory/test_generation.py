"""The evaluation's pre-flight (memory/generation.py): its KV cache term against the cache a real
generate() holds, the memory verdict at eval.batch_size with the largest batch that fits, and the
context a prompt plus eval.max_new_tokens needs."""
import pytest
import torch

from loralab.config import load_config
from loralab.data.formats import Example
from loralab.data.prompts import render_prompt
from loralab.errors import UserError
from loralab.memory import estimate as E
from loralab.memory import generation as G
from loralab.memory import preflight as P
from loralab.memory.arch import resolve_model_config
from tinymodels import tiny_llama, tiny_llama_config

MiB = 2**20
TINY = tiny_llama_config().to_dict()


def test_kv_cache_term_is_the_cache_generate_holds():
    """The cache after generating: every position but the last new token's (whose keys are never
    computed), fp32 on the CPU. The estimate adds one token and one layer's copy."""
    model = tiny_llama()
    batch, prompt, new = 3, 7, 5
    ids = torch.randint(3, 128, (batch, prompt))
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                         do_sample=False, return_dict_in_generate=True, pad_token_id=0)
    cache = out.past_key_values
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    settings = E.run_settings(load_config(None, ["train.precision=fp32"]), "cpu", prompt)
    est = G.generation_bytes(TINY, settings, batch=batch, prompt=prompt, new=new)["parts"]["kv_cache"]
    layers = TINY["num_hidden_layers"]
    per_position = held // (prompt + new - 1)
    assert est == per_position * (prompt + new) * (layers + 1) // layers


def test_the_demo_models_5000_prompt_batch_is_refused_with_the_batch_that_fits(monkeypatch):
    """Issue 43: eval.n=5000 eval.batch_size=5000 eval.max_new_tokens=64 on SmolLM2: ~18 GiB of KV cache."""
    smol = resolve_model_config("smollm2-135m")
    cfg = load_config(None, ["eval.n=5000", "eval.batch_size=5000", "eval.max_new_tokens=64",
                             "train.precision=fp32"])
    settings = E.run_settings(cfg, "cpu", 20)
    est = G.generation_bytes(smol, settings, batch=5000, prompt=20, new=64)
    assert 18 * 2**30 < est["parts"]["kv_cache"] < 19 * 2**30  # 30 x 2 x 5000 x 84 x 3 x 64 x 4 bytes
    monkeypatch.setattr(P, "current_rss_bytes", lambda: E.CPU_RUNTIME_BYTES)
    room = P.Room(4 * 2**30, "MemAvailable")
    budget, _ = P.budget_of(room, "cpu")
    fits = G.largest_fitting(1, 4999, lambda k: G.generation_bytes(smol, settings, batch=k, prompt=20,
                                                                  new=64)["peak_bytes"] <= budget)
    assert fits and G.generation_bytes(smol, settings, batch=fits + 1, prompt=20, new=64)["peak_bytes"] > budget
    assert G.generation_bytes(smol, settings, batch=fits, prompt=20, new=64)["peak_bytes"] <= budget


def test_context_left_for_new_tokens():
    cfg = load_config(None, ["eval.max_new_tokens=100"])
    G.check_context(cfg, TINY, 28)  # 28 + 100 = 128, the context: fits
    with pytest.raises(UserError, match=r"'eval.max_new_tokens' is 100: .* 29 \+ 100 is above the model's context "
                                        r"of 128 \(max_position_embeddings\); set eval.max_new_tokens=99 or less"):
        G.check_context(cfg, TINY, 29)
    with pytest.raises(UserError, match="longest evaluation prompt has 128 tokens, at or above"):
        G.check_context(cfg, TINY, 128)


def test_longest_prompt_is_found_among_the_longest_texts(tiny_tokenizer):
    cfg = load_config(None, ["data.template=raw"])
    examples = [Example(prompt="1+1=", response="2")] * 100 + [Example(prompt="Add " + "1+" * 40 + "1 =",
                                                                       response="41")]
    long = len(tiny_tokenizer.encode(render_prompt(examples[-1], tiny_tokenizer, template="raw"),
                                     add_special_tokens=False))
    assert G.longest_prompt(examples, tiny_tokenizer, cfg) == long > 40


def _eval_run(tiny_folder, *overrides):
    from loralab.data.tasks import make_task
    from loralab.io.models import load_tokenizer
    from loralab.prepare import Datasets

    cfg = load_config(None, [f"model.name={tiny_folder}", "data.template=raw", "train.precision=fp32", *overrides])
    data = Datasets([], [], {"2da": make_task("2da", 0, cfg.eval.n, 1)[1]})
    return cfg, data, load_tokenizer(tiny_folder)


def test_check_evaluation_refuses_warns_or_skips_per_train_preflight(tiny_folder, monkeypatch):
    monkeypatch.setattr(P, "current_rss_bytes", lambda: E.CPU_RUNTIME_BYTES)
    monkeypatch.setattr(P, "device_room", lambda device: P.Room(100 * MiB, "MemAvailable"))
    big = ["eval.n=3000", "eval.batch_size=3000", "eval.max_new_tokens=64"]
    cfg, data, tok = _eval_run(tiny_folder, *big)
    with pytest.raises(UserError, match=r"generating 3,000 prompts at once .* eval.batch_size=\d+ fits") as e:
        G.check_evaluation(cfg, tiny_folder, "cpu", data, tok)
    fits = int(str(e.value).split(" fits")[0].rsplit("=", 1)[1])
    assert G.check_evaluation(_eval_run(tiny_folder, "eval.n=3000", f"eval.batch_size={fits}",
                                        "eval.max_new_tokens=64")[0], tiny_folder, "cpu", data, tok) == []
    (line,) = G.check_evaluation(_eval_run(tiny_folder, *big, "train.preflight=warn")[0], tiny_folder, "cpu", data, tok)
    assert line.startswith("warning: not enough memory for the evaluation")
    off = _eval_run(tiny_folder, *big, "train.preflight=off")[0]
    assert G.check_evaluation(off, tiny_folder, "cpu", data, tok) == []
    # two ranks: each generates for its half
    assert "1,500 prompts at once" in str(pytest.raises(UserError, G.check_evaluation, cfg, tiny_folder, "cpu", data,
                                                        tok, 2).value)


def test_an_evaluation_no_batch_fits_names_what_to_lower(tiny_folder, monkeypatch):
    monkeypatch.setattr(P, "current_rss_bytes", lambda: 0)
    monkeypatch.setattr(P, "device_room", lambda device: P.Room(E.CPU_RUNTIME_BYTES, "MemAvailable"))
    cfg, data, tok = _eval_run(tiny_folder, "eval.n=10", "eval.batch_size=10")
    with pytest.raises(UserError, match="no eval.batch_size fits: lower eval.max_new_tokens or evaluate fewer tasks"):
        G.check_evaluation(cfg, tiny_folder, "cpu", data, tok)

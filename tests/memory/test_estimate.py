"""The analytic memory model: exact parameter counts, closed forms, the article's 7B numbers, the CLI."""
import io
import json
from contextlib import redirect_stdout

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from loralab.cli import main
from loralab.errors import UserError
from loralab.memory import arch as A
from loralab.memory import estimate as E
from loralab.memory.activations import layer_bytes_per_token
from tinymodels import saved_bytes, tiny_llama, tiny_llama_config

GB = 1e9
# The article (Llama-2-7B, Lit-GPT, one A100): r=8 on q and v, micro batch 1, AdamW, bf16, Alpaca.
# Its peak is set by the longest Alpaca example (Lit-GPT runs it first); we assume 1304 tokens
# (docs/memory.md: which lengths reproduce both numbers and what stays unexplained).
ARTICLE = dict(r=8, targets="qv", seq=1304, batch=1, grad_accum=128, optimizer="adamw", precision="bf16",
               device="cuda", stock_autograd=True)  # Lit-GPT's LoRA dropout keeps a float mask and its output


def _hf_dict(model) -> dict:
    return model.config.to_dict()


@pytest.mark.parametrize("tied", [False, True])
def test_param_count_equals_a_real_tiny_model(tied):
    model = tiny_llama(0, tie_word_embeddings=tied)
    real = sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
    assert A.count_params(_hf_dict(model))["total"] == real


def test_param_count_handles_head_dim_and_qkv_bias():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    real = sum(p.numel() for p in Qwen2ForCausalLM(cfg).parameters())
    assert A.count_params(cfg.to_dict())["total"] == real
    wide = tiny_llama_config(head_dim=16)  # head_dim x heads (64) != hidden (32)
    assert A.count_params(wide.to_dict())["total"] == sum(p.numel() for p in
                                                          AutoModelForCausalLM.from_config(wide).parameters())


@pytest.mark.parametrize("name", A.bundled_names())
def test_bundled_configs_count_like_transformers_builds_them(name):
    cfg = A.resolve_model_config(name)
    fields = {k: v for k, v in cfg.items() if not k.startswith("_") and k != "model_type"}
    hf = AutoConfig.for_model(cfg["model_type"], **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf)
    assert A.count_params(cfg)["total"] == sum(p.numel() for p in model.parameters())


def test_known_totals_and_the_articles_trainable_counts():
    llama = A.resolve_model_config("llama-2-7b")
    assert A.count_params(llama)["total"] == 6_738_415_616
    assert A.count_params(A.resolve_model_config("smollm2-135m"))["total"] == 134_515_008
    assert A.count_params(llama, "qv", 8)["lora"] == 4_194_304          # the article's q+v count
    assert A.count_params(llama, "all-linear+head", 8)["lora"] == 20_277_248  # "all layers"


def test_lora_count_is_the_closed_form():
    cfg = tiny_llama_config().to_dict()  # hidden 32, kv dim 16, intermediate 64, 2 layers, vocab 128
    H, K, I, L, V, r = 32, 16, 64, 2, 128, 4
    per_layer = r * ((H + H) + (H + K) + (H + K) + (H + H) + (H + I) + (H + I) + (I + H))
    assert A.count_params(cfg, "all-linear", r)["lora"] == per_layer * L
    assert A.count_params(cfg, "qv", r)["lora"] == r * ((H + H) + (H + K)) * L
    assert A.count_params(cfg, "all-linear+head", r)["lora"] == per_layer * L + r * (H + V)


def test_lora_count_matches_injected_model():
    from loralab.peft.inject import count_parameters, inject
    from loralab.peft.lora import LoraSpec
    from loralab.peft.targets import resolve_targets

    model = tiny_llama(0)
    model.requires_grad_(False)
    inject(model, resolve_targets(model, "all-linear"), LoraSpec(r=4, alpha=8, dropout=0.0))
    trainable, _ = count_parameters(model)
    assert A.count_params(_hf_dict(model), "all-linear", 4)["lora"] == trainable


@pytest.mark.parametrize("method,article_gb", [("lora", 21.33), ("qlora", 14.18)])
def test_article_7b_within_15_percent(method, article_gb):
    peak = E.estimate(A.resolve_model_config("llama-2-7b"), method=method, **ARTICLE)["peak_bytes"]
    assert abs(peak / GB - article_gb) / article_gb < 0.15, peak / GB


def test_qlora_below_lora_below_full():
    cfg = A.resolve_model_config("llama-2-7b")
    peaks = {m: E.estimate(cfg, method=m, **ARTICLE)["peak_bytes"] for m in ("qlora", "lora", "full")}
    assert peaks["qlora"] < peaks["lora"] < peaks["full"]


def test_nf4_weights_are_4127_bits_and_embeddings_stay_16_bit():
    cfg = A.resolve_model_config("llama-2-7b")
    p = A.count_params(cfg)
    frozen = E.estimate(cfg, method="qlora", **ARTICLE)["breakdown"]["frozen_weights"]
    expected = p["layer_linears"] * 4.127 / 8 + (p["embedding"] + p["lm_head"] + p["norms"]) * 2
    assert frozen == pytest.approx(expected, abs=1)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_adamw_exceeds_sgd_by_the_closed_form_state(method):
    cfg = A.resolve_model_config("smollm2-135m")
    kw = dict(method=method, r=8, targets="all-linear", seq=256, batch=2, device="cpu")
    adamw, sgd = E.estimate(cfg, optimizer="adamw", **kw), E.estimate(cfg, optimizer="sgd", **kw)
    trainable = A.count_params(cfg, "all-linear", 8)["lora"] if method == "lora" else A.count_params(cfg)["total"]
    # AdamW keeps two fp32 moments, SGD with momentum one: 4 bytes per trainable parameter apart.
    assert adamw["peak_bytes"] - sgd["peak_bytes"] == 4 * trainable
    assert adamw["breakdown"]["optimizer_state"] == 8 * trainable


def test_checkpointing_reduces_activations():
    cfg = A.resolve_model_config("llama-2-7b")
    off = E.estimate(cfg, method="lora", **ARTICLE)
    on = E.estimate(cfg, method="lora", **{**ARTICLE, "grad_checkpointing": True})
    assert on["breakdown"]["activations"] < off["breakdown"]["activations"] / 3
    assert on["breakdown"]["frozen_weights"] == off["breakdown"]["frozen_weights"]


def test_full_fine_tuning_peaks_at_the_step_that_holds_the_most():
    cfg = A.resolve_model_config("smollm2-135m")
    n = A.count_params(cfg)
    outside = n["embedding"] + n["lm_head"] + 576  # tied embedding + the final norm
    # Short sequences: the optimizer step (fp32 masters, every gradient, AdamW's two moments and its
    # foreach temporary: 4 + 4 + 8 + 4 bytes per parameter, activations freed) sets the peak.
    short = E.estimate(cfg, method="full", seq=8, batch=1, device="cuda")
    assert short["phase"] == "optimizer step"
    assert short["peak_bytes"] == pytest.approx(20 * n["total"] + E.CUDA_OTHER_BYTES, abs=8)
    # Long ones: the start of backward, with every activation but only the gradients outside the
    # layers (the layers' appear as their activations are freed) and autocast's bf16 copies.
    long = E.estimate(cfg, method="full", seq=2048, batch=4, device="cuda")
    assert long["phase"] == "start of backward"
    assert long["breakdown"]["gradients"] == 4 * outside
    assert long["breakdown"]["trainable_weights"] == 6 * n["total"]
    # Accumulating micro batches keeps every gradient alive while the next one's activations are.
    accum = E.estimate(cfg, method="full", seq=2048, batch=4, device="cuda", grad_accum=4)
    assert accum["breakdown"]["gradients"] == 4 * n["total"]
    assert accum["peak_bytes"] - long["peak_bytes"] == 4 * (n["total"] - outside)


@pytest.mark.parametrize("malloc", ["system", "tcmalloc", "mimalloc", "jemalloc"])
def test_cpu_heap_slack_closed_forms(malloc):
    cfg = A.resolve_model_config("smollm2-135m")
    kw = dict(seq=512, batch=4, device="cpu", malloc=malloc)
    off, on = E.estimate(cfg, **kw), E.estimate(cfg, grad_checkpointing=True, **kw)
    layers = off["activation_detail"]["layers_bytes"]
    plain, ckpt = E.CPU_HEAP_SLACK.get(malloc, E.CPU_HEAP_SLACK["system"])  # jemalloc: not fitted, glibc's
    assert off["activation_detail"]["heap_slack_bytes"] == round(plain * layers)
    # checkpointing: a fraction of what the layers would have saved, freed by the checkpointed forward
    assert on["activation_detail"]["heap_slack_bytes"] == round(ckpt * layers)
    assert off["breakdown"]["other"] == E.CPU_RUNTIME_BYTES + off["activation_detail"]["heap_slack_bytes"]
    cuda = E.estimate(cfg, seq=512, batch=4, device="cuda", malloc=malloc)
    assert cuda["activation_detail"]["heap_slack_bytes"] == 0 and cuda["breakdown"]["other"] == E.CUDA_OTHER_BYTES


def test_glibc_leaves_more_slack_than_the_preloaded_mallocs():
    cfg = A.resolve_model_config("smollm2-135m")
    peak = lambda m: E.estimate(cfg, seq=512, batch=4, device="cpu", malloc=m)["peak_bytes"]  # noqa: E731
    assert peak("system") > peak("mimalloc") >= peak("tcmalloc") and peak("jemalloc") == peak("system")


def test_eager_attention_grows_quadratically_and_sdpa_linearly():
    cfg = A.resolve_model_config("smollm2-135m")
    layer = lambda attn, seq: E.estimate(cfg, seq=seq, attention=attn)["activation_detail"]["layers_bytes"]
    assert layer("sdpa", 1024) == pytest.approx(2 * layer("sdpa", 512), rel=1e-9)
    assert layer("eager", 1024) > 2.2 * layer("eager", 512)


def test_auto_attention_on_a_bf16_cpu_is_recomputed_eager_up_to_its_row_limit_and_sdpa_beyond():
    from loralab.model.attention import RECOMPUTE, eager_max_row

    limit = eager_max_row()  # this CPU's (AMX or not)
    cfg = A.resolve_model_config("smollm2-135m")
    est = lambda attn, seq, dev="cpu": E.estimate(cfg, seq=seq, attention=attn, device=dev)
    peak = lambda *a: est(*a)["peak_bytes"]
    assert peak("auto", limit) == peak(RECOMPUTE, limit) < peak("eager", limit)
    assert peak("auto", limit + 1) == peak("sdpa", limit + 1) != peak("eager", limit + 1)
    assert peak("auto", 64, "cuda") == peak("sdpa", 64, "cuda")
    fp32 = lambda attn: E.estimate(cfg, seq=64, attention=attn, precision="fp32")["peak_bytes"]
    assert fp32("auto") == fp32("sdpa") != fp32(RECOMPUTE)  # fp32 on the CPU: SDPA at every length
    # recomputing keeps the per-layer activations of SDPA, plus one layer's scores during backward
    r, s = est(RECOMPUTE, 256), est("sdpa", 256)
    assert r["activation_detail"]["layers_bytes"] == s["activation_detail"]["layers_bytes"]
    assert r["peak_bytes"] - s["peak_bytes"] == 256 * cfg["num_attention_heads"] * 256 * 10


def test_breakdown_sums_to_peak():
    r = E.estimate(A.resolve_model_config("qwen2.5-7b"), method="qlora", seq=2048, batch=2)
    assert set(r["breakdown"]) == {"frozen_weights", "trainable_weights", "gradients", "optimizer_state",
                                   "activations", "other"}
    assert sum(r["breakdown"].values()) == r["peak_bytes"]


def test_estimate_for_run_follows_the_run_config():
    from loralab.config import load_config

    cfg = load_config(None, ["model.quant=nf4", "lora.targets=[q_proj,v_proj]", "train.batch_size=2",
                             "data.max_seq_len=128", "train.precision=bf16"])
    r = E.estimate_for_run(cfg, A.resolve_model_config("smollm2-135m"), "cpu")
    assert r["settings"]["method"] == "qlora" and r["settings"]["batch"] == 2 and r["settings"]["seq"] == 128
    assert r["params"]["quantized"] == 2 * 30  # loralab quantizes the LoRA targets only by default
    assert r["activation_detail"]["attention"] == "eager_recompute"  # auto on the CPU, short rows


def test_estimate_for_run_keeps_one_small_chunk_of_logits_for_a_frozen_output_layer():
    from loralab.config import load_config
    from loralab.train.loss import CHUNK_ROWS, FROZEN_HEAD_ROWS

    arch = A.resolve_model_config("smollm2-135m")
    logits = lambda targets: E.estimate_for_run(load_config(None, [
        f"lora.targets={targets}", "train.batch_size=2", "data.max_seq_len=1024"]), arch, "cpu")[
        "activation_detail"]["logits_bytes"]
    assert logits("all-linear") == FROZEN_HEAD_ROWS * arch["vocab_size"] * 12
    assert logits("all-linear+head") == CHUNK_ROWS * arch["vocab_size"] * 12  # a trained head keeps a chunk


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_a_preference_run_is_estimated_as_two_rows_per_pair_with_plain_head_chunks(objective):
    from loralab.config import load_config
    from loralab.train.loss import CHUNK_ROWS

    arch = A.resolve_model_config("smollm2-135m")
    run = lambda *o: E.estimate_for_run(load_config(None, ["train.batch_size=4", "data.max_seq_len=256", *o]),
                                        arch, "cpu")
    pairs, sft = run(f"train.objective={objective}"), run()
    twice = E.estimate(arch, **{**E.run_settings(load_config(None, ["train.batch_size=8", "data.max_seq_len=256"]),
                                                 "cpu"), "loss_rows": CHUNK_ROWS})
    assert pairs["settings"]["batch"] == 8  # chosen and rejected rows of 4 pairs
    assert pairs["peak_bytes"] == twice["peak_bytes"]  # the reference forward (no_grad) keeps no activation
    assert pairs["activation_detail"]["logits_bytes"] == CHUNK_ROWS * arch["vocab_size"] * 12
    assert pairs["breakdown"]["activations"] > sft["breakdown"]["activations"]


def test_resolve_model_config_paths_and_errors(tmp_path):
    tiny_llama_config().save_pretrained(tmp_path)
    assert A.resolve_model_config(str(tmp_path))["hidden_size"] == 32
    assert A.resolve_model_config(str(tmp_path / "config.json"))["hidden_size"] == 32
    with pytest.raises(UserError, match="llama-2-7b"):  # the message lists the bundled names
        A.resolve_model_config("llama-9-700b")
    (tmp_path / "gpt2.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 768}))
    with pytest.raises(UserError, match="n_layer"):  # GPT-2 is modelled, from its own keys
        E.estimate(A.resolve_model_config(str(tmp_path / "gpt2.json")))
    (tmp_path / "t5.json").write_text(json.dumps({"model_type": "t5", "d_model": 512}))
    with pytest.raises(UserError, match="hidden_size"):
        E.estimate(A.resolve_model_config(str(tmp_path / "t5.json")))
    with pytest.raises(UserError, match="targets"):
        E.estimate(A.resolve_model_config("smollm2-135m"), targets="everything")
    with pytest.raises(UserError, match="seq"):
        E.estimate(A.resolve_model_config("smollm2-135m"), seq=0)


def _cli(args) -> tuple[int, str]:
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = main(args)
    return rc, buf.getvalue()


def test_cli_json_prints_one_parseable_object():
    rc, out = _cli(["estimate", "--model", "llama-2-7b", "--method", "qlora", "--targets", "qv", "--seq", "1304",
                    "--grad-accum", "128", "--json"])
    assert rc == 0
    obj = json.loads(out)  # exactly one object: anything else around it would fail to parse
    assert obj["peak_bytes"] == sum(obj["breakdown"].values())
    assert obj["peak_bytes"] == E.estimate(A.resolve_model_config("llama-2-7b"), method="qlora",
                                           **{**ARTICLE, "stock_autograd": False})["peak_bytes"]


def test_cli_table_says_whether_it_fits_and_how_to(capsys):
    rc, out = _cli(["estimate", "--model", "llama-2-7b", "--targets", "qv", "--seq", "1304", "--gpu-gb", "16"])
    assert rc == 0
    assert "predicted peak" in out and "fits in 16 GiB: no" in out and "QLoRA" in out
    rc, out = _cli(["estimate", "--model", "smollm2-135m", "--gpu-gb", "16"])
    assert "fits in 16 GiB: yes" in out


def test_cli_bad_model_exits_2(capsys):
    assert main(["estimate", "--model", "no-such-model"]) == 2
    assert "bundled" in capsys.readouterr().err


def test_run_memory_breakdown_is_none_for_an_unmodelled_architecture(tmp_path):
    from loralab.config import load_config

    cfg = load_config(None, ["train.precision=bf16"])
    tiny_llama_config().save_pretrained(tmp_path / "llama")
    got = E.run_memory_breakdown(cfg, tmp_path / "llama", "cpu")
    assert got["estimated_peak_bytes"] == sum(v for k, v in got.items() if k != "estimated_peak_bytes")
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 768}))
    assert E.run_memory_breakdown(cfg, tmp_path / "gpt2", "cpu") is None


def test_variant_costs_follow_a_real_model_and_closed_forms():
    """DoRA: a magnitude per output row (trainable), a cached ||W||^2 per row (frozen) and each
    wrapped layer's output kept for backward; PiSSA / OLoRA: a copy of the factors; rank_pattern
    and lora.layers: the real model's trainable count."""
    from loralab.config import load_config
    from loralab.peft.inject import count_parameters, inject
    from loralab.peft.names import filter_layers
    from loralab.peft.targets import resolve_targets
    from loralab.prepare import lora_spec

    hf = tiny_llama_config().to_dict()
    kw = dict(r=4, targets="all-linear", seq=16, batch=2, device="cpu", precision="fp32")
    plain, dora = E.estimate(hf, **kw), E.estimate(hf, dora=True, **kw)
    rows_per_layer = 32 + 16 + 16 + 32 + 64 + 64 + 32  # out features of q k v o gate up down
    assert dora["params"]["trainable"] - plain["params"]["trainable"] == 2 * rows_per_layer
    assert dora["breakdown"]["frozen_weights"] - plain["breakdown"]["frozen_weights"] == 4 * 2 * rows_per_layer
    extra = dora["activation_detail"]["layers_bytes"] - plain["activation_detail"]["layers_bytes"]
    assert extra == 2 * 16 * 2 * rows_per_layer * 4  # tokens x layers x rows x fp32
    pissa = E.estimate(hf, init_copies=True, **kw)
    frozen = pissa["breakdown"]["frozen_weights"] - plain["breakdown"]["frozen_weights"]
    assert frozen == 4 * plain["params"]["trainable"]
    for overrides in (["lora.use_dora=true"], ["lora.rank_pattern={q_proj: 8, model.layers.1.mlp.down_proj: 2}"],
                      ["lora.layers=[1]", "lora.use_dora=true"]):
        cfg = load_config(None, ["lora.r=4", *overrides])
        model = tiny_llama(0)
        targets = resolve_targets(model, cfg.lora.targets)
        if cfg.lora.layers is not None:
            targets = filter_layers(targets, cfg.lora.layers)
        inject(model, targets, lora_spec(cfg))
        assert E.estimate_for_run(cfg, hf, "cpu")["params"]["trainable"] == count_parameters(model)[0], overrides


def test_lora_dropout_costs_one_bit_per_input_element_as_measured():
    """LoRA's dropout keeps a mask per wrapped layer, packed to bits (peft/dropout.py): a real tiny model's
    saved tensors grow by exactly that, and so does the estimate, on the CPU as for CUDA."""
    from loralab.peft.inject import inject
    from loralab.peft.lora import LoraSpec
    from loralab.peft.targets import resolve_targets

    batch, seq = 2, 16
    ids = torch.randint(3, 128, (batch, seq), generator=torch.Generator().manual_seed(0))

    def lora_saved_bytes(dropout: float) -> int:
        model = tiny_llama(0, attn_implementation="sdpa")
        model.requires_grad_(False)
        inject(model, resolve_targets(model, "all-linear"), LoraSpec(r=4, alpha=8, dropout=dropout))
        with saved_bytes(exclude=model.parameters()) as seen:
            model.train()(input_ids=ids).logits.float().sum()
        return sum(seen.values())

    mask_bits = batch * seq * 2 * (6 * 32 + 64)  # tokens x layers x in_features of q k v o gate up (32), down (64)
    mask_bytes = mask_bits // 8  # each mask's 32 x 32 or 32 x 64 bits fill whole bytes
    assert lora_saved_bytes(0.1) - lora_saved_bytes(0.0) == mask_bytes
    hf = tiny_llama_config().to_dict()
    kw = dict(r=4, targets="all-linear", seq=seq, batch=batch, device="cpu", precision="fp32", attention="sdpa")
    layers = [E.estimate(hf, lora_dropout=p, **kw)["activation_detail"]["layers_bytes"] for p in (0.1, 0.0)]
    assert layers[0] - layers[1] == mask_bytes
    on_gpu = [E.estimate(hf, lora_dropout=p, **{**kw, "device": "cuda"})["activation_detail"]["layers_bytes"]
              for p in (0.1, 0.0)]
    assert on_gpu[0] - on_gpu[1] == mask_bytes


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_norm_outputs_rebuilt_in_backward_leave_the_estimate_where_gradient_reaches_the_norm(precision):
    """model/rebuild.py keeps no norm output where the norm has a gradient to rebuild it from: every norm but the
    first LoRA layer's first one (it reads frozen activations); full fine-tuning in bf16 keeps autocast's
    copies instead (tests/model/test_rebuild.py: what is freed)."""
    hf = tiny_llama_config(num_hidden_layers=4).to_dict()
    a, H, b = E.arch_from_config(hf), 32, E.PRECISIONS[precision]
    kw = dict(r=4, seq=16, batch=1, device="cpu", precision=precision, attention="sdpa")

    def per_layer(**k):  # the estimate's per-layer bytes per token, summed over the 4 layers
        return 4 * E.estimate(hf, **{**kw, **k})["activation_detail"]["per_layer_per_token_bytes"]

    def kept(lora, method="lora"):  # one layer's bytes with only down_proj's input rebuilt
        return layer_bytes_per_token(a, 0, b=b, seq=16, eager=False, method=method, lora=lora, dropout=True,
                                     quantized=set(), saves_quant_inputs=True, rebuilt=frozenset({"down_in"}))
    lora = {m: 4 for m in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}
    assert per_layer() == round(4 * kept(lora) - 7 * H * b)  # 8 norms; the first one's output kept
    upper_two = per_layer(rank_of=lambda layer, name: 4 if layer >= 2 else 0)
    assert upper_two == round(2 * kept({}) + 2 * kept(lora) - 3 * H * b)  # layer 2's first norm reads frozen ones
    rebuilt_in_full = 8 * H * b if precision == "fp32" else 0
    assert per_layer(method="full") == round(4 * kept({}, "full") - rebuilt_in_full)

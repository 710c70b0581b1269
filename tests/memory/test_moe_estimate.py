"""The memory estimate on mixture-of-experts decoders (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, gpt-oss) and
GPT-2: exact parameter counts against the models transformers builds, trainable counts against what
loralab's injection wraps, the MoE block's activations in closed form, and `loralab estimate` on a folder."""
import io
import json
from contextlib import redirect_stdout

import pytest
import torch

from loralab.cli import main
from loralab.config import load_config
from loralab.errors import UserError
from loralab.memory import arch as A
from loralab.memory import estimate as E
from loralab.memory.activations import moe_block_bytes
from tinymodels import save_tiny_gpt2_folder, save_tiny_moe_folder, tiny_gpt2

H, I, E_, K, L, V = 64, 32, 4, 2, 2, 128  # hidden, expert width, experts, per token, layers, vocab
KINDS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss")
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


def moe_config(kind: str, **overrides):
    """hidden 64, 2 layers, 4 heads / 2 KV heads, 4 experts, 2 per token, from the family's own config class."""
    import transformers as T

    common = dict(vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2,
                  num_experts_per_tok=K, max_position_embeddings=128, tie_word_embeddings=False)
    per_kind = {
        "mixtral": (T.MixtralConfig, dict(intermediate_size=I, num_local_experts=E_)),
        "qwen2_moe": (T.Qwen2MoeConfig, dict(moe_intermediate_size=I, intermediate_size=48, num_experts=E_,
                                             shared_expert_intermediate_size=40)),
        "qwen3_moe": (T.Qwen3MoeConfig, dict(moe_intermediate_size=I, intermediate_size=48, num_experts=E_,
                                             head_dim=16)),
        "olmoe": (T.OlmoeConfig, dict(intermediate_size=I, num_experts=E_)),
        "gpt_oss": (T.GptOssConfig, dict(intermediate_size=I, num_local_experts=E_, head_dim=16,
                                         layer_types=["full_attention"] * L)),
    }
    cls, extra = per_kind[kind]
    return cls(**{**common, **extra, **overrides})


def build(config):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def numel(model) -> int:
    return sum(p.numel() for p in model.parameters())  # a tied tensor once


@pytest.mark.parametrize("kind", KINDS)
def test_moe_param_count_equals_the_model_transformers_builds(kind):
    cfg = moe_config(kind)
    counts = A.count_params(cfg.to_dict())
    assert counts["total"] == numel(build(cfg))
    assert counts["experts"] == L * E_ * 3 * H * I + (L * E_ * (2 * I + H) if kind == "gpt_oss" else 0)


@pytest.mark.parametrize("overrides", [dict(mlp_only_layers=[0]), dict(decoder_sparse_step=2),
                                       dict(tie_word_embeddings=True)])
def test_qwen_moe_dense_layers_and_tied_embeddings_count_exactly(overrides):
    for kind in ("qwen2_moe", "qwen3_moe"):
        cfg = moe_config(kind, **overrides)
        assert A.count_params(cfg.to_dict())["total"] == numel(build(cfg)), kind


@pytest.mark.parametrize("overrides", [{}, dict(n_inner=96), dict(tie_word_embeddings=False)])
def test_gpt2_param_count_equals_the_model(overrides):
    model = tiny_gpt2(0, **overrides)
    assert A.count_params(model.config.to_dict())["total"] == numel(model)


def _injected_trainable(model, targets, r, target_parameters=()):
    from loralab.peft.experts import inject_experts
    from loralab.peft.inject import inject
    from loralab.peft.lora import LoraSpec

    spec = LoraSpec(r=r, alpha=2 * r, dropout=0.0)
    inject(model, targets, spec)
    if target_parameters:
        inject_experts(model, list(target_parameters), spec)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("targets", ["all-linear", "all-linear+head", "attn"])
def test_trainable_count_is_what_loralab_wraps(kind, targets):
    cfg = moe_config(kind)
    est = E.estimate(cfg.to_dict(), targets=targets, r=4, seq=16, device="cpu", lora_dropout=0.0)
    assert est["params"]["trainable"] == _injected_trainable(build(cfg), targets, 4)


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "gpt_oss"])
def test_trainable_count_with_expert_lora_too(kind):
    cfg = moe_config(kind)
    est = E.estimate(cfg.to_dict(), targets="all-linear", r=3, seq=16, device="cpu", lora_dropout=0.0,
                     target_parameters=EXPERTS)
    assert est["params"]["trainable"] == _injected_trainable(build(cfg), "all-linear", 3, EXPERTS)


def test_all_linear_on_mixtral_wraps_attention_only_and_names_must_exist():
    cfg = moe_config("mixtral").to_dict()
    r = 4
    attention = r * ((H + H) + (H + 32) + (H + 32) + (H + H)) * L  # q, k, v (2 KV heads of 16), o
    assert A.count_params(cfg, "all-linear", r)["lora"] == attention
    with pytest.raises(UserError, match="gate_proj"):  # the experts are no nn.Linear: nothing to wrap
        E.estimate(cfg, targets="mlp")
    shared = moe_config("qwen2_moe").to_dict()  # its shared expert is: the names reach it
    est = E.estimate(shared, targets=["gate_proj", "up_proj", "down_proj"], r=r, seq=16, device="cpu")
    assert est["params"]["trainable"] == r * ((H + 40) * 3) * L


@pytest.mark.parametrize("targets", ["all-linear", "all-linear+head", ["c_attn"], ["mlp.c_proj", "c_fc"]])
def test_gpt2_trainable_count_is_what_loralab_wraps(targets):
    cfg = tiny_gpt2(0).config.to_dict()
    est = E.estimate(cfg, targets=targets, r=4, seq=16, device="cpu", lora_dropout=0.0)
    assert est["params"]["trainable"] == _injected_trainable(tiny_gpt2(0), targets, 4)


def test_an_unmodelled_moe_family_is_refused_not_undercounted():
    cfg = {**moe_config("mixtral").to_dict(), "model_type": "someones_moe"}
    with pytest.raises(UserError, match="mixture-of-experts family 'someones_moe'"):
        A.count_params(cfg)


def test_the_moe_block_keeps_top_k_experts_intermediate_per_token():
    a = A.arch_from_config(moe_config("mixtral").to_dict())
    b = 2
    stock = K * (3 * I + H) * b + E_ * 4 + K * 40 + 4  # gate_up, SiLU x up, expert output; routing
    assert moe_block_bytes(a, b, False, {}, False) == stock
    with_lora = stock + K * (H + I) * b                     # each expert matmul keeps its input
    assert moe_block_bytes(a, b, False, {"gate_up_proj": 2, "down_proj": 2}, False) == with_lora
    oss = A.arch_from_config(moe_config("gpt_oss").to_dict())
    assert moe_block_bytes(oss, b, False, {}, False) == K * (6 * I + H) * b + E_ * 4 + K * 40 + 4
    qwen2 = A.arch_from_config(moe_config("qwen2_moe").to_dict())  # + the shared SwiGLU and its gated output
    assert moe_block_bytes(qwen2, b, False, {}, False) == stock + 2 * 40 * b + (H + 1) * b


def test_the_estimates_layer_bytes_are_the_dense_layers_with_the_moe_mlp():
    """Per token, a Mixtral layer = a Llama layer of the same attention, its SwiGLU (2 x I x b) replaced
    by the MoE block; expert LoRA adds its updated weights once per layer, whatever the tokens."""
    from tinymodels import tiny_llama_config

    moe = moe_config("mixtral").to_dict()
    dense = tiny_llama_config(hidden_size=H, intermediate_size=I, num_attention_heads=4, num_key_value_heads=2,
                              vocab_size=V).to_dict()
    kw = dict(targets="qv", r=4, seq=16, device="cpu", precision="bf16", attention="sdpa", lora_dropout=0.0)
    per_token = {n: E.estimate(c, **kw)["activation_detail"]["per_layer_per_token_bytes"]
                 for n, c in (("moe", moe), ("dense", dense))}
    a = A.arch_from_config(moe)
    assert per_token["moe"] - per_token["dense"] == round(moe_block_bytes(a, 2, False, {}, False) - 2 * I * 2)
    base, lora = E.estimate(moe, **kw), E.estimate(moe, **kw, target_parameters=["experts.down_proj"])
    updated = E_ * (I * H + 4 * (I + H)) * 2  # per layer: bf16 W + B A, and the cast factors
    layers = lora["activation_detail"]["layers_bytes"] - base["activation_detail"]["layers_bytes"]
    assert layers == 16 * L * K * I * 2 + L * updated
    # + one layer's gradient of its updated weight, during that layer's backward
    assert lora["breakdown"]["activations"] - base["breakdown"]["activations"] == layers + updated


def test_expert_weights_count_as_frozen_weights():
    cfg = moe_config("mixtral").to_dict()
    est = E.estimate(cfg, targets="qv", r=4, seq=16, device="cpu", precision="bf16")
    frozen = A.count_params(cfg)["total"] * 2
    assert est["parts"]["frozen"] == frozen  # experts and routers included, bf16


def _cli(args) -> tuple[int, str]:
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = main(args)
    return rc, buf.getvalue()


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe", "gpt_oss", "gpt2"])
def test_cli_estimates_an_moe_or_gpt2_folder(tmp_path, kind):
    folder = save_tiny_gpt2_folder(tmp_path / kind) if kind == "gpt2" else save_tiny_moe_folder(tmp_path / kind, kind)
    rc, out = _cli(["estimate", "--model", str(folder), "--device", "cpu", "--seq", "64"])
    assert rc == 0 and "predicted peak" in out
    rc, out = _cli(["estimate", "--model", str(folder), "--device", "cpu", "--seq", "64", "--json"])
    obj = json.loads(out)
    assert obj["peak_bytes"] == sum(obj["breakdown"].values()) and obj["breakdown"]["frozen_weights"] > 0
    run = load_config(None, ["train.precision=fp32", "lora.dropout=0.0"])
    assert E.run_memory_breakdown(run, folder, "cpu")["estimated_peak_bytes"] > 0  # a run's summary.json's


def _block_saves(model, tokens: int) -> int:
    """Bytes layer 0's MoE block keeps for backward on `tokens` random bf16 tokens (parameters excluded)."""
    from tinymodels import saved_bytes

    x = torch.randn(1, tokens, H, dtype=torch.bfloat16, requires_grad=True)
    with saved_bytes(exclude=[*model.parameters(), x]) as seen:
        model.model.layers[0].mlp(x)
    return sum(seen.values())


@pytest.mark.parametrize("kind,targets", [("mixtral", []), ("mixtral", EXPERTS), ("mixtral", ["experts.down_proj"]),
                                          ("gpt_oss", []), ("gpt_oss", ["experts.gate_up_proj"])])
def test_the_moe_block_keeps_what_the_model_says(kind, targets):
    """What autograd really keeps (transformers' default experts implementation, bf16): per token as
    moe_block_bytes (exactly for Mixtral's routing; gpt-oss' router keeps less: the estimate errs high),
    and per layer, with expert LoRA, the updated weights (expert_weight_bytes; + the experts' int32 offsets)."""
    from loralab.memory.activations import expert_weight_bytes
    from loralab.peft.experts import inject_experts
    from loralab.peft.lora import LoraSpec

    cfg = moe_config(kind)
    model = build(cfg).to(torch.bfloat16).requires_grad_(False)
    with torch.no_grad():  # a real routing (gpt-oss' router starts at zero)
        for name, p in model.named_parameters():
            if name.endswith(("gate.weight", "router.weight")):
                p.normal_(std=0.5)
    if targets:
        inject_experts(model, targets, LoraSpec(r=4, alpha=8, dropout=0.0))
    short, long = _block_saves(model, 256), _block_saves(model, 512)
    per_token, fixed = (long - short) / 256, short - 256 * (long - short) / 256
    a = A.arch_from_config(cfg.to_dict())
    lora = {t.rpartition(".")[2]: 4 for t in targets}
    modelled = moe_block_bytes(a, 2, False, lora, False)
    assert per_token == modelled if kind == "mixtral" else per_token <= modelled <= 1.05 * per_token
    assert fixed - expert_weight_bytes(a, 2, lora) == 4 * E_  # grouped_mm's int32 offsets per expert


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("drop", [0.0, 0.1])
@pytest.mark.parametrize("targets", [None, "all-linear", ["c_attn"], ["mlp.c_proj"]])
def test_a_gpt2_layer_keeps_what_the_model_says(attention, drop, targets):
    """GPT-2 as transformers runs it on the CPU in bf16 (LayerNorm, gelu_new, its dropouts, SDPA's fp32 math
    path when attention dropout is on): a frozen layer exactly, one with LoRA within 3%."""
    from loralab.memory.activations import layer_bytes_per_token
    from loralab.peft.inject import inject
    from loralab.peft.lora import LoraSpec
    from tinymodels import saved_bytes

    model = tiny_gpt2(0, attn_implementation=attention, resid_pdrop=drop, attn_pdrop=drop).to(torch.bfloat16)
    model.requires_grad_(False)
    if targets:
        inject(model, targets, LoraSpec(r=4, alpha=8, dropout=0.05))
    model.train()
    tokens = 128
    x = torch.randn(1, tokens, H, dtype=torch.bfloat16, requires_grad=True)
    with saved_bytes(exclude=[*model.parameters(), x]) as seen:
        model.transformer.h[0](x)
    real = sum(seen.values()) / tokens + H * 2  # + the layer's input, which its first LayerNorm keeps
    a = A.arch_from_config(model.config.to_dict())
    lora = {k: 4 for k in A.lora_layers(a, targets)[0][0]} if targets else {}
    modelled = layer_bytes_per_token(a, 0, b=2, seq=tokens, eager=attention == "eager", method="lora", lora=lora,
                                     dropout=bool(targets), quantized=set(), saves_quant_inputs=False, sdpa_cpu=True)
    assert modelled == real if not targets else abs(modelled - real) <= 0.03 * real


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "gpt2"])
def test_the_preflight_estimates_moe_and_gpt2_runs(kind):
    from loralab.memory import preflight as P

    cfg = load_config(None, ["train.precision=bf16", "lora.dropout=0.0",
                             *(["lora.target_parameters=[experts.down_proj]"] if kind == "mixtral" else [])])
    model_config = tiny_gpt2(0).config.to_dict() if kind == "gpt2" else moe_config(kind).to_dict()
    fits = P.check_memory(cfg, model_config, "cpu", 64, P.Room(64 * 2**30, "MemAvailable"))
    assert fits.fits is True and "estimated peak" in fits.line
    refused = P.check_memory(cfg, model_config, "cpu", 64, P.Room(1, "MemAvailable"))
    assert refused.fits is False and "not enough memory" in refused.line
    # the rank check reads the widths of what all-linear wraps there (Mixtral: attention only)
    widths = P._config_widths(cfg, model_config)
    if kind == "mixtral":
        assert set(widths) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    elif kind == "qwen2_moe":
        assert widths["shared_expert_gate"] == (H, 1) and widths["down_proj"] == (40, H)
    else:
        assert widths == {"c_attn": (H, 3 * H), "c_proj": (H, H), "c_fc": (H, 4 * H)}


@pytest.mark.parametrize("kind", KINDS)
def test_a_whole_moe_layer_keeps_what_the_model_says(kind):
    """A frozen decoder layer as transformers runs it (plain autograd: `stock_autograd`), bf16: attention
    (SDPA; gpt-oss eager, which transformers runs its sinks with), the q/k norms, the MoE block: within 1%."""
    from loralab.memory.activations import layer_bytes_per_token
    from tinymodels import saved_bytes

    cfg = moe_config(kind)
    cfg._attn_implementation = "eager" if kind == "gpt_oss" else "sdpa"
    model = build(cfg).to(torch.bfloat16).requires_grad_(False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gate.weight", "router.weight")):
                p.normal_(std=0.5)
    tokens = 128
    x = torch.randn(1, tokens, H, dtype=torch.bfloat16, requires_grad=True)
    positions = torch.arange(tokens)[None]
    rope = model.model.rotary_emb(x, positions)
    with saved_bytes(exclude=[*model.parameters(), x, *rope]) as seen:
        model.model.layers[0](x, position_embeddings=rope, attention_mask=None, position_ids=positions)
    real = sum(seen.values()) / tokens
    a = A.arch_from_config(cfg.to_dict())
    modelled = layer_bytes_per_token(a, 0, b=2, seq=tokens, eager=kind == "gpt_oss", method="lora", lora={},
                                     dropout=False, quantized=set(), saves_quant_inputs=False, stock_autograd=True)
    assert abs(modelled - real) <= 0.01 * real
    auto = E.estimate(cfg.to_dict(), seq=tokens, device="cuda")["activation_detail"]["attention"]
    assert auto == ("eager" if kind == "gpt_oss" else "sdpa")


@pytest.mark.parametrize("kind,targets", [("mixtral", "all-linear"), ("qwen2_moe", "all-linear"),
                                          ("qwen2_moe", ["q_proj", "gate_proj"]), ("qwen3_moe", "attn")])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_converted_moe_model_with_lora_keeps_about_what_the_estimate_says(tmp_path, kind, targets, precision):
    """The decoder as a run has it (loaded and converted: lean norms, the shared expert's lean SwiGLU, rebuilt
    inputs), with LoRA and expert LoRA on down_proj: what autograd keeps in its layers and final norm, within
    8% of the estimate's (the converters' rebuilds stop at an MoE block, which reads its norm's output in
    several places)."""
    from loralab.peft.experts import inject_experts
    from loralab.peft.inject import inject
    from loralab.peft.lora import LoraSpec
    from tinymodels import load_converted, saved_bytes

    cfg = moe_config(kind)
    model = build(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate.weight"):
                p.normal_(std=0.5)
    model.save_pretrained(tmp_path)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = load_converted(tmp_path, dtype=dtype, attn_implementation="sdpa")
    inject(model, targets, LoraSpec(r=4, alpha=8, dropout=0.05))
    inject_experts(model, ["experts.down_proj"], LoraSpec(r=4, alpha=8, dropout=0.0))
    model.train()
    tokens = 128
    with saved_bytes(exclude=list(model.parameters())) as seen:
        model.model(input_ids=torch.randint(3, V, (1, tokens)))
    est = E.estimate(cfg.to_dict(), targets=targets, r=4, seq=tokens, device="cpu", precision=precision,
                     attention="sdpa", lora_dropout=0.05, target_parameters=["experts.down_proj"])
    modelled = est["activation_detail"]["layers_bytes"] + tokens * H * (2 if precision == "bf16" else 4)
    assert abs(sum(seen.values()) - modelled) <= 0.08 * modelled

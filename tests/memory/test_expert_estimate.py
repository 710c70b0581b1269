"""The memory estimate counts LoRA on fused MoE expert weights (lora.target_parameters): r*E*(in+out)
per targeted weight and layer, as trainable fp32 weights, their gradients and the optimizer's state."""
import pytest

from loralab.config import from_dict
from loralab.memory.arch import expert_lora_params, expert_shapes
from loralab.memory.estimate import estimate, run_settings
from tinymodels import tiny_moe

EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


def config_of(kind):
    return tiny_moe(kind).config.to_dict()


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_expert_lora_count_is_the_closed_form_and_what_the_model_holds(kind):
    from loralab.peft.experts import inject_experts
    from loralab.peft.lora import LoraSpec

    H, I, E, L, r = 64, 32, 4, 2, 3  # tinymodels.tiny_moe's shape
    closed = L * r * E * ((H + 2 * I) + (I + H))
    assert sum(expert_lora_params(config_of(kind), EXPERTS, r)) == closed
    assert expert_lora_params(config_of(kind), ["experts.down_proj"], r) == [r * E * (I + H)] * L
    model = tiny_moe(kind)
    inject_experts(model, EXPERTS, LoraSpec(r=r, alpha=6, dropout=0.0))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == closed


def test_rank_pattern_and_dense_models():
    cfg = config_of("mixtral")
    assert expert_lora_params(cfg, EXPERTS, 2, {"layers.1.mlp.experts.down_proj": 5})[1] == \
        2 * 4 * (64 + 64) + 5 * 4 * (32 + 64)
    assert expert_shapes({"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 32}) == ({}, [])


def test_the_estimate_adds_weights_gradients_and_adamw_state_for_them():
    cfg = config_of("mixtral")
    kw = dict(method="lora", r=2, targets="qv", seq=16, batch=1, optimizer="adamw", precision="fp32", device="cpu")
    without, with_ = estimate(cfg, **kw), estimate(cfg, **kw, target_parameters=EXPERTS)
    n = 2 * 2 * 4 * ((64 + 64) + (32 + 64))
    assert with_["params"]["trainable"] - without["params"]["trainable"] == n
    parts, base = with_["parts"], without["parts"]
    assert parts["masters"] - base["masters"] == 4 * n          # fp32 factors
    assert parts["grads_step"] - base["grads_step"] == 4 * n    # fp32 gradients at the step
    assert parts["state"] - base["state"] == 8 * n              # AdamW's two fp32 moments
    assert with_["units"]["layer_bytes"] - without["units"]["layer_bytes"] == 4 * n // 2


def test_a_runs_settings_carry_its_target_parameters():
    run = from_dict({"lora": {"target_parameters": EXPERTS, "dropout": 0.0, "rank_pattern": {"down_proj": 4}}})
    settings = run_settings(run, "cpu")
    assert settings["target_parameters"] == EXPERTS and settings["rank_pattern"] == {"down_proj": 4}

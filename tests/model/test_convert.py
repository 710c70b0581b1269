"""The converters: what applies and declines per architecture, the probe that proves a rewrite before it
touches a model, and the private names each relies on."""
import pytest
import torch
import transformers as T

from loralab.data.layout import collate_packed
from loralab.data.prompts import IGNORE_INDEX
from loralab.model import attention as A
from loralab.model import convert as C
from loralab.model.convert import CONVERTERS, NAMES, Target, convert
from loralab.model.twin import WINDOW, twin_config
from loralab.train.loss import loss_sum
from tinymodels import random_encoded

SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, vocab_size=128, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
             eos_token_id=2)


def _model(config_cls, model_cls, **overrides):
    cfg = config_cls(**{**SMALL, **overrides})
    torch.manual_seed(0)
    return model_cls(cfg).eval().requires_grad_(False)


def _gemma3():  # a sliding layer and a full one, the window shorter than the examples
    return _model(T.Gemma3TextConfig, T.Gemma3ForCausalLM, sliding_window=8,
                  layer_types=["sliding_attention", "full_attention"])


def _cohere2():
    return _model(T.Cohere2Config, T.Cohere2ForCausalLM, sliding_window=8,
                  layer_types=["sliding_attention", "full_attention"])


def _gemma2():  # soft-capping on attention and on the logits
    return _model(T.Gemma2Config, T.Gemma2ForCausalLM, sliding_window=8, attn_logit_softcapping=5.0,
                  final_logit_softcapping=3.0, layer_types=["sliding_attention", "full_attention"],
                  attn_implementation="eager")


def _llama():
    return _model(T.LlamaConfig, T.LlamaForCausalLM)


def _reference_loss_and_grads(model, examples):
    """The model's own eager forward, one example at a time: what any layout must reproduce."""
    model.zero_grad(set_to_none=True)
    impl = model.config._attn_implementation
    model.set_attn_implementation("eager")
    total = 0
    for e in examples:
        logits = model(input_ids=torch.tensor([e.input_ids]), use_cache=False).logits[0, :-1].float()
        labels = torch.tensor(e.labels[1:])
        total = total + torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    total.backward()
    model.set_attn_implementation(impl)
    return float(total.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("build", [_gemma3, _cohere2, _gemma2], ids=["gemma3_text", "cohere2", "gemma2"])
def test_one_packed_row_longer_than_the_window_trains_the_models_own_math(build):
    # Before the converters, the packed blocks attended past Gemma 3's and Cohere 2's windows (the
    # gradients 160% / 110% off) and Gemma 2 did not load with SDPA at all.
    model = build()
    report = convert(model, "auto", Target())
    assert "cpu_attention" in report.applied, report.line()
    model.requires_grad_(True)
    examples = random_encoded([19, 14, 11, 9], seed=1, vocab=128)
    assert min(len(e.input_ids) for e in examples) > model.config.sliding_window
    want_loss, want = _reference_loss_and_grads(model, examples)
    batch = collate_packed(examples, pad_id=0, one_row=True)
    model.train()
    model.zero_grad(set_to_none=True)
    s, _ = loss_sum(model, batch)
    s.backward()
    assert model.config._attn_implementation == A.BLOCKS
    assert float(s) == pytest.approx(want_loss, rel=1e-5)
    for name, g in want.items():
        diff = float((model.get_parameter(name).grad - g).abs().max()) / float(g.abs().max())
        assert diff < 1e-4, (name, diff)


def test_the_probe_declines_packed_blocks_that_ignore_the_window(monkeypatch):
    mask = A._Blocks.mask
    monkeypatch.setattr(A._Blocks, "mask", lambda self, kind, dtype, window=None: mask(self, kind, dtype))
    C._PROBED.clear()
    report = convert(_gemma3(), "auto", Target())
    assert "cpu_attention" not in report.applied
    assert report.declined["cpu_attention"].startswith("probe: one packed row"), report.line()
    C._PROBED.clear()
    assert "cpu_attention" in convert(_llama(), "auto", Target()).applied  # no window: the same blocks are right


def test_llama_takes_every_rewrite_and_off_takes_none():
    report = convert(_llama(), "auto", Target())
    assert report.applied == list(NAMES) and not report.declined
    model = _llama()
    off = convert(model, "off", Target())
    assert off.applied == [] and off.declined == {} and off.line() == "model rewrites: none"
    assert "forward" not in vars(model.model.norm)  # nothing touched
    assert getattr(model, C.SELECTED_HEAD) is False  # the loss takes the model's own logits


def test_a_list_applies_those_named_and_says_what_they_need():
    report = convert(_llama(), ["rebuilt_inputs", "lean_swiglu"], Target())
    assert report.applied == ["lean_swiglu"]
    assert report.declined == {"rebuilt_inputs": "needs lean_rmsnorm"}


def test_checks_decline_with_reasons_per_architecture():
    gemma3 = convert(_gemma3(), "auto", Target()).declined
    assert "no Llama-style RMSNorm" in gemma3["lean_rmsnorm"]  # Gemma's norm scales by 1 + w
    assert "sliding-window" in gemma3["shared_prefix"]
    cohere = convert(_cohere2(), "auto", Target()).declined
    assert "do not give the model's logits" in cohere["selected_head"]  # Cohere scales its logits
    cuda = convert(_llama(), "auto", Target(torch.device("cuda"), "auto")).declined  # checked, not run
    assert cuda["cpu_attention"] == "on cuda attention runs as loaded"
    assert convert(_llama(), "auto", Target(attn_implementation="eager")).declined["cpu_attention"] \
        == "model.attn_implementation=eager"


@pytest.mark.parametrize("converter,need", [(c, n) for c in CONVERTERS for n in c.needs],
                         ids=lambda x: x if isinstance(x, str) else x.name)
def test_a_missing_private_name_declines_its_converter(converter, need, monkeypatch):
    model = _llama()  # before the name goes: transformers itself may need it to build a model
    module, _, attrs = need.partition(":")
    owner = __import__(module, fromlist=["_"])
    *path, last = attrs.split(".")
    for a in path:
        owner = getattr(owner, a)
    monkeypatch.delattr(owner, last)
    report = convert(model, [converter.name, *converter.after], Target())
    assert converter.name not in report.applied
    assert report.declined[converter.name] == f"needs {need.replace(':', '.')}, which this torch / transformers lacks"


def test_a_converter_that_crashes_on_the_twin_declines_and_the_others_stay(monkeypatch):
    def crash(model, target):
        raise RuntimeError("boom")

    broken = C.Converter("lean_swiglu", "x", lambda m, t: None, crash)
    monkeypatch.setattr(C, "CONVERTERS", tuple(broken if c.name == "lean_swiglu" else c for c in CONVERTERS))
    C._PROBED.clear()
    report = convert(_llama(), "auto", Target())
    assert report.declined == {"lean_swiglu": "probe: RuntimeError: boom"}
    assert "lean_rmsnorm" in report.applied and "cpu_attention" in report.applied
    C._PROBED.clear()


def test_the_twin_keeps_the_family_and_shrinks_the_sizes():
    big = T.Gemma3TextConfig()  # 26 layers, a 4,096-token window, 262k vocabulary
    small = twin_config(big)
    assert type(small) is type(big) and small.num_hidden_layers == 2 and small.hidden_size == 64
    assert small.sliding_window == WINDOW and sorted(set(small.layer_types)) == ["full_attention", "sliding_attention"]
    assert big.num_hidden_layers == 26 and big.sliding_window == 4096  # the model's own config is untouched
    soft = twin_config(T.Gemma2Config())
    assert soft.attn_logit_softcapping == T.Gemma2Config().attn_logit_softcapping  # kept: the probe must see it


def test_the_config_key_takes_auto_off_or_names():
    from loralab.config import from_dict
    from loralab.errors import UserError

    assert from_dict({"model": {"converters": False}}).model.converters == "off"  # YAML reads `off` as false
    assert from_dict({"model": {"converters": ["lean_rmsnorm"]}}).model.converters == ["lean_rmsnorm"]
    with pytest.raises(UserError, match="unknown converter 'lean_norm' \\(did you mean lean_rmsnorm\\?\\)"):
        from_dict({"model": {"converters": ["lean_norm"]}})

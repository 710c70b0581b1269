import math

import pytest
import torch

from loralab.config import TrainConfig
from loralab.data.batching import collate
from loralab.data.prompts import Encoded
from loralab.peft.inject import inject
from loralab.peft.lora import LoraSpec
from loralab.train.loop import Hooks, train
from loralab.train.optim import lr_multiplier, plan_steps
from loralab.train.step import accumulate_gradients
from tinymodels import tiny_llama


def _examples(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 5 + i % 4 * 3
        ids = torch.randint(3, 128, (length,), generator=g).tolist()
        prompt_len = 2 + i % 3
        out.append(Encoded(input_ids=ids, labels=[-100] * prompt_len + ids[prompt_len:], truncated=False))
    return out


def _lora_model(seed=0):
    model = tiny_llama(seed)
    # the head trains too: a frozen random tiny head caps how far the logits can move
    inject(model, "all-linear+head", LoraSpec(r=4, alpha=8, dropout=0.0))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)  # non-zero B so gradients reach A too
    return model


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_accumulation_equals_one_big_batch():
    data = _examples(8)
    big = _lora_model()
    loss_big, n_big, _ = accumulate_gradients(big, [collate(data, 0)])
    small = _lora_model()
    micro = [collate(data[i:i + 2], 0) for i in range(0, 8, 2)]
    loss_small, n_small, _ = accumulate_gradients(small, micro)
    assert n_big == n_small
    assert loss_big == pytest.approx(loss_small, rel=1e-5)
    g_big, g_small = _grads(big), _grads(small)
    assert g_big.keys() == g_small.keys() and g_big
    for k in g_big:
        torch.testing.assert_close(g_small[k], g_big[k], rtol=1e-4, atol=1e-6)


def test_accumulation_is_per_token_not_per_batch():
    # Unequal micro batches: averaging per micro batch would weight the short one too much.
    data = _examples(3)
    a = _lora_model()
    accumulate_gradients(a, [collate(data, 0)])
    b = _lora_model()
    accumulate_gradients(b, [collate(data[:1], 0), collate(data[1:], 0)])
    for k, g in _grads(a).items():
        torch.testing.assert_close(_grads(b)[k], g, rtol=1e-4, atol=1e-6)


def test_warmup_then_cosine_closed_form():
    cfg = TrainConfig(warmup_steps=10, scheduler="cosine", min_lr_ratio=0.1)
    assert lr_multiplier(0, 110, cfg) == pytest.approx(0.1)
    assert lr_multiplier(9, 110, cfg) == pytest.approx(1.0)
    assert lr_multiplier(10, 110, cfg) == pytest.approx(1.0)
    assert lr_multiplier(60, 110, cfg) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_multiplier(110, 110, cfg) == pytest.approx(0.1)
    lin = TrainConfig(scheduler="linear")
    assert lr_multiplier(25, 100, lin) == pytest.approx(0.75)
    assert lr_multiplier(50, 100, TrainConfig(scheduler="constant")) == 1.0


def test_plan_steps_from_epochs_or_max_steps():
    assert plan_steps(100, TrainConfig(batch_size=8, grad_accum=2, epochs=2)) == 2 * math.ceil(100 / 16)
    assert plan_steps(100, TrainConfig(max_steps=7)) == 7


@pytest.mark.parametrize("optimizer, lr", [("adamw", 5e-2), ("sgd", 0.3)])
def test_training_reduces_loss_and_touches_only_lora(optimizer, lr):
    data = _examples(4) * 4
    model = _lora_model()
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    cfg = TrainConfig(optimizer=optimizer, lr=lr, batch_size=4, max_steps=30, progress=False, seed=0, warmup_steps=3)
    result = train(model, data, cfg, pad_id=0, val_data=data[:4])
    assert result.steps == 30 and len(result.history) == 30
    assert result.history[-1]["loss"] < 0.7 * result.history[0]["loss"]
    assert result.final_val_loss is not None
    # 16 examples, batch 4: each 4 steps is one full epoch over every token
    tokens_per_epoch = sum(len(e.input_ids) for e in data)
    assert result.history[3]["tokens"] == tokens_per_epoch and result.history[7]["tokens"] == 2 * tokens_per_epoch
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_same_seed_same_result():
    data = _examples(8)
    cfg = TrainConfig(lr=1e-2, batch_size=2, max_steps=6, progress=False, seed=3)
    a, b = _lora_model(), _lora_model()
    ra = train(a, data, cfg, pad_id=0)
    rb = train(b, data, cfg, pad_id=0)
    assert [h["loss"] for h in ra.history] == [h["loss"] for h in rb.history]
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), n


def test_eval_every_records_validation_history():
    data = _examples(8)
    cfg = TrainConfig(lr=1e-2, batch_size=4, max_steps=6, eval_every=2, progress=False)
    seen = []
    r = train(_lora_model(), data, cfg, pad_id=0, val_data=data[:2], hooks=Hooks(on_eval=seen.append))
    assert [v["step"] for v in r.val_history] == [2, 4, 6]
    assert seen == r.val_history


def test_packed_training_equals_padded_training():
    """train.packing changes only the layout of each micro batch: same losses, same adapter."""
    data = _examples(12)
    runs = {}
    for packing in (False, True):
        cfg = TrainConfig(lr=1e-2, batch_size=4, grad_accum=2, max_steps=5, progress=False, seed=1,
                          packing=packing, precision="fp32")
        model = _lora_model()
        result = train(model, data, cfg, pad_id=0)
        runs[packing] = (result, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    (plain, plain_w), (packed, packed_w) = runs[False], runs[True]
    assert [h["tokens"] for h in plain.history] == [h["tokens"] for h in packed.history]
    for a, b in zip(plain.history, packed.history):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5), (a, b)
    for n in plain_w:
        torch.testing.assert_close(packed_w[n], plain_w[n], rtol=1e-4, atol=1e-5)


def test_packing_falls_back_to_padding_for_a_model_that_ignores_positions(monkeypatch):
    import loralab.model.convert as convert_mod
    import loralab.train.step as step_mod

    monkeypatch.setattr(convert_mod, "_probe_once", lambda model, converters, target: (
        "probe: packed rows differ" if any(c.name == "packed_rows" for c in converters) else None))
    seen = []
    real = step_mod.accumulate_gradients
    monkeypatch.setattr(step_mod, "accumulate_gradients",
                        lambda model, micro, **kw: (seen.extend(micro), real(model, micro, **kw))[1])
    cfg = TrainConfig(lr=1e-2, batch_size=4, max_steps=2, progress=False, packing=True)
    with pytest.warns(UserWarning, match="packed_rows converter declined"):
        train(_lora_model(), _examples(8), cfg, pad_id=0)
    assert seen and all("position_ids" not in b for b in seen)


def test_group_by_length_sees_every_example_once_per_epoch():
    data = _examples(16)
    cfg = TrainConfig(lr=1e-2, batch_size=2, max_steps=8, progress=False, group_by_length=2)
    r = train(_lora_model(), data, cfg, pad_id=0)
    assert r.history[-1]["tokens"] == sum(len(e.input_ids) for e in data)


def test_the_progress_bar_labels_its_loss_a_running_mean(capsys):
    """The bar averages the steps since its last update; the run table shows the last step's loss."""
    cfg = TrainConfig(lr=1e-2, batch_size=4, max_steps=4, log_every=2, progress=True, seed=0)
    train(_lora_model(), _examples(8), cfg, pad_id=0)
    err = capsys.readouterr().err
    assert "loss(avg)=" in err and "loss=" not in err.replace("loss(avg)=", "")

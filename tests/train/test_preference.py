"""DPO and ORPO (train/preference.py) against TRL 1.16 on the same batch and the same LoRA weights (PEFT), in
fp32: losses and every LoRA gradient within 1e-5; accumulation and the reference with LoRA switched off."""
import tempfile
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from loralab.data.formats import Example
from loralab.data.preference import PAIRS, PreferencePair, collate_pairs, encode_pairs
from loralab.peft.inject import inject
from loralab.peft.lora import LoraSpec, lora_disabled, lora_modules
from loralab.train.preference import PreferenceLoss, dpo_losses, orpo_log_odds, sequence_logps
from loralab.train.step import train_step
from tinymodels import tiny_llama

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RECORDS = [{"prompt": f"Q: {a}+{b}=", "chosen": f" {a + b}", "rejected": f" {a + b + d}"}
           for a, b, d in [(1, 2, 1), (13, 4, -10), (5, 55, 9), (7, 8, 1), (21, 9, 3), (6, 0, 12)]]


def _objective(**kw):
    base = dict(objective="dpo", beta=0.1, dpo_loss="sigmoid", label_smoothing=0.0, orpo_lambda=0.1)
    return SimpleNamespace(**{**base, **kw})


def _ours(seed=3):
    m = tiny_llama(0)
    inject(m, TARGETS, LoraSpec(r=4, alpha=8, dropout=0.0))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, mod in lora_modules(m):
            mod.lora_B.weight.copy_(torch.randn(mod.lora_B.weight.shape, generator=g) * 0.05)
    return m.train()


def _peft_config():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS)


def _copy_into(pm, ours):
    """ours' factors into the PEFT model's adapter."""
    with torch.no_grad():
        for name, mod in lora_modules(ours):
            layer = pm.base_model.model.get_submodule(name)
            layer.lora_A["default"].weight.copy_(mod.lora_A.weight)
            layer.lora_B["default"].weight.copy_(mod.lora_B.weight)
    return pm.train()


def _peft_twin(ours):
    from peft import get_peft_model

    pm = get_peft_model(tiny_llama(0), _peft_config())
    return _copy_into(pm, ours)


def _grads(ours, pm) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for name, mod in lora_modules(ours):
        layer = pm.base_model.model.get_submodule(name)
        out += [(mod.lora_A.weight.grad, layer.lora_A["default"].weight.grad),
                (mod.lora_B.weight.grad, layer.lora_B["default"].weight.grad)]
    return out


def _trl_dpo(tok, **kw):
    """TRL's DPOTrainer creating its adapter on the base (so its reference is the base with the adapter off,
    as loralab's: handed a PEFT model, it would copy that adapter as the reference)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=tempfile.mkdtemp(), report_to="none", use_cpu=True, bf16=False, max_length=None,
                     per_device_train_batch_size=len(RECORDS), **kw)
    trainer = DPOTrainer(model=tiny_llama(0), args=args, train_dataset=Dataset.from_list(RECORDS),
                         processing_class=tok, peft_config=_peft_config())
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(RECORDS))])
    return trainer, batch


def _as_ours(batch) -> dict:
    """TRL's batch (chosen rows, then rejected) with its completion mask as loralab's labels."""
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "labels": batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100),
            PAIRS: torch.tensor(batch["input_ids"].shape[0] // 2)}


@pytest.mark.parametrize("kw", [dict(loss_type=["sigmoid"], beta=0.1), dict(loss_type=["hinge"], beta=0.5),
                                dict(loss_type=["ipo"], beta=0.2),
                                dict(loss_type=["robust"], beta=0.1, label_smoothing=0.2)])
def test_dpo_loss_and_gradients_equal_trl(kw, tiny_tokenizer):
    ours = _ours()
    trainer, batch = _trl_dpo(tiny_tokenizer, **kw)
    pm = _copy_into(trainer.model, ours)
    theirs = trainer.compute_loss(trainer.model, batch)
    theirs.backward()
    module = PreferenceLoss(ours, _objective(beta=kw["beta"], dpo_loss=kw["loss_type"][0],
                                             label_smoothing=kw.get("label_smoothing", 0.0)))
    s, n = module(_as_ours(batch))
    (s / n).backward()
    assert abs(float(s / n) - float(theirs)) < 1e-5
    assert float(theirs) != pytest.approx(float(dpo_losses(*torch.zeros(4, 1), beta=kw["beta"],
                                                           loss=kw["loss_type"][0], n_c=torch.ones(1),
                                                           n_r=torch.ones(1),
                                                           label_smoothing=kw.get("label_smoothing", 0.0))))
    for g_ours, g_peft in _grads(ours, pm):
        assert g_ours.abs().max() > 0
        torch.testing.assert_close(g_ours, g_peft, atol=1e-5, rtol=1e-5)


def test_loralab_encodes_text_pairs_as_trl_does(tiny_tokenizer):
    _, batch = _trl_dpo(tiny_tokenizer)
    pairs = [PreferencePair(Example(prompt=r["prompt"], response=r["chosen"], kind="prompt"),
                            Example(prompt=r["prompt"], response=r["rejected"], kind="prompt")) for r in RECORDS]
    enc, stats = encode_pairs(pairs, tiny_tokenizer, template="raw")
    ours = collate_pairs(enc, tiny_tokenizer.pad_token_id)
    assert stats["n_kept"] == len(RECORDS)
    theirs = _as_ours(batch)
    width = theirs["input_ids"].shape[1]
    assert ours["input_ids"].shape[1] == width
    for key in ("input_ids", "labels", "attention_mask", PAIRS):
        assert torch.equal(ours[key], theirs[key]), key


def test_orpo_loss_and_gradients_equal_trls_terms(tiny_tokenizer):
    """TRL's ORPOTrainer takes its NLL over the prompt too; loralab's, as the ORPO paper's L_SFT, over the chosen
    answer (its labels, as SFT). The odds-ratio term and the per-token mean log-probabilities are TRL's own
    functions; the NLL is cross-entropy on the chosen rows' labels."""
    from trl.experimental.orpo import ORPOTrainer

    ours = _ours()
    pm = _peft_twin(ours)
    _, batch = _trl_dpo(tiny_tokenizer)
    b = _as_ours(batch)
    n, lam = len(RECORDS), 0.25
    logits = pm(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    mean_logps = ORPOTrainer.get_batch_logps(logits, b["labels"], average_log_prob=True)
    fake = SimpleNamespace(beta=lam, accelerator=SimpleNamespace(device=torch.device("cpu")))
    losses = ORPOTrainer.odds_ratio_loss(fake, mean_logps[:n], mean_logps[n:])[0]
    nll = F.cross_entropy(logits[:n, :-1].reshape(-1, logits.shape[-1]), b["labels"][:n, 1:].reshape(-1))
    theirs = nll - losses.mean()
    theirs.backward()
    s, k = PreferenceLoss(ours, _objective(objective="orpo", orpo_lambda=lam))(b)
    (s / k).backward()
    assert abs(float(s / k) - float(theirs)) < 1e-5
    for g_ours, g_peft in _grads(ours, pm):
        torch.testing.assert_close(g_ours, g_peft, atol=1e-5, rtol=1e-5)


def test_log_odds_closed_form():
    p = torch.tensor([0.3, 0.9]).log()
    q = torch.tensor([0.2, 0.5]).log()
    want = torch.log(torch.tensor([0.3 / 0.7, 0.9 / 0.1])) - torch.log(torch.tensor([0.2 / 0.8, 0.5 / 0.5]))
    torch.testing.assert_close(orpo_log_odds(p, q), want)


def test_cdpo_label_smoothing_closed_form():
    z = torch.tensor([0.7])
    got = dpo_losses(z, torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=2.0, label_smoothing=0.1)
    want = -0.9 * torch.log(torch.sigmoid(torch.tensor(1.4))) - 0.1 * torch.log(torch.sigmoid(torch.tensor(-1.4)))
    torch.testing.assert_close(got, want.reshape(1))


def _pairs_batch(k, tok):
    pairs = [PreferencePair(Example(prompt=r["prompt"], response=r["chosen"], kind="prompt"),
                            Example(prompt=r["prompt"], response=r["rejected"], kind="prompt")) for r in RECORDS[:k]]
    return encode_pairs(pairs, tok, template="raw")[0]


def test_reference_is_the_model_with_lora_off(tiny_tokenizer):
    ours = _ours()
    batch = collate_pairs(_pairs_batch(4, tiny_tokenizer), tiny_tokenizer.pad_token_id)
    with torch.no_grad(), lora_disabled(ours):
        off, _ = sequence_logps(ours, batch)
    base, _ = sequence_logps(tiny_llama(0), batch)
    on, _ = sequence_logps(ours, batch)
    torch.testing.assert_close(off, base.detach(), atol=1e-6, rtol=0)
    assert (on - off).abs().max() > 1e-4  # the adapter changes the scores: switching it off did something
    assert all(not m.merged for _, m in lora_modules(ours))  # switched back on


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_accumulation_equals_one_big_batch(objective, tiny_tokenizer):
    """Micro batches of 2 + 3 + 1 pairs, normalised over the global batch, give one batch of 6's gradient."""
    enc = _pairs_batch(6, tiny_tokenizer)
    pad = tiny_tokenizer.pad_token_id
    results = []
    for parts in ([enc], [enc[:2], enc[2:5], enc[5:]]):
        model = _ours()
        module = PreferenceLoss(model, _objective(objective=objective))
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=1.0)
        out = train_step(module, [collate_pairs(p, pad) for p in parts], opt, params)
        results.append((out, [p.detach().clone() for p in params]))
    (big, w_big), (small, w_small) = results
    assert big.n_label == small.n_label == 6
    assert abs(big.loss - small.loss) < 1e-6
    assert set(big.extra) == {"reward_accuracy", "reward_margin", "policy_accuracy"}
    assert big.extra == pytest.approx(small.extra, abs=1e-6)
    for a, b in zip(w_big, w_small):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_merged_layer_cannot_be_switched_off():
    ours = _ours()
    next(m for _, m in lora_modules(ours)).merge()
    with pytest.raises(ValueError, match="merged"):
        with lora_disabled(ours):
            pass


@pytest.mark.parametrize("objective, mode", [("dpo", "ddp"), ("orpo", "fsdp")])
def test_two_processes_make_the_one_process_update(objective, mode, tiny_folder, tmp_path):
    """33 pairs, global micro batch 8 (2 x 4), accumulation 2: the epoch ends on one pair (rank 1 stands in
    with weight 0); the per-pair normalisation over the global batch makes 2 ranks equal to 1 process."""
    import json
    import subprocess
    import sys

    from safetensors.torch import load_file

    from loralab.config import load_config
    from loralab.pipeline import run_training

    run = [f"model.name={tiny_folder}", "data.tasks=[2da]", "data.template=raw", "data.val_fraction=0", "lora.r=4",
           "lora.dropout=0.0", "train.precision=fp32", "train.progress=false", "train.lr=1e-2", "eval.before=false",
           "eval.tasks=[2da]", "eval.n=3", "eval.stop_check=false", "eval.test_loss=false", "data.n_train=33",
           "train.max_steps=3", "train.grad_accum=2",
           f"train.objective={objective}"]
    one, two = tmp_path / "one", tmp_path / "two"
    ref = run_training(load_config(None, [*run, f"output_dir={one}", "train.batch_size=8"]), quiet=True)
    proc = subprocess.run([sys.executable, "-m", "loralab.cli", "train", *run, f"output_dir={two}",
                           "train.batch_size=4", f"train.distributed={mode}", "--nproc", "2"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    x, y = (load_file(r / "adapter" / "adapter_model.safetensors") for r in (one, two))
    assert max(float((x[k] - y[k]).abs().max()) for k in x) <= 1e-5
    summary = json.loads((two / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["train_tokens"] == ref["train_tokens"]
    assert abs(summary["final_train_loss"] - ref["final_train_loss"]) <= 1e-5
    after = summary["preference"]["2da"]["after"]  # scored on every rank (FSDP2: its root unit gathered)
    assert after["n"] == 3 and abs(after["reward_margin"] - ref["preference"]["2da"]["after"]["reward_margin"]) < 1e-4

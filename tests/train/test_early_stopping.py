"""Early stopping in the training loop (train/loop.py): a scripted validation curve decides."""
import itertools

import torch


def _scripted_training(monkeypatch, losses, patience, max_steps=40):
    import loralab.train.loop as T
    from loralab.config import TrainConfig
    from loralab.data.prompts import Encoded
    from loralab.peft.inject import inject
    from loralab.peft.lora import LoraSpec
    from tinymodels import tiny_llama

    script = iter(losses)
    monkeypatch.setattr(T, "mean_loss", lambda *a, **k: next(script))
    model = tiny_llama(0)
    inject(model, "qv", LoraSpec(r=2, alpha=4, dropout=0.0))
    data = [Encoded(input_ids=list(range(3, 11)), labels=[-100] * 3 + list(range(6, 11)), truncated=False)] * 4
    cfg = TrainConfig(max_steps=max_steps, eval_every=2, early_stopping_patience=patience, batch_size=2,
                      progress=False, lr=1e-3)
    return T.train(model, data, cfg, pad_id=0, val_data=data[:2])


def test_early_stopping_after_patience_bad_evaluations(monkeypatch):
    result = _scripted_training(monkeypatch, [1.0, 0.8, 0.85, 0.9, 0.95, 0.7, 0.6], patience=3)
    assert result.stopped_early and not result.interrupted
    assert result.steps == 10  # evaluations at 2, 4 (best), 6, 8, 10: three without improvement
    assert [v["is_best"] for v in result.val_history[:5]] == [True, True, False, False, False]
    assert len(result.val_history) == 6  # plus the final validation after stopping


def test_an_improvement_resets_the_patience(monkeypatch):
    result = _scripted_training(monkeypatch, [1.0, 1.1, 1.2, 0.9, 1.0, 1.1, 1.2, 0.5], patience=3)
    assert result.stopped_early and result.steps == 14


def test_no_patience_never_stops(monkeypatch):
    result = _scripted_training(monkeypatch, itertools.count(1.0), patience=0, max_steps=12)
    assert not result.stopped_early and result.steps == 12
    assert torch.isfinite(torch.tensor(result.final_train_loss))

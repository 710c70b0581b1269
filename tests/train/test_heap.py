"""train/heap.py: where and when the heap is trimmed during a training forward."""
import pytest
import torch

from loralab.config import TrainConfig
from loralab.data.prompts import Encoded
from loralab.peft.inject import inject
from loralab.peft.lora import LoraSpec
from loralab.train import heap
from loralab.train.loop import Hooks, train
from tinymodels import tiny_llama


def test_trim_points_are_every_nth_block_and_the_last():
    assert heap.trim_points(30, 10) == [9, 19, 29]
    assert heap.trim_points(32, 10) == [9, 19, 29, 31]
    assert heap.trim_points(2, 10) == [1]
    assert heap.trim_points(1, 10) == [0]
    assert heap.trim_points(0, 10) == []


def test_glibc_malloc_trim_is_found_on_linux():
    import platform
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    assert heap.malloc_trim() is not None and heap.malloc_trim()(0) in (0, 1)


@pytest.fixture
def calls(monkeypatch):
    n = []
    monkeypatch.setattr(heap, "malloc_trim", lambda: n.append)
    monkeypatch.setattr(heap, "MIN_POSITIONS", 14)  # the tiny batches below: 2 x 7 positions
    return n


def _model():
    model = tiny_llama(seed=0, num_hidden_layers=12)
    inject(model, "all-linear", LoraSpec(r=4, alpha=8, dropout=0.0))
    return model


def _batch(width=7):
    ids = torch.randint(3, 128, (2, width), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids}


def test_trims_only_in_a_training_forward_and_the_hooks_come_off(calls):
    model = _model()
    handles = heap.trim_heap_in_forward(model)
    assert len(handles) == 2  # before blocks 9 and 11 of 12
    model.train()
    model(**_batch())
    assert len(calls) == 2
    with torch.no_grad():  # validation, generation: nothing is kept for backward, nothing to trim
        model(**_batch())
    model.eval()
    model(**_batch())
    assert len(calls) == 2
    model.train()
    model(**_batch(width=6))  # 12 positions: below MIN_POSITIONS, holes too small to pay
    assert len(calls) == 2
    for h in handles:
        h.remove()
    model.train()
    model(**_batch())
    assert len(calls) == 2


@pytest.mark.parametrize("trim_heap", [True, False])
def test_the_loop_trims_per_micro_batch_when_asked_and_leaves_no_hook(calls, trim_heap):
    model = _model()
    data = [Encoded(list(range(3, 3 + n)), list(range(3, 3 + n))) for n in (7, 7, 7, 7)]
    cfg = TrainConfig(lr=1e-2, batch_size=2, grad_accum=2, max_steps=2, progress=False, trim_heap=trim_heap)
    seen = []
    train(model, data, cfg, pad_id=0, hooks=Hooks(on_start=lambda s: seen.append(len(calls))))
    # 2 steps x 2 micro batches x 2 trims (the one-time layout checks run before on_start)
    assert len(calls) - seen[0] == (8 if trim_heap else 0)
    assert all(not b._forward_pre_hooks for b in model.model.layers)


def test_on_a_preloaded_malloc_it_warns_and_does_nothing(calls, monkeypatch):
    monkeypatch.setattr(heap, "active_allocator", lambda: "tcmalloc")
    with pytest.warns(UserWarning, match="runs on tcmalloc: ignored"):
        assert heap.trim_heap_in_forward(_model()) == []

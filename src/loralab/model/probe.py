"""The converters' probe: a rewrite runs on a tiny twin of the model (twin.py) and must give the loss and
every gradient of the untouched twin, on the layouts training will feed it.

The reference is the model's own forward in eager attention, one example at a time (no padding, no
packing), summed. The rewritten twin gets the same examples the way training lays them out: padded rows,
packed in one row (its attention in blocks, each kind the CPU may pick), packed in rows (the model's own
masks from restarting positions), a shared prefix. The examples are longer than the twin's sliding window
and start with a common prefix. Every parameter of the twin trains, so each backward a rewrite replaces
runs. A rewrite that changes the math, or crashes, fails here and declines (convert.py) instead of training
something else.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from ..data.batching import collate
from ..data.layout import collate_packed, collate_shared, label_free_prefix
from ..data.prompts import IGNORE_INDEX, Encoded
from .attention import RECOMPUTE, attention_for_rows, forced_kind
from .head import head_matches
from .packing import packed_inputs, positions_into
from .shared_prefix import shared_prefix_inputs

LENGTHS = (11, 9, 7, 8)  # each longer than twin.WINDOW: a rewrite that ignores the window shows
PREFIX = 3               # tokens the examples share (the shared-prefix layout needs them label-free)
TOLERANCE = 1e-4         # max |difference| / max |reference| per gradient, fp32: summation order only


def _examples(vocab: int, seed: int = 0) -> list[Encoded]:
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(3, vocab, (PREFIX,), generator=g).tolist()
    out = []
    for n in LENGTHS:
        ids = prefix + torch.randint(3, vocab, (n - PREFIX,), generator=g).tolist()
        out.append(Encoded(input_ids=ids, labels=[IGNORE_INDEX] * PREFIX + ids[PREFIX:]))
    return out


def _ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def _grads(model, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _reference(twin, examples) -> tuple[float, dict]:
    total = sum(_ce_sum(twin(input_ids=torch.tensor([e.input_ids]), use_cache=False).logits,
                        torch.tensor([e.labels])) for e in examples)
    return float(total.detach()), _grads(twin, total)


def _layouts(model, examples, pad_id: int, probed: set[str]):
    """(name, thunk giving the loss sum) for each layout the probed rewrites change."""
    def padded():
        batch = collate(examples, pad_id)
        attention_for_rows(model, batch["input_ids"].shape[1])
        return _ce_sum(model(**packed_inputs(batch), use_cache=False).logits, batch["labels"])

    def packed(one_row: bool, capacity: int | None = None):
        batch = collate_packed(examples, pad_id, capacity=capacity, one_row=one_row)
        attention_for_rows(model, batch["input_ids"].shape[1], one_packed_row=one_row)
        with positions_into(model, batch["position_ids"]):
            return _ce_sum(model(**packed_inputs(batch), use_cache=False).logits, batch["labels"])

    def shared():
        batch = collate_shared(examples, pad_id, label_free_prefix(examples))  # as training lays it out
        attention_for_rows(model, batch["input_ids"].shape[1])
        return _ce_sum(model(**shared_prefix_inputs(model, batch)).logits, batch["labels"])

    yield "padded rows", padded
    if "packed_rows" in probed:
        yield "packed rows", lambda: packed(False, capacity=sum(LENGTHS[:2]))
    if "cpu_attention" in probed:
        for kind in ("sdpa", RECOMPUTE):  # the kernels the CPU picks by row length and dtype
            def blocks(kind=kind):
                with forced_kind(kind):
                    return packed(True)
            yield f"one packed row ({kind} blocks)", blocks
    if "shared_prefix" in probed:
        yield "shared prefix", shared


def _worst(ref: dict, got: dict) -> tuple[float, str]:
    if ref.keys() != got.keys():
        missing = sorted(ref.keys() ^ got.keys())
        return float("inf"), f"gradients of {missing[0]} differ in presence"
    worst, where = 0.0, ""
    for name, g in ref.items():
        d = float((got[name] - g).abs().max()) / max(float(g.abs().max()), 1e-12)
        if not d <= worst:
            worst, where = d, name
    return worst, where


def probe(model, apply, probed: set[str], pad_id: int = 0) -> str | None:
    """None when `apply(twin)` (the rewrites named in `probed`, applied to a twin of `model`) leaves the loss
    and every gradient of each layout those rewrites touch as the untouched twin's; else why not."""
    from .twin import build_twin

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a twin's matmuls are too small to share; threads waiting on each other cost more
    try:
        return _probe(model, apply, probed, pad_id, build_twin)
    finally:
        torch.set_num_threads(threads)


def _probe(model, apply, probed: set[str], pad_id: int, build_twin) -> str | None:
    try:
        reference = build_twin(model)
    except Exception as e:  # noqa: BLE001 - a config the twin cannot shrink: nothing is proven, so decline
        return f"no tiny twin of {type(model).__name__} to probe on ({type(e).__name__}: {str(e)[:120]})"
    examples = _examples(reference.config.vocab_size)
    candidate = copy.deepcopy(reference)
    try:
        apply(candidate)
        if "selected_head" in probed and not head_matches(candidate):
            return "probe: the decoder body and output layer do not give the model's logits"
        ref_loss, ref_grads = _reference(reference, examples)  # both in eval mode: no dropout draws to tell apart
        for name, run in _layouts(candidate, examples, pad_id, probed):
            loss = run()
            got = _grads(candidate, loss)
            if abs(float(loss.detach()) - ref_loss) > TOLERANCE * abs(ref_loss):
                return f"probe: {name}: loss {float(loss.detach()):.6g} vs the model's own {ref_loss:.6g}"
            worst, where = _worst(ref_grads, got)
            if not worst <= TOLERANCE:
                return f"probe: {name}: gradient of {where} differs by {worst:.2g} (relative)"
    except Exception as e:  # noqa: BLE001 - a rewrite that crashes on this model declines, with the reason
        return f"probe: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    return None

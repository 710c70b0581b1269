"""Held-out evaluation: exact match by batched greedy generation, perplexity. (The mean token loss
is the training loss's: loralab.train.loss.mean_loss.)"""
from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from ..data.batching import left_pad
from ..data.layout import shared_prefix_length
from ..data.prompts import render_prompt, stop_token_ids
from ..data.tasks import answer_matches
from ..model.prefix_cache import MIN_SHARED_ROWS, cache_kwarg, prefix_cache
from ..peft.lora import zero_updates_skipped


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


@contextmanager
def fp32_decoding_on_cpu(model):
    """Run greedy decoding with bf16 weights upcast to fp32 on the CPU, then restore them.

    Decoding multiplies a few rows by every weight matrix; torch's CPU bf16 kernels are slow at
    such skinny shapes, slower than fp32's (docs/performance.md, "Measurements behind the code").
    bf16 -> fp32 -> bf16 is exact, so the weights come back bit-identical.
    Only plain tensors are cast (a quantized weight subclass is left alone)."""
    cast = []
    if next(model.parameters()).device.type == "cpu":
        for t in list(model.parameters()) + list(model.buffers()):
            if t.dtype == torch.bfloat16 and type(t.data) is torch.Tensor:
                cast.append(t)
                t.data = t.data.float()
    try:
        yield
    finally:
        for t in cast:
            t.data = t.data.to(torch.bfloat16)


@contextmanager
def contiguous_head_input(model):
    """Feed the output layer a contiguous input while generating. transformers' prefill keeps the
    logits of the last position only, a strided (batch, 1, hidden) view of the hidden states, which
    torch's CPU linear multiplies as a batched matmul, several times slower than copying those rows
    first (docs/performance.md, "Measurements behind the code"). The copy is a few rows; on an already
    contiguous input it is a no-op."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        yield
        return
    handle = head.register_forward_pre_hook(lambda _m, args: (args[0].contiguous(), *args[1:]))
    try:
        yield
    finally:
        handle.remove()


def _batch_inputs(model, ids: list[list[int]], pad_id: int, device, share: bool) -> dict:
    """generate()'s inputs for one batch. When the prompts share their first tokens (a task's
    "Question: What is", a chat template's system prompt), those are run once at batch 1 and their
    cached keys/values repeated to every row; each row's own tokens follow, left-padded after the
    shared part (the attention mask skips the pads and the positions continue past them, as with
    plain left padding), so the prefill multiplies only the rows' own tokens: a third fewer on the
    arithmetic tasks' prompts."""
    p = shared_prefix_length(ids) if share else 0
    cache = None
    if p * (len(ids) - 1) >= MIN_SHARED_ROWS:
        prefix = torch.tensor([ids[0][:p]], dtype=torch.long, device=device)
        cache = prefix_cache(model, prefix)
    if cache is None:  # nothing worth sharing, or a model whose cache cannot be shared (model.prefix_cache)
        input_ids, attention_mask = left_pad(ids, pad_id)
        return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
    cache.batch_repeat_interleave(len(ids))
    own_ids, own_mask = left_pad([x[p:] for x in ids], pad_id)
    n = len(ids)
    return {"input_ids": torch.cat([prefix.expand(n, p), own_ids.to(device)], dim=1),
            "attention_mask": torch.cat([torch.ones(n, p, dtype=own_mask.dtype, device=device),
                                         own_mask.to(device)], dim=1),
            cache_kwarg(model): cache}


@dataclass
class Generation:
    text: str        # decoded without special tokens
    stopped: bool    # its first terminator was a stop token (EOS / end of turn), within its budget


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], *, batch_size: int = 32, max_new_tokens: int = 8,
             stop_at_newline: bool = True, budgets: list[int] | None = None,
             synced_gpus: bool = False) -> list[Generation]:
    """Greedy continuations of each prompt (left-padded batches). Decoding stops at the tokenizer's
    stop tokens (data.prompts.stop_token_ids) and, for one-line task answers, at a newline; a
    generation counts as `stopped` only when a stop token came first, within its own budget
    (`budgets[i]` new tokens, default max_new_tokens). synced_gpus: the model is sharded across
    ranks (FSDP2) and every rank generates in lockstep (as many prompts on each; transformers keeps
    stepping until all are done)."""
    if not prompts:
        return []
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    stops = stop_token_ids(tokenizer)
    terminators = set(stops)
    newline = tokenizer.encode("\n", add_special_tokens=False)
    if stop_at_newline and len(newline) == 1:  # task answers are one line: stop there
        terminators.add(newline[0])
    budgets = budgets or [max_new_tokens] * len(prompts)
    # Longest prompts first keeps the padding per batch small.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: dict[int, Generation] = {}
    unsharded = not synced_gpus  # sharded (FSDP2) weights stay as they are
    with (fp32_decoding_on_cpu(model) if unsharded else nullcontext(), contiguous_head_input(model),
          zero_updates_skipped(model) if unsharded else nullcontext()):
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            ids = [tokenizer.encode(prompts[i], add_special_tokens=False) for i in idx]
            inputs = _batch_inputs(model, ids, pad_id, device, share=unsharded)
            gen = model.generate(**inputs, max_new_tokens=max(budgets[i] for i in idx), do_sample=False,
                                 pad_token_id=pad_id, eos_token_id=sorted(terminators), synced_gpus=synced_gpus)
            for i, row in zip(idx, gen[:, inputs["input_ids"].shape[1]:].tolist()):
                first = next((k for k, t in enumerate(row) if t in terminators), None)  # pads come after it
                stopped = first is not None and first < budgets[i] and row[first] in stops
                results[i] = Generation(tokenizer.decode(row, skip_special_tokens=True), stopped)
    outputs = [results[i] for i in range(len(prompts))]
    model.train(was_training)
    return outputs


def generate_answers(model, tokenizer, prompts: list[str], **kw) -> list[str]:
    """generate()'s texts alone."""
    return [g.text for g in generate(model, tokenizer, prompts, **kw)]


def exact_match(model, tokenizer, examples: list, *, template: str = "auto", system_prompt="default",
                batch_size: int = 32, max_new_tokens: int = 8) -> dict:
    """Accuracy of greedy answers against each example's response. Returns accuracy, samples and
    `stopped`: how many answers ended on a stop token (EOS / end of turn) within max_new_tokens."""
    prompts = [render_prompt(ex, tokenizer, template=template, system_prompt=system_prompt) for ex in examples]
    gens = generate(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens)
    return score(examples, gens)


def score(examples: list, gens: list[Generation]) -> dict:
    """Exact-match accuracy of generations against the examples' responses, the first few as
    samples, and how many stopped on a stop token."""
    hits = [answer_matches(g.text, ex.answer) for g, ex in zip(gens, examples)]
    samples = [{"prompt": ex.question, "target": ex.answer, "output": g.text, "correct": h}
               for ex, g, h in list(zip(examples, gens, hits))[:5]]
    return {"accuracy": sum(hits) / max(len(hits), 1), "n": len(hits), "correct": sum(hits), "samples": samples,
            "stopped": sum(g.stopped for g in gens)}

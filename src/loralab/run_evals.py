"""A run's evaluations: exact match on the held-out task questions (all tasks in one generate()
call), each task's held-out answer loss, and how many held-out generations stop on EOS."""
from __future__ import annotations

from contextlib import nullcontext

from .config import RunConfig
from .data.prompts import encode_all, render_prompt
from .eval.metrics import generate, score
from .eval.stops import stop_check, task_stops
from .prepare import Datasets
from .train.distributed import SINGLE, Dist, gather, unsharded
from .train.loss import mean_loss


def run_evals(model, tok, tests: dict, cfg: RunConfig, dist: Dist = SINGLE, module=None) -> dict:
    """Exact match on each task's held-out examples, all tasks' prompts in one generate() call (one
    fp32 upcast, full batches: many small suite families cost what one large task does). With
    several ranks each generates for its share (every world-th prompt) and the answers meet on
    every rank; a sharded (FSDP2) model generates in lockstep, inside its root unit's unsharded
    scope (`module`: the wrapped LossModule)."""
    synced = dist.mode == "fsdp" and module is not None
    flat = [ex for examples in tests.values() for ex in examples]
    mine = list(range(dist.rank, len(flat), dist.world))
    n_mine = len(mine)
    if synced:  # lockstep: every rank generates as many prompts (stand-ins' answers are dropped)
        mine += [0] * (-(-len(flat) // dist.world) - n_mine)
    prompts = [render_prompt(flat[i], tok, template=cfg.data.template, system_prompt=cfg.data.system_prompt)
               for i in mine]
    with unsharded(module, dist) if synced else nullcontext():
        gens = generate(model, tok, prompts, batch_size=cfg.eval.batch_size,
                        max_new_tokens=cfg.eval.max_new_tokens, synced_gpus=synced)
    by_index = dict(pair for part in gather(dist, list(zip(mine, gens))[:n_mine]) for pair in part)
    results, start = {}, 0
    for name, examples in tests.items():
        results[name] = score(examples, [by_index[start + i] for i in range(len(examples))])
        start += len(examples)
    return results


def test_losses(module, tok, tests: dict, cfg: RunConfig, dist: Dist = SINGLE, layout=None) -> dict:
    """Each task's mean token loss on its held-out answers (teacher forced, like the validation
    loss): a held-out measure far less noisy than exact match on a few dozen questions. layout: as
    the validation's batches (train/loop.batch_layout), default padded rows."""
    kw = dict(template=cfg.data.template, system_prompt=cfg.data.system_prompt, max_seq_len=cfg.data.max_seq_len)
    out = {}
    for name, examples in tests.items():
        encoded = encode_all(examples, tok, **kw)[0]
        out[name] = mean_loss(module, encoded, batch_size=cfg.eval.batch_size, pad_id=tok.pad_token_id,
                              dist=dist, layout=layout) if encoded else None
    return out


def held_out_stops(model, tok, data: Datasets, after: dict, cfg: RunConfig, dist: Dist) -> dict | None:
    """How many held-out generations stop on EOS: the task answers' count, else the validation set's
    (generated on every rank alike; not under FSDP2, whose sharded model generates only in lockstep)."""
    if not cfg.eval.stop_check:
        return None
    if after:
        return task_stops(after, cfg.eval.max_new_tokens)
    if not data.val or not cfg.eval.n or dist.mode == "fsdp":
        return None
    return stop_check(model, tok, data.val[:cfg.eval.n], template=cfg.data.template,
                      system_prompt=cfg.data.system_prompt, slack=cfg.eval.max_new_tokens,
                      batch_size=cfg.eval.batch_size)

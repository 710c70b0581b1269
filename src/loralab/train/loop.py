"""THE training loop. `loralab train`, studies, benchmarks and multi-process runs all call `train()`.

It takes plain objects (a model whose trainable parameters are already chosen, encoded examples, a
TrainConfig, where this process stands among its ranks) and knows nothing about YAML, files or the
CLI; it reports through hooks, which run on every rank (those that write check `dist.is_main`).
Each iteration draws this rank's share of the step's micro batches and calls `step.train_step`.
"""
from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ..config import TrainConfig
from ..data.batching import collate, micro_batch_indices, rank_share
from ..data.layout import collate_packed, collate_shared, label_free_prefix, plain_slots, shared_slots
from ..data.preference import collate_pairs, is_pair
from ..errors import UserError
from ..model.attention import packs_one_row
from ..model.convert import PACKED_ROWS, REPORT, SHARED_PREFIX, Target, convert, converted
from .distributed import SINGLE, Dist, all_sum, wrap
from .heap import trim_heap_in_forward
from .loss import mean_loss
from .optim import build_optimizer, build_scheduler, plan_steps
from .precision import resolve_precision
from .preference import loss_module
from .state import LoopState, TrainResult, restore, set_rng, set_seed
from .step import WEIGHT, train_step


class NonFiniteLoss(RuntimeError):
    """The loss or gradient norm became NaN/Inf at `step` (1-based) and skipping was not asked for."""

    def __init__(self, step: int, what: str):
        super().__init__(f"non-finite {what} at step {step}")
        self.step, self.what = step, what


@dataclass
class Hooks:
    """How the loop reports, without knowing about files: each is optional."""
    on_start: Callable[[LoopState], None] | None = None     # once, when the (wrapped) module is ready
    on_log: Callable[[dict], None] | None = None            # every step's record
    on_eval: Callable[[dict], None] | None = None           # every validation record ("is_best" set)
    on_checkpoint: Callable[[LoopState], None] | None = None  # every save_every steps, at stop, at end
    should_stop: Callable[[], bool] | None = None           # e.g. a signal arrived: checkpoint and stop


def collate_micro_batch(examples: list, pad_id: int, cfg: TrainConfig, one_row: bool = False,
                        max_row: int | None = None) -> dict:
    """One micro batch's layout: packed (one_row: in a single row, where it holds at most max_row tokens:
    some models size buffers by the row, GPT-Neo's causal bias by max_position_embeddings) or padded rows,
    or, where the examples share first tokens and that computes fewer token positions, rows that hold
    those once (data.layout.collate_shared). Preference pairs: padded rows, chosen then rejected."""
    if examples and is_pair(examples[0]):
        return collate_pairs(examples, pad_id)
    one_row = one_row and (max_row is None or sum(len(e.input_ids) for e in examples) <= max_row)
    k = label_free_prefix(examples) if cfg.shared_prefix and examples else 0
    if k and shared_slots(examples, k) < plain_slots(examples, cfg.packing, one_row):
        return collate_shared(examples, pad_id, k)
    if cfg.packing:
        return collate_packed(examples, pad_id, one_row=one_row)
    return collate(examples, pad_id)


def honoured(model: torch.nn.Module, cfg: TrainConfig, warn: bool = False) -> TrainConfig:
    """cfg with train.packing / shared_prefix off where the objective or the model's rewrites cannot take them."""
    if cfg.objective != "sft":  # a pair's two rows are scored apart: padded rows, neither packed nor prefix-shared
        cfg = dataclasses.replace(cfg, packing=False, shared_prefix=False)
    if cfg.packing and not converted(model, PACKED_ROWS):
        # packing relies on the model honouring restarting position ids; otherwise examples would mix
        if warn:
            warnings.warn("train.packing: the packed_rows converter declined for this model (see the model "
                          "rewrites line); training on padded batches", stacklevel=3)
        cfg = dataclasses.replace(cfg, packing=False)
    if cfg.shared_prefix and not converted(model, SHARED_PREFIX):
        cfg = dataclasses.replace(cfg, shared_prefix=False)  # a speed-up only: the rewrites line says why not
    return cfg


def _row_limits(model: torch.nn.Module, cfg: TrainConfig) -> tuple[bool, int | None]:
    # a CPU 'auto' model packs a micro batch in one row, its attention computing the rows as blocks
    # (not compiled: finding the blocks reads the position ids, which would break the graph)
    return cfg.packing and not cfg.compile and packs_one_row(model), getattr(model.config, "max_position_embeddings",
                                                                             None)


def batch_layout(model: torch.nn.Module, cfg: TrainConfig, pad_id: int) -> Callable[[list], dict]:
    """How `model` takes a batch of examples under cfg (packed, prefix-shared or padded rows, as a micro batch
    of training): validation's batches, and the evaluations' losses (the same mean loss, fewer pad positions)."""
    cfg = honoured(model, cfg)
    one_row, max_row = _row_limits(model, cfg)
    return lambda examples: collate_micro_batch(examples, pad_id, cfg, one_row, max_row)


def micro_batches(data, cfg: TrainConfig, pad_id: int, skip: int = 0, dist: Dist = SINGLE,
                  one_row: bool = False, max_row: int | None = None) -> Iterator[dict]:
    """Endless stream of this rank's collated micro batches: each global micro batch (batch_size x
    world examples, data.batching.micro_batch_indices) split into the ranks' shares. Packing changes
    only the layout of a micro batch, never which examples it holds; so does a shared prefix.
    one_row: packed micro batches in a single row (for a model that packs_one_row)."""
    for idx in micro_batch_indices(data, cfg.batch_size * dist.world, seed=cfg.seed,
                                   group_window=cfg.group_by_length, skip=skip):
        share, weight = rank_share(idx, dist.rank, dist.world)
        batch = collate_micro_batch([data[i] for i in share], pad_id, cfg, one_row, max_row)
        if weight != 1.0:
            batch[WEIGHT] = weight
        yield batch


def uses_autocast(cfg: TrainConfig, device: torch.device) -> bool:
    """Full fine-tuning keeps fp32 master weights and computes in bf16 under autocast; LoRA runs
    with frozen weights already stored in bf16, so it needs no autocast (and no per-step casts)."""
    return cfg.method == "full" and resolve_precision(cfg.precision, device) == "bf16"


def train(model: torch.nn.Module, train_data: list, cfg: TrainConfig, *, pad_id: int,
          val_data: list | None = None, hooks: Hooks | None = None,
          resume: dict | None = None, dist: Dist = SINGLE) -> TrainResult:
    """Train the parameters of `model` that require grad. Returns losses, tokens and timings, and
    `result.module`: the LossModule as trained (DDP- or FSDP2-wrapped when `dist` says so).

    `resume` (from checkpoint.load) restores optimizer, scheduler, RNG, data position and history,
    so the continued run is bit-identical to one that never stopped (with as many ranks).
    """
    hooks = hooks or Hooks()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    set_seed(cfg.seed + dist.rank)  # each rank draws its own dropout masks
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("no trainable parameters")
    if resume is not None and len(resume["rng"]) != dist.world:
        raise UserError(f"{resume['path']}: written by {len(resume['rng'])} process(es), resumed by "
                        f"{dist.world}; resume with the same number of processes")
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not hasattr(model, REPORT):  # handed in as loaded: the default rewrites, each proven first (model/convert.py);
        # its attention stays the one it was given (only a run's `model.attn_implementation=auto` lets loralab choose)
        convert(model, "auto", Target(next(model.parameters()).device, model.config._attn_implementation))
    cfg = honoured(model, cfg, warn=True)
    one_row, max_row = _row_limits(model, cfg)
    if cfg.compile:
        from .compile import compile_blocks

        compile_blocks(model)
    # not with compile: a hook calling into the C library would break the compiled graph
    trims = trim_heap_in_forward(model) if cfg.trim_heap and not cfg.compile else []
    autocast = uses_autocast(cfg, next(model.parameters()).device)
    module = wrap(loss_module(model, cfg), model, dist)
    # after wrapping (FSDP2 shards them); named, for LoRA+'s groups
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    optimizer = build_optimizer(named, cfg)
    total = plan_steps(len(train_data), cfg, world=dist.world)
    scheduler = build_scheduler(optimizer, total, cfg)
    result, start = TrainResult(module=module), 0
    if resume is not None:
        start = restore(resume, optimizer, scheduler, result)
    stream = micro_batches(train_data, cfg, pad_id, skip=start * cfg.grad_accum, dist=dist, one_row=one_row,
                           max_row=max_row)
    layout = batch_layout(model, cfg, pad_id)  # validation's batches
    if resume is not None:
        set_rng(resume["rng"][dist.rank])  # after the skip: the stream's shuffles do not touch the global RNG
    bar = None
    if cfg.progress and dist.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)
    state = LoopState(start, total, model, optimizer, scheduler, result, dist)
    if hooks.on_start:
        hooks.on_start(state)
    model.train()
    t0 = time.perf_counter() - result.runtime_s
    window_loss, window_tokens, eval_s = 0.0, 0, 0.0
    best, bad_evals = min((v["val_loss"] for v in result.val_history), default=math.inf), 0
    for step in range(start, total):
        out = train_step(module, [next(stream) for _ in range(cfg.grad_accum)], optimizer, params,
                         max_grad_norm=cfg.max_grad_norm, autocast=autocast, dist=dist)
        if out.problem and not cfg.skip_nonfinite:
            raise NonFiniteLoss(step + 1, out.problem)
        if out.problem:  # skipped: no update, but the schedule and data order move on
            result.skipped_steps += 1
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        result.train_tokens += out.n_tokens
        result.steps = state.step = step + 1
        result.final_train_loss = out.loss
        window_loss, window_tokens = window_loss + out.loss_sum, window_tokens + out.n_label
        elapsed = time.perf_counter() - t0 - eval_s
        record = {"step": step + 1, "loss": out.loss, "lr": lr, "tokens": result.train_tokens,
                  "elapsed_s": round(elapsed, 4), "grad_norm": out.grad_norm, **(out.extra or {})}
        result.history.append(record)
        if hooks.on_log:
            hooks.on_log(record)
        if bar is not None:
            bar.update(1)
            if (step + 1) % cfg.log_every == 0 or step + 1 == total:
                # the mean over the steps since the last update, not the last step's loss the table shows
                bar.set_postfix({"loss(avg)": f"{window_loss / max(window_tokens, 1):.4f}", "lr": f"{lr:.2e}",
                                 "tok_s": f"{result.train_tokens / max(elapsed, 1e-9):.0f}"})
                window_loss, window_tokens = 0.0, 0
        last = step + 1 == total
        if val_data and cfg.eval_every and (step + 1) % cfg.eval_every == 0 and not last:
            eval_s += _validate(module, val_data, cfg, pad_id, step + 1, result, hooks.on_eval, best, dist, layout)
            model.train()
            if result.val_history[-1]["val_loss"] < best:
                best, bad_evals = result.val_history[-1]["val_loss"], 0
            else:
                bad_evals += 1
            if cfg.early_stopping_patience and bad_evals >= cfg.early_stopping_patience:
                result.stopped_early = True
        result.runtime_s = time.perf_counter() - t0 - eval_s
        asked = hooks.should_stop is not None and hooks.should_stop()
        if dist.enabled:  # a signal may reach one rank only: all stop at the same step
            asked = all_sum(dist, float(asked))[0] > 0
        stop = result.stopped_early or asked
        if hooks.on_checkpoint and (stop or last or (cfg.save_every and (step + 1) % cfg.save_every == 0)):
            hooks.on_checkpoint(state)
        if stop:
            result.interrupted = not result.stopped_early
            break
    if bar is not None:
        bar.close()
    if val_data and not result.interrupted:
        _validate(module, val_data, cfg, pad_id, result.steps, result, hooks.on_eval, best, dist, layout)
    model.eval()
    for handle in trims:
        handle.remove()
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_disable()
    return result


def _validate(module, val_data, cfg, pad_id, step, result: TrainResult, on_eval, best: float,
              dist: Dist, layout) -> float:
    """Validation loss into result (and on_eval); returns the seconds it took."""
    t0 = time.perf_counter()
    val = mean_loss(module, val_data, batch_size=cfg.batch_size, pad_id=pad_id, dist=dist,
                    layout=layout)
    result.final_val_loss = val
    record = {"step": step, "val_loss": val, "val_ppl": math.exp(min(val, 50)), "is_best": val < best}
    result.val_history.append(record)
    if on_eval:
        on_eval(record)
    return time.perf_counter() - t0

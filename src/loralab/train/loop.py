"""THE training loop. `loralab train`, studies and benchmarks all call `train()`.

It takes plain objects (a model whose trainable parameters are already chosen, encoded examples, a
TrainConfig) and knows nothing about YAML, files or the CLI; it reports through hooks. Each
iteration draws the step's micro batches and calls `step.train_step`.
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
from ..data.batching import collate, micro_batch_indices
from ..data.layout import collate_packed
from .loss import mean_loss
from .optim import build_optimizer, build_scheduler, plan_steps
from .packing import packing_supported
from .precision import resolve_precision
from .state import LoopState, TrainResult, restore, set_rng, set_seed
from .step import train_step


class NonFiniteLoss(RuntimeError):
    """The loss or gradient norm became NaN/Inf at `step` (1-based) and skipping was not asked for."""

    def __init__(self, step: int, what: str):
        super().__init__(f"non-finite {what} at step {step}")
        self.step, self.what = step, what


@dataclass
class Hooks:
    """How the loop reports, without knowing about files: each is optional."""
    on_log: Callable[[dict], None] | None = None            # every step's record
    on_eval: Callable[[dict], None] | None = None           # every validation record ("is_best" set)
    on_checkpoint: Callable[[LoopState], None] | None = None  # every save_every steps, at stop, at end
    should_stop: Callable[[], bool] | None = None           # e.g. a signal arrived: checkpoint and stop


def micro_batches(data, cfg: TrainConfig, pad_id: int, skip: int = 0) -> Iterator[dict]:
    """Endless stream of collated micro batches (data.batching.micro_batch_indices). Packing changes
    only the layout of a micro batch, never which examples it holds."""
    make = collate_packed if cfg.packing else collate
    for idx in micro_batch_indices(data, cfg.batch_size, seed=cfg.seed, group_window=cfg.group_by_length,
                                   skip=skip):
        yield make([data[i] for i in idx], pad_id)


def uses_autocast(cfg: TrainConfig, device: torch.device) -> bool:
    """Full fine-tuning keeps fp32 master weights and computes in bf16 under autocast; LoRA runs
    with frozen weights already stored in bf16, so it needs no autocast (and no per-step casts)."""
    return cfg.method == "full" and resolve_precision(cfg.precision, device) == "bf16"


def train(model: torch.nn.Module, train_data: list, cfg: TrainConfig, *, pad_id: int,
          val_data: list | None = None, hooks: Hooks | None = None,
          resume: dict | None = None) -> TrainResult:
    """Train the parameters of `model` that require grad. Returns losses, tokens and timings.

    `resume` (from checkpoint.load) restores optimizer, scheduler, RNG, data position and history,
    so the continued run is bit-identical to one that never stopped.
    """
    hooks = hooks or Hooks()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    set_seed(cfg.seed)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    if not params:
        raise ValueError("no trainable parameters")
    optimizer = build_optimizer(named, cfg)
    total = plan_steps(len(train_data), cfg)
    scheduler = build_scheduler(optimizer, total, cfg)
    result, start = TrainResult(), 0
    if resume is not None:
        start = restore(resume, optimizer, scheduler, result)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.packing and not packing_supported(model, pad_id):
        # packing relies on the model honouring restarting position ids; otherwise examples would mix
        warnings.warn("train.packing: this model ignores packed position ids; training on padded batches",
                      stacklevel=2)
        cfg = dataclasses.replace(cfg, packing=False)
    if cfg.compile:
        from .compile import compile_blocks

        compile_blocks(model)
    autocast = uses_autocast(cfg, next(model.parameters()).device)
    stream = micro_batches(train_data, cfg, pad_id, skip=start * cfg.grad_accum)
    if resume is not None:
        set_rng(resume["rng"])  # after the skip: the stream's shuffles do not touch the global RNG
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)
    state = LoopState(start, total, model, optimizer, scheduler, result)
    model.train()
    t0 = time.perf_counter() - result.runtime_s
    window_loss, window_tokens, eval_s = 0.0, 0, 0.0
    best, bad_evals = min((v["val_loss"] for v in result.val_history), default=math.inf), 0
    for step in range(start, total):
        out = train_step(model, [next(stream) for _ in range(cfg.grad_accum)], optimizer, params,
                         max_grad_norm=cfg.max_grad_norm, autocast=autocast)
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
                  "elapsed_s": round(elapsed, 4), "grad_norm": out.grad_norm}
        result.history.append(record)
        if hooks.on_log:
            hooks.on_log(record)
        if bar is not None:
            bar.update(1)
            if (step + 1) % cfg.log_every == 0 or step + 1 == total:
                bar.set_postfix(loss=f"{window_loss / max(window_tokens, 1):.4f}", lr=f"{lr:.2e}",
                                tok_s=f"{result.train_tokens / max(elapsed, 1e-9):.0f}")
                window_loss, window_tokens = 0.0, 0
        last = step + 1 == total
        if val_data and cfg.eval_every and (step + 1) % cfg.eval_every == 0 and not last:
            eval_s += _validate(model, val_data, cfg, pad_id, step + 1, result, hooks.on_eval, best)
            model.train()
            if result.val_history[-1]["val_loss"] < best:
                best, bad_evals = result.val_history[-1]["val_loss"], 0
            else:
                bad_evals += 1
            if cfg.early_stopping_patience and bad_evals >= cfg.early_stopping_patience:
                result.stopped_early = True
        result.runtime_s = time.perf_counter() - t0 - eval_s
        stop = result.stopped_early or (hooks.should_stop is not None and hooks.should_stop())
        if hooks.on_checkpoint and (stop or last or (cfg.save_every and (step + 1) % cfg.save_every == 0)):
            hooks.on_checkpoint(state)
        if stop:
            result.interrupted = not result.stopped_early
            break
    if bar is not None:
        bar.close()
    if val_data and not result.interrupted:
        _validate(model, val_data, cfg, pad_id, result.steps, result, hooks.on_eval, best)
    model.eval()
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_disable()
    return result


def _validate(model, val_data, cfg, pad_id, step, result: TrainResult, on_eval, best: float) -> float:
    """Validation loss into result (and on_eval); returns the seconds it took."""
    t0 = time.perf_counter()
    val = mean_loss(model, val_data, batch_size=cfg.batch_size, pad_id=pad_id)
    result.final_val_loss = val
    record = {"step": step, "val_loss": val, "val_ppl": math.exp(min(val, 50)), "is_best": val < best}
    result.val_history.append(record)
    if on_eval:
        on_eval(record)
    return time.perf_counter() - t0

"""THE training loop. `loralab train`, studies and benchmarks all call `train()`.

It takes plain objects (a model whose trainable parameters are already chosen, encoded examples, a
TrainConfig) and knows nothing about YAML, files or the CLI; it reports through callbacks.
"""
from __future__ import annotations

import dataclasses
import math
import random
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from .config import TrainConfig
from .data.batching import collate, iterate_batches
from .evaluate import mean_loss
from .data.packing import collate_packed, grouped_batches, packing_supported
from .data.packing import loss_sum  # loss.loss_sum, also for packed batches
from .loss import count_label_tokens


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def build_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        # foreach=True batches the many small LoRA tensors into a few kernels per step.
        return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                                 foreach=True)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               foreach=True)
    raise ValueError(cfg.optimizer)  # validated in config; unreachable for user input


def lr_multiplier(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warmup to 1, then cosine / linear decay to min_lr_ratio, or constant. step is 0-based."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.scheduler == "constant":
        return 1.0
    span = max(1, total - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.min_lr_ratio
    if cfg.scheduler == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return floor + (1 - floor) * (1 - progress)


def plan_steps(n_examples: int, cfg: TrainConfig) -> int:
    if cfg.max_steps:
        return cfg.max_steps
    per_epoch = math.ceil(n_examples / (cfg.batch_size * cfg.grad_accum))
    return max(1, math.ceil(per_epoch * cfg.epochs))


def _micro_batches(data, cfg: TrainConfig, pad_id: int, skip: int = 0) -> Iterator[dict]:
    """Endless stream of collated micro batches: epoch after epoch, each shuffled by (seed, epoch).
    The first `skip` batches are passed over without collating (resuming mid-run). Packing changes
    only the layout of a micro batch, never which examples it holds."""
    make = collate_packed if cfg.packing else collate
    epoch = 0
    while True:
        if cfg.group_by_length:
            order = grouped_batches(data, cfg.batch_size, seed=cfg.seed, epoch=epoch, window=cfg.group_by_length)
        else:
            order = iterate_batches(data, cfg.batch_size, seed=cfg.seed, epoch=epoch)
        for idx in order:
            if skip:
                skip -= 1
                continue
            yield make([data[i] for i in idx], pad_id)
        epoch += 1


def accumulate_gradients(model, micro_batches: list[dict], *, autocast: bool = False) -> tuple[float, int, int]:
    """Backward over micro batches, normalised per label token over all of them together, so the
    gradient equals that of one big batch. Returns (summed loss, label tokens, input tokens)."""
    device = next(model.parameters()).device
    n_label = sum(count_label_tokens(b["labels"]) for b in micro_batches)
    total, n_tokens = 0.0, 0
    for b in micro_batches:
        b = {k: v.to(device, non_blocking=True) for k, v in b.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            s, _ = loss_sum(model, b)
        (s / n_label).backward()
        total += float(s.detach())
        n_tokens += int(b["attention_mask"].sum())
    return total, n_label, n_tokens


@dataclass
class TrainResult:
    steps: int = 0
    train_tokens: int = 0             # non-padding tokens fed to the model
    runtime_s: float = 0.0
    history: list = field(default_factory=list)      # one dict per logged step
    val_history: list = field(default_factory=list)  # {"step", "val_loss"}
    final_train_loss: Optional[float] = None
    final_val_loss: Optional[float] = None
    skipped_steps: int = 0            # non-finite batches skipped (train.skip_nonfinite)
    stopped_early: bool = False       # validation loss stopped improving (train.early_stopping_patience)
    interrupted: bool = False         # should_stop() asked to stop (a signal)

    @property
    def tokens_per_s(self) -> float:
        return self.train_tokens / self.runtime_s if self.runtime_s > 0 else 0.0


class NonFiniteLoss(RuntimeError):
    """The loss or gradient norm became NaN/Inf at `step` (1-based) and skipping was not asked for."""

    def __init__(self, step: int, what: str):
        super().__init__(f"non-finite {what} at step {step}")
        self.step, self.what = step, what


@dataclass
class Hooks:
    """How the loop reports, without knowing about files: each is optional."""
    on_log: Optional[Callable[[dict], None]] = None            # every step's record
    on_eval: Optional[Callable[[dict], None]] = None           # every validation record ("is_best" set)
    on_checkpoint: Optional[Callable[["LoopState"], None]] = None  # every save_every steps, at stop, at end
    should_stop: Optional[Callable[[], bool]] = None           # e.g. a signal arrived: checkpoint and stop


@dataclass
class LoopState:
    """Everything needed to continue a run exactly where it stopped."""
    step: int
    total_steps: int
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    result: TrainResult


def train(model: torch.nn.Module, train_data: list, cfg: TrainConfig, *, pad_id: int,
          val_data: Optional[list] = None, hooks: Optional[Hooks] = None,
          resume: Optional[dict] = None) -> TrainResult:
    """Train the parameters of `model` that require grad. Returns losses, tokens and timings.

    `resume` (from checkpoint.load) restores optimizer, scheduler, RNG, data position and history,
    so the continued run is bit-identical to one that never stopped.
    """
    hooks = hooks or Hooks()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    set_seed(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters")
    optimizer = build_optimizer(params, cfg)
    total = plan_steps(len(train_data), cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, total, cfg))
    result, start = TrainResult(), 0
    if resume is not None:
        start = _restore(resume, optimizer, scheduler, result)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.packing and not packing_supported(model, pad_id):
        # packing relies on the model honouring restarting position ids; otherwise examples would mix
        warnings.warn("train.packing: this model ignores packed position ids; training on padded batches")
        cfg = dataclasses.replace(cfg, packing=False)
    if cfg.compile:
        from .compile import compile_blocks

        compile_blocks(model)
    # Full fine-tuning keeps fp32 master weights and computes in bf16 under autocast; LoRA runs
    # with frozen weights already stored in bf16, so it needs no autocast (and no per-step casts).
    autocast = cfg.method == "full" and cfg.precision == "bf16"
    stream = _micro_batches(train_data, cfg, pad_id, skip=start * cfg.grad_accum)
    if resume is not None:
        _set_rng(resume["rng"])  # after the skip: the stream's shuffles do not touch the global RNG
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
        micro = [next(stream) for _ in range(cfg.grad_accum)]
        step_loss, n_label, n_tokens = accumulate_gradients(model, micro, autocast=autocast)
        grad_norm = None
        if cfg.max_grad_norm:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm, foreach=True))
        problem = "loss" if not math.isfinite(step_loss) else (
            "gradient norm" if grad_norm is not None and not math.isfinite(grad_norm) else None)
        if problem and not cfg.skip_nonfinite:
            optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLoss(step + 1, problem)
        if problem:  # skip this batch: no update, but the schedule and data order move on
            result.skipped_steps += 1
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        result.train_tokens += n_tokens
        result.steps = state.step = step + 1
        loss = step_loss / n_label
        result.final_train_loss = loss
        window_loss, window_tokens = window_loss + step_loss, window_tokens + n_label
        elapsed = time.perf_counter() - t0 - eval_s
        record = {"step": step + 1, "loss": loss, "lr": lr, "tokens": result.train_tokens,
                  "elapsed_s": round(elapsed, 4), "grad_norm": grad_norm}
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


def _get_rng() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng(rng: dict) -> None:
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def snapshot(state: LoopState) -> dict:
    """The loop's state as plain objects and tensors (checkpoint.save writes it to disk)."""
    r = state.result
    return {"step": state.step, "total_steps": state.total_steps,
            "trainable": {n: p.detach() for n, p in state.model.named_parameters() if p.requires_grad},
            "optimizer": state.optimizer.state_dict(), "scheduler": state.scheduler.state_dict(),
            "rng": _get_rng(),
            "result": {"history": r.history, "val_history": r.val_history, "train_tokens": r.train_tokens,
                       "runtime_s": r.runtime_s, "skipped_steps": r.skipped_steps,
                       "final_train_loss": r.final_train_loss}}


def _restore(resume: dict, optimizer, scheduler, result: TrainResult) -> int:
    optimizer.load_state_dict(resume["optimizer"])
    scheduler.load_state_dict(resume["scheduler"])
    r = resume["result"]
    result.history, result.val_history = list(r["history"]), list(r["val_history"])
    result.train_tokens, result.runtime_s = r["train_tokens"], r["runtime_s"]
    result.skipped_steps, result.final_train_loss = r["skipped_steps"], r["final_train_loss"]
    result.steps = resume["step"]
    return resume["step"]


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

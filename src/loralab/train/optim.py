"""Optimizers and the learning-rate schedule, from a TrainConfig.

Beside AdamW and SGD (momentum), two that practitioners try for less optimizer memory:
  adafactor  torch.optim.Adafactor: second moments factored into a row and a column vector per
             matrix (no first moment), so its state is O(rows + cols) instead of AdamW's 2 x rows x cols
  lion       lion-pytorch's Lion (Chen et al. 2023): the sign of an interpolated momentum, one
             state tensor (as SGD with momentum); it wants a rate 3-10x below AdamW's
Both follow the same warmup and schedule as the others (LambdaLR multiplies each group's lr).
"""
from __future__ import annotations

import math

import torch

from ..config import TrainConfig
from ..errors import UserError


def is_loraplus_b(name: str, param: torch.nn.Parameter) -> bool:
    """LoRA+'s fast group, by PEFT's rule: the B factors, and every vector parameter (DoRA's magnitudes)."""
    return "lora_B" in name or param.ndim == 1


def param_groups(params, cfg: TrainConfig) -> list:
    """The optimizer's parameters: a plain list, or with train.loraplus_lr_ratio LoRA+'s two groups
    (A at lr, B at ratio x lr; Hayou et al. 2024). `params`: parameters, or (name, parameter) pairs
    (LoRA+ needs the names)."""
    params = list(params)
    if not cfg.loraplus_lr_ratio:
        return [p[1] if isinstance(p, tuple) else p for p in params]
    if not all(isinstance(p, tuple) for p in params):
        raise ValueError("train.loraplus_lr_ratio needs (name, parameter) pairs")
    fast = [p for n, p in params if is_loraplus_b(n, p)]
    slow = [p for n, p in params if not is_loraplus_b(n, p)]
    return [{"params": slow, "lr": cfg.lr}, {"params": fast, "lr": cfg.lr * cfg.loraplus_lr_ratio}]


def implementation(params) -> dict:
    """torch's fused kernel (one pass over each tensor) when every parameter is a plain floating
    tensor on the CPU or a CUDA GPU, else foreach (a few kernels for the many small LoRA tensors;
    FSDP2's DTensors take this path). On the CPU, foreach runs the per-tensor ops one after another,
    several times slower than fused over the demo's many small LoRA tensors
    (benchmarks/experiments/optimizer_step.py; docs/performance.md)."""
    flat = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    fused = all(type(p.data) is torch.Tensor and p.is_floating_point() and p.device.type in ("cpu", "cuda")
                for p in flat)
    return {"fused": True} if fused else {"foreach": True}


def build_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, SGD, Adafactor or Lion over `params` (parameters or (name, parameter) pairs; see param_groups)."""
    params = param_groups(params, cfg)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                                 **implementation(params))
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               **implementation(params))
    if cfg.optimizer == "adafactor":  # its own defaults for the decay of the second moments and eps
        return torch.optim.Adafactor(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "lion":
        try:
            from lion_pytorch import Lion
        except ImportError:
            raise UserError("train.optimizer=lion needs the lion-pytorch package: pip install lion-pytorch") from None
        # its own betas (0.9, 0.99), not AdamW's train.betas; weight decay as torch's AdamW applies it
        # (p <- p * (1 - lr * weight_decay)), so one train.weight_decay means the same for both
        return Lion(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
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


def build_scheduler(optimizer: torch.optim.Optimizer, total: int, cfg: TrainConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, total, cfg))


def plan_steps(n_examples: int, cfg: TrainConfig, world: int = 1) -> int:
    """Optimizer steps of a run: train.max_steps, else ceil(epochs x steps per epoch), a step taking
    batch_size x grad_accum examples on each of `world` ranks."""
    if cfg.max_steps:
        return cfg.max_steps
    per_epoch = math.ceil(n_examples / (cfg.batch_size * cfg.grad_accum * world))
    return max(1, math.ceil(per_epoch * cfg.epochs))

"""How long a run will take, before it starts: training FLOPs over an assumed utilisation of the
device's matmul rate (a GPU's dense bf16 peak from GPUS; a CPU's measured rate, cpu_time.py), loss
forwards (validation, test and held-out losses) the same way, and greedy evaluation as decoding whose
every step is bound by the weights' reads or by its rows' FLOPs, whichever is slower. Pure arithmetic
from the model's config.json (arch.py); a plan, not a promise (a factor of ~2 either way).

Training, per token: forward 2 x (matmul weights), backward 2 x the same for the inputs' gradients
plus 2 x the trainable weights for their own (all of them in full fine-tuning), attention's score
and value products 4 x layers x width x context/2 forward (x3 with backward), one more forward with
gradient checkpointing. QLoRA dequantizes the frozen weights at every matmul: the article's own
ratio (10,060 s vs 6,686 s on an A100) stands for that cost.

The utilisation is calibrated on the article's LoRA run (Llama-2-7B, q+v r=8, Alpaca's 52k
examples of ~200 tokens in one epoch at micro batch 1 on an A100: 6,686 s), which is ~15% of the
A100's 312 TFLOP/s; larger micro batches use a GPU better, so it is a conservative plan there.
"""
from __future__ import annotations

from dataclasses import dataclass

from .arch import arch_from_config, count_params

# name fragment (as torch.cuda.get_device_name says it) -> (dense bf16 FLOP/s, memory bytes/s)
GPUS = {"H200": (989e12, 4.8e12), "H100": (989e12, 3.35e12), "A100": (312e12, 2.0e12), "L40S": (362e12, 0.86e12),
        "A10G": (125e12, 0.6e12), "L4": (121e12, 0.3e12), "4090": (165e12, 1.0e12), "V100": (125e12, 0.9e12)}
DEFAULT_GPU = "A100"                 # the article's; assumed when this machine has no GPU to ask
UTILISATION = 0.15                   # of the peak, calibrated on the article's run (module docstring)
QLORA_SLOWDOWN = 10_060 / 6_686      # the article's QLoRA / LoRA training time on the A100
DECODE_EFFICIENCY = 0.5              # share of the memory bandwidth a decode step's weight reads reach


@dataclass(frozen=True)
class Device:
    """What a time plan needs of the device: FLOP/s (a GPU's peak, a CPU's measured rate), bytes/s, and
    the shares of that rate training and plain forwards reach."""
    label: str
    flops: float
    bandwidth: float
    train_utilisation: float = UTILISATION
    forward_utilisation: float = UTILISATION


def gpu_spec(name: str | None = None) -> tuple[str, float, float]:
    """(label, peak FLOP/s, bytes/s) of the GPU `name` (default: this machine's first, else the A100)."""
    if name is None:
        try:
            import torch

            name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else DEFAULT_GPU
        except Exception:  # noqa: BLE001  no CUDA runtime: the plan assumes the article's GPU
            name = DEFAULT_GPU
    for key, (flops, bandwidth) in GPUS.items():
        if key.lower() in name.lower():
            return key, flops, bandwidth
    return f"{name} (as an {DEFAULT_GPU})", *GPUS[DEFAULT_GPU]


def train_flops_per_token(model_config: dict, *, method: str, trainable: int, context: float,
                          grad_checkpointing: bool = False) -> float:
    """Training FLOPs per token (see the module docstring); context: the mean sequence length."""
    a = arch_from_config(model_config)
    counts = count_params(model_config, "all-linear", 1)
    # the output head is a matmul, tied or not; an MoE layer runs its router and top_k of its experts per token
    matmul = counts["active_layer_weights"] + a.vocab * a.hidden
    attention = 4 * a.layers * a.q_dim * context / 2       # causal: each token sees half the context on average
    forward = 2 * matmul + attention
    weight_grads = 2 * (matmul if method == "full" else trainable)
    total = forward + (2 * matmul + 2 * attention) + weight_grads + (forward if grad_checkpointing else 0)
    return total * (QLORA_SLOWDOWN if method == "qlora" else 1.0)


def gpu_device(name: str | None = None) -> Device:
    return Device(*gpu_spec(name))


def forward_flops_per_token(model_config: dict, context: float) -> float:
    """One forward's FLOPs per token (the output layer counted at every position)."""
    a = arch_from_config(model_config)
    matmul = count_params(model_config, "all-linear", 1)["active_layer_weights"] + a.vocab * a.hidden
    return 2 * matmul + 4 * a.layers * a.q_dim * context / 2


def estimate_seconds(model_config: dict, *, method: str, trainable: int, train_tokens: float, context: float,
                     grad_checkpointing: bool = False, eval_prompts: int = 0, eval_batch: int = 1,
                     new_tokens: int = 0, forward_tokens: float = 0, gpu: str | None = None,
                     device: Device | None = None) -> dict:
    """{gpu, train_s, eval_s}: the training loop; then forward_tokens of loss forwards (validation, test and
    held-out losses) and greedy evaluation of eval_prompts in batches of eval_batch. device: a Device
    (cpu_time.cpu_device), else the GPU `gpu` (default: this machine's, else the A100)."""
    dev = device or gpu_device(gpu)
    per_token = train_flops_per_token(model_config, method=method, trainable=trainable, context=context,
                                      grad_checkpointing=grad_checkpointing)
    train_s = per_token * train_tokens / (dev.flops * dev.train_utilisation)
    forward_rate = dev.flops * dev.forward_utilisation
    weight_bytes = 2 * count_params(model_config, "all-linear", 1)["total"]  # bf16
    per_step = forward_flops_per_token(model_config, context) / forward_rate  # one row's decode step
    read_s = weight_bytes / (dev.bandwidth * DECODE_EFFICIENCY)                 # every weight, once a step
    full, rest = divmod(eval_prompts, max(1, eval_batch))
    decode_s = new_tokens * sum(max(read_s, rows * per_step) for rows in [eval_batch] * full + [rest] * bool(rest))
    prefill_s = eval_prompts * context * weight_bytes / forward_rate  # 2 FLOPs per weight of 2 bytes
    loss_s = forward_tokens * forward_flops_per_token(model_config, context) / forward_rate
    return {"gpu": dev.label, "train_s": train_s, "eval_s": decode_s + prefill_s + loss_s}

"""Per-GPU peak memory of a run spread over N GPUs: DDP (every rank holds everything) or FSDP2
(weights, gradients and optimizer state sharded 1/N per rank). Arithmetic on estimate()'s parts.

Each rank runs its own micro batch, so activations and the runtime ("other") are per rank and do not
shrink with N. Assumptions, per rank:
  - DDP (torch's DistributedDataParallel, gradient_as_bucket_view off, its default): the whole
    single-device estimate plus its gradient buckets, one flat copy of every trainable gradient
    (25 MB buckets, allocated when the model is wrapped and alive at both moments). Full fine-tuning
    pays it in full (4 bytes per parameter); LoRA's is a few MB.
  - FSDP2 as loralab runs it (train/distributed.py: fully_shard on each decoder layer, then on the
    root; parameters keep the dtype they are stored in, no MixedPrecisionPolicy):
      frozen weights 1/N, except QLoRA's NF4 weights: they are buffers of NF4Linear, which FSDP2
      does not shard, so every rank keeps them whole; trainable fp32 masters 1/N; optimizer state
      and its step's temporary 1/N (the
      optimizer steps on the local shards); accumulated gradients 1/N (reduce-scattered after each
      micro batch's backward). The gradients of the parameters outside the layers are whole at the
      start of backward (the root's reduce-scatter waits for the end of backward).
      All-gathered, at the start of backward: the root's parameters (embeddings, lm_head, final
      norm: FSDP2 keeps the root unsharded between forward and backward) and two decoder layers
      (the one computing and the next one prefetched), each as stored (compute dtype, NF4 where
      quantized, LoRA fp32). At the optimizer step every unit is resharded: nothing gathered.
      Full fine-tuning keeps fp32 masters and computes in bf16 under autocast: its bf16 copies of
      the weights, saved for backward, are whole on every rank (2 bytes per parameter, as on one GPU).
  - Not counted: NCCL's own buffers (outside PyTorch's allocator, like the CUDA context), and the
    padding of each shard to a multiple of N elements (under N elements per tensor).
A single GPU (gpus=1) is the single-device estimate itself: no wrapper, nothing added.
"""
from __future__ import annotations

from ..errors import UserError
from .estimate import estimate, moments, peak_of

PREFETCH_LAYERS = 2  # decoder layers all-gathered at once: the one computing and the next, prefetched
SHARDED_PARTS = ("masters", "grads_step", "state", "step_temp")  # 1/N each under FSDP (frozen: see below)


def estimate_per_gpu(model_config: dict, *, gpus: int = 1, fsdp: bool = False, **settings) -> dict:
    """estimate() for one of `gpus` ranks, each with its own micro batch: replicated (DDP) or sharded
    (fsdp=True). The breakdown gains `communication` (DDP's gradient buckets, FSDP's all-gathered
    units); `sharding` names the strategy and the single-GPU peak for comparison."""
    if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 1:
        raise UserError(f"gpus must be a positive integer, got {gpus!r}")
    if not isinstance(fsdp, bool):
        raise UserError(f"fsdp must be true or false, got {fsdp!r}")
    single = estimate(model_config, **settings)
    if gpus == 1:
        return single
    parts, units = dict(single["parts"]), single["units"]
    if fsdp:
        for key in SHARDED_PARTS:
            parts[key] /= gpus
        parts["frozen"] = parts["frozen_nf4"] + (parts["frozen"] - parts["frozen_nf4"]) / gpus  # NF4: replicated
        accumulated = parts["grads_step"] if single["settings"]["grad_accum"] > 1 else 0.0
        parts["grads_backward"] = parts["grads_outside"] + accumulated
        gathered = units["outside_bytes"] + PREFETCH_LAYERS * units["layer_bytes"]
        extra = {"start of backward": gathered, "optimizer step": 0.0}
        detail = {"strategy": "fsdp", "gathered_bytes": int(gathered)}
    else:
        buckets = parts["grads_step"]  # one flat copy of every trainable gradient
        extra = {"start of backward": buckets, "optimizer step": buckets}
        detail = {"strategy": "ddp", "bucket_bytes": int(buckets)}
    candidates = moments(parts)
    for phase, part in candidates.items():
        part["communication"] = extra[phase]
    phase, breakdown = peak_of(candidates)
    return {**single, "peak_bytes": sum(breakdown.values()), "breakdown": breakdown, "phase": phase,
            "parts": {k: int(round(v)) for k, v in parts.items()},
            "settings": {**single["settings"], "gpus": gpus, "fsdp": fsdp},
            "sharding": {**detail, "gpus": gpus, "single_gpu_peak_bytes": single["peak_bytes"]}}

"""DDP and FSDP2 runs through loralab's train.distributed (wrap, train_step) over nccl on CUDA (gloo on the
CPU), world size 1, or 2 where the machine has two GPUs: after a few SGD steps the LoRA factors must equal
one process's training on the same global batches (SGD: gradients compared directly, facts.md)."""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from common import FAIL, PASS, TINY, Ctx, random_batch, random_model, row

HERE = Path(__file__).resolve().parent
STEPS = 3
TOL = 1e-5  # fp32, the same batches; reductions over ranks in another order
LR = 1.0    # SGD: every factor moves well beyond TOL in STEPS steps (the tiny model's gradients are small)


def lora_model(device: torch.device):
    from loralab.peft.inject import inject
    from loralab.peft.lora import LoraSpec, lora_modules

    model = random_model(TINY, device, torch.float32, seed=11)
    inject(model, "all-linear", LoraSpec(r=4, alpha=8, dropout=0.0))
    torch.manual_seed(12)
    for _, m in lora_modules(model):
        torch.nn.init.normal_(m.lora_B.weight, std=0.02)
        torch.nn.init.normal_(m.lora_A.weight, std=0.1)  # the same factors on every rank and in the reference
    return model.train()


def global_batches(world: int, steps: int, vocab: int) -> list[list[dict]]:
    """Per step, one micro batch per rank (2 examples of different lengths each)."""
    from loralab.data.batching import collate

    return [[collate(random_batch([20 + 3 * r, 13 + s], vocab, seed=100 * s + r), pad_id=0) for r in range(world)]
            for s in range(steps)]


def _reference(device: torch.device, world: int) -> tuple[dict, list]:
    from loralab.train.distributed import trainable_state
    from loralab.train.step import train_step

    model = lora_model(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=LR)
    losses = [train_step(model, batches, opt, params).loss for batches in global_batches(world, STEPS,
                                                                                          TINY["vocab_size"])]
    return trainable_state(model), losses


def _run(ctx: Ctx, mode: str) -> list[dict]:
    from safetensors.torch import load_file

    from loralab.train.distributed import trainable_state

    ctx.steps[mode] = {"sgd_steps": STEPS, "world": ctx.world}
    backend = "nccl" if ctx.cuda else "gloo"
    with tempfile.TemporaryDirectory(prefix=f"gpu-check-{mode}-") as tmp:
        out = Path(tmp) / "adapter.safetensors"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ctx.world),
               str(HERE / "dist_worker.py"), mode, ctx.device.type, str(out), str(STEPS)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0 or not out.exists():
            tail = " / ".join(proc.stderr.strip().splitlines()[-4:])
            why = f"exit {proc.returncode}: {tail}"[:600]
            return [row(mode, f"{mode} over {backend}, world {ctx.world}", FAIL, why)]
        got = load_file(str(out))
        info = json.loads(out.with_suffix(".json").read_text())
    ref, ref_losses = _reference(ctx.device, ctx.world)
    start = trainable_state(lora_model(ctx.device))
    err = max(float((got[k] - ref[k].float()).abs().max()) for k in ref) if got.keys() == ref.keys() else float("inf")
    moved = min(float((ref[k] - start[k]).abs().max()) for k in ref)  # every factor trained: no pass by standing still
    loss_err = max(abs(a - b) for a, b in zip(info["losses"], ref_losses))
    ok = err <= TOL and loss_err <= TOL and info["backend"] == backend and moved >= 10 * TOL
    return [row(mode, f"{mode} over {info['backend']}, world {info['world']}: LoRA factors after {STEPS} SGD steps "
                f"vs one process", PASS if ok else FAIL, max_abs_error=err, tolerance=TOL, error_kind="absolute",
                loss_error=loss_err, least_factor_change=moved)]


PARTS = {"ddp": lambda ctx: _run(ctx, "ddp"), "fsdp": lambda ctx: _run(ctx, "fsdp")}

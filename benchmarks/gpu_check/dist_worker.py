"""One rank of the GPU check's DDP / FSDP2 run (started by torchrun, dist_check.py): nccl on CUDA, gloo on
the CPU, even at world size 1 (loralab's own launcher joins no process group for one process). Each rank
trains the tiny LoRA model on its micro batch of every global batch through loralab's wrap and train_step;
rank 0 writes the trained LoRA factors (gathered in full) for dist_check to compare with one process's."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(mode: str, device_type: str, out: str, steps: int) -> None:
    from common import TINY
    from dist_check import LR, global_batches, lora_model

    from loralab.train.distributed import Dist, trainable_state, wrap
    from loralab.train.loss import LossModule
    from loralab.train.step import train_step

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device_type == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    d = Dist(rank=rank, world=world, local_rank=rank, mode=mode)
    model = lora_model(device)
    module = wrap(LossModule(model), model, d)
    params = [p for p in module.parameters() if p.requires_grad]  # FSDP2 swaps in sharded parameters
    opt = torch.optim.SGD(params, lr=LR)
    losses = []
    for batches in global_batches(world, steps, TINY["vocab_size"]):
        res = train_step(module, [batches[rank]], opt, params, dist=d)
        losses.append(res.loss)
    state = trainable_state(model)  # gathered whole from FSDP2's shards
    backend = dist.get_backend()
    if rank == 0:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, out)
        Path(out).with_suffix(".json").write_text(json.dumps({"losses": losses, "backend": backend, "world": world}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))

"""Data parallel training on torch.distributed, started by torchrun (or `loralab train --nproc N`).

Every rank runs the same program on its own share of each global micro batch (data/batching); the
step normalises the loss by the label tokens of the whole global batch, so N processes make the
update one process makes with the same global batch. Two ways to hold the model:
  - ddp:  torch's DistributedDataParallel: weights replicated, gradients all-reduced in backward;
  - fsdp: FSDP2 (`fully_shard` per decoder block, then the root): weights, gradients and optimizer
          state sharded; frozen and LoRA weights share units; shards are all-gathered per block.
Both wrap a LossModule (train/loss.py), so the wrapper's forward is the loss and its hooks see it.
Collectives have a timeout, and torchrun ends the job when a rank dies: no rank waits forever.
"""
from __future__ import annotations

import datetime
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..errors import UserError
from .compile import decoder_blocks


@dataclass(frozen=True)
class Dist:
    """Where this process stands: its rank among `world` processes, and how the model is held."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    mode: str = "none"                # none (one process) | ddp | fsdp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


SINGLE = Dist()


def launched_world() -> int:
    """The world size torchrun gave this process (1 when it was not started by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(mode: str, device_type: str, timeout_s: float) -> Dist:
    """Join the process group torchrun set up (nccl on CUDA, gloo on the CPU); one process: SINGLE."""
    world = launched_world()
    if world <= 1:
        return SINGLE
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank,
                mode="ddp" if mode == "auto" else mode)


def device(d: Dist) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", d.local_rank)
    return torch.device("cpu")


def shutdown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_sum(d: Dist, *values: float) -> list[float]:
    """Each value summed over the ranks (one collective for all of them; float64, so counts stay exact)."""
    if not d.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device(d) if device(d).type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def gather(d: Dist, obj) -> list:
    """Every rank's `obj` (picklable, small: RNG states, eval answers), in rank order, on every rank."""
    if not d.enabled:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


# ---------------------------------------------------------------------------------------------
# Holding the model

def wrap(module: nn.Module, model: nn.Module, d: Dist) -> nn.Module:
    """`module` (the LossModule around `model`) as this run holds it: itself, DDP, or FSDP2 units
    (each decoder block, then the root with what is left: embeddings, final norm, output layer)."""
    if d.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [d.local_rank] if device(d).type == "cuda" else None
        # Every rank built the same weights from the same seed: no broadcast at init (it would also
        # mangle NF4 weights, which are tensor-subclass buffers) nor per forward (rotary tables are fixed).
        return DistributedDataParallel(module, device_ids=ids, init_sync=False, forward_sync_buffers=False)
    if d.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        blocks = decoder_blocks(model)
        if not blocks:
            raise UserError("config key 'train.distributed': fsdp needs a model with repeated decoder blocks; "
                            "use ddp")
        for block in blocks:
            fully_shard(block)
        fully_shard(module)
    return module


def grad_sync(module: nn.Module, d: Dist, sync: bool):
    """Context for one micro batch's backward: gradients are reduced across ranks only on the last
    micro batch of a step (sync=True), as one big batch would."""
    if d.mode == "ddp" and not sync:
        return module.no_sync()
    if d.mode == "fsdp":
        module.set_requires_gradient_sync(sync)
    return nullcontext()


@contextmanager
def unsharded(module: nn.Module, d: Dist):
    """While active, the root unit's weights (embeddings, norm, head) are gathered, so the model's
    own forward and generate() work; decoder blocks gather themselves in their hooks. Under fsdp,
    generate() must run with synced_gpus=True so every rank makes the same number of forwards."""
    if d.mode != "fsdp":
        yield
        return
    module.unshard()
    try:
        yield
    finally:
        module.reshard()


def full(t: torch.Tensor) -> torch.Tensor:
    """A sharded tensor gathered whole (a collective: every rank calls it, in the same order)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def like(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """A whole tensor laid out as `param` is (its shard of it, for a sharded parameter)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        return distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements)
    return value.to(param.device)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by name, whole, on the CPU (every rank calls it: shards are gathered)."""
    return {n: full(p.detach()).cpu() for n, p in model.named_parameters() if p.requires_grad}


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """optimizer.state_dict() with every sharded state tensor gathered whole (every rank calls it)."""
    sd = optimizer.state_dict()
    sd["state"] = {i: {k: full(v).cpu() if torch.is_tensor(v) else v for k, v in st.items()}
                   for i, st in sd["state"].items()}
    return sd


def load_optimizer_state(optimizer: torch.optim.Optimizer, sd: dict) -> None:
    """Load a whole-tensor optimizer state (from `optimizer_state` or a checkpoint) into an optimizer
    whose parameters may be sharded: each state tensor shaped like its parameter is laid out like it."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for i, st in sd["state"].items():
        p = params[int(i)]
        state[int(i)] = {k: like(p, v) if torch.is_tensor(v) and v.shape == p.shape else v for k, v in st.items()}
    optimizer.load_state_dict({"state": state, "param_groups": sd["param_groups"]})

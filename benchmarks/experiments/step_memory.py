"""Peak memory of each phase of a training step: forward + backward, gradient clipping, optimizer
step. Where `memory_estimate.py` compares a whole run's peak with the estimate, this says which
phase sets it.

    .venv/bin/python benchmarks/experiments/step_memory.py [key=value ...]      # RunConfig overrides
    e.g. train.method=full data.max_seq_len=128 train.batch_size=4
         train.gradient_checkpointing=true data.max_seq_len=512 train.batch_size=4

One micro batch of random tokens that fills data.max_seq_len (LABELLED=N env: only the last N
positions of each row carry a label; default all but 4), three steps, one JSON line per step with
the RSS at its start and the peak RSS of each phase (MiB; loralab.memory.measure.PeakMemory, CPU).
"""
from __future__ import annotations

import json
import os
import sys

import torch

from loralab.config import load_config
from loralab.data.layout import collate_packed
from loralab.data.prompts import Encoded
from loralab.memory.measure import PeakMemory
from loralab.prepare import setup_model
from loralab.train.loop import uses_autocast
from loralab.train.optim import build_optimizer
from loralab.train.step import accumulate_gradients


def main(overrides: list[str]) -> None:
    cfg = load_config(None, overrides)
    device = torch.device("cpu")
    model, tok, _, _ = setup_model(cfg, device)
    seq, batch = cfg.data.max_seq_len, cfg.train.batch_size
    labelled = int(os.environ.get("LABELLED", seq - 4))
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(10, tok.vocab_size - 10, (seq,), generator=g).tolist() for _ in range(batch)]
    micro = collate_packed([Encoded(r, [-100] * (seq - labelled) + r[seq - labelled:]) for r in rows],
                           tok.pad_token_id)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg.train)
    autocast = uses_autocast(cfg.train, device)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    mib = lambda pm: round(pm.result()["peak_memory_bytes"] / 2**20)  # noqa: E731
    for step in range(3):
        with PeakMemory(device) as fwd_bwd:
            accumulate_gradients(model, [micro], autocast=autocast)
        with PeakMemory(device) as clip:
            torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        with PeakMemory(device) as opt:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        print(json.dumps({"step": step, "start_MiB": round(fwd_bwd.result()["memory_at_start_bytes"] / 2**20),
                          "forward_backward_MiB": mib(fwd_bwd), "clip_MiB": mib(clip), "optimizer_MiB": mib(opt)}))


if __name__ == "__main__":
    main(sys.argv[1:])

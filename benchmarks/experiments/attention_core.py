"""The packed blocks' attention core in bf16: the model's own eager function under checkpointing
(`loralab.model.attention._eager_recompute`, what the blocks ran before 2026-12-05) against the core they run
now (`_grouped_recompute`: q's heads grouped per K/V head instead of K and V repeated, the scale applied to
q, the mask added in place, softmax written in bf16).

    .venv/bin/python benchmarks/experiments/attention_core.py [--rounds 15] [--batch 0]

On the blocks of the throughput benchmark's micro batch `--batch` (its layout and block-diagonal mask), with
random q, k, v at the default model's head counts: forward, recomputed forward and backward of one layer,
the cores alternating. Prints JSON: median ms per core, the speed-up over eager, and the largest difference
of outputs and gradients from eager. Respects /tmp/loralab_cpu_lock. (Commit a84af11's version also timed
the queries' first half against the keys' first half only: 1.34x against 1.29x for the grouped core alone.)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from itertools import islice
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/: the shared helpers


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--batch", type=int, default=0, help="which micro batch of the throughput benchmark")
    ap.add_argument("--no-lock", action="store_true")
    a = ap.parse_args()

    import torch
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaAttention

    import cpu_lock
    from loralab.config import RunConfig
    from loralab.io.models import load_tokenizer, resolve
    from loralab.model.attention import RECOMPUTE, _Blocks, _eager_recompute, _grouped_recompute
    from loralab.train.loop import micro_batches
    from workload import MODEL, encoded_data

    folder = resolve(MODEL)
    config = AutoConfig.from_pretrained(folder)
    module = LlamaAttention(config, layer_idx=0).train()
    tok = load_tokenizer(folder)
    cfg = RunConfig()
    cfg.train.batch_size, cfg.train.packing = 8, True
    batch = next(islice(micro_batches(encoded_data(tok, 128, 42)[0], cfg.train, tok.pad_token_id, one_row=True),
                        a.batch, None))
    blocks = _Blocks.of(batch["position_ids"].reshape(-1))
    mask = blocks.mask(RECOMPUTE, torch.bfloat16)
    d = config.hidden_size // config.num_attention_heads
    gen = torch.Generator().manual_seed(0)
    q0, k0, v0 = (torch.randn(blocks.count, h, blocks.width, d, generator=gen).bfloat16()
                  for h in (config.num_attention_heads, config.num_key_value_heads, config.num_key_value_heads))
    grad_out = torch.randn(blocks.count, blocks.width, config.num_attention_heads, d, generator=gen).bfloat16()
    cores = {"eager": _eager_recompute, "grouped": _grouped_recompute}

    def step(core):
        q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
        out = core(module, q, k, v, mask, scaling=d ** -0.5)[0]
        out.backward(grad_out)
        return [out, q.grad, k.grad, v.grad]

    ref = step(cores["eager"])
    diff = {n: max((x.float() - y.float()).abs().max().item() for x, y in zip(step(c), ref)) for n, c in cores.items()}
    times: dict[str, list[float]] = {n: [] for n in cores}
    if not a.no_lock:
        cpu_lock.acquire("attention_core")
    try:
        for _ in range(a.rounds):
            for n, c in cores.items():
                t0 = time.perf_counter()
                step(c)
                times[n].append(time.perf_counter() - t0)
    finally:
        if not a.no_lock:
            cpu_lock.release()
    med = {n: statistics.median(t) * 1e3 for n, t in times.items()}
    print(json.dumps({"blocks": [blocks.count, blocks.width], "tokens": int(batch["position_ids"].numel()),
                      "heads": [config.num_attention_heads, config.num_key_value_heads], "rounds": a.rounds,
                      "median_ms": {n: round(m, 2) for n, m in med.items()},
                      "speedup_vs_eager": {n: round(med["eager"] / m, 3) for n, m in med.items()},
                      "max_abs_diff_vs_eager": diff}, indent=1))
    return 0


if __name__ == "__main__":
    from loralab.runtime.allocator import reexec_with_allocator

    reexec_with_allocator()
    sys.exit(main())

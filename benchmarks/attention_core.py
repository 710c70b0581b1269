"""The packed blocks' attention core in bf16, as loralab runs it (the model's own eager function under
checkpointing: `loralab.io.attention._eager_recompute`) against two leaner cores it could run instead:

  grouped  q's heads grouped per K/V head (no repeated K and V), the scale applied to q, the mask added
           in place, softmax in bf16 (torch's CPU kernel accumulates in fp32) instead of fp32 then a cast;
  halves   the same, with the first half of the queries against the first half of the keys only.

    .venv/bin/python benchmarks/attention_core.py [--rounds 15] [--batch 0]

On the blocks of the throughput benchmark's micro batch `--batch` (its layout and block-diagonal mask), with
random q, k, v at the default model's head counts: forward, recomputed forward and backward of one layer,
the cores alternating. Prints JSON: median ms per core, ratios to loralab's, and the largest difference of
outputs and gradients from it. Respects /tmp/loralab_cpu_lock.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from itertools import islice
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def grouped(q, k, v, mask, halves: bool = False):
    import torch

    b, hq, w, d = q.shape
    hk, g = k.shape[1], hq // k.shape[1]
    q = (q * d ** -0.5).view(b, hk, g, w, d)
    spans = ((0, w // 2), (w // 2, w)) if halves else ((0, w),)
    outs = []
    for lo, hi in spans:  # keys beyond `hi` are masked for every query below it (causal)
        n = hi - lo
        s = torch.bmm(q[:, :, :, lo:hi].reshape(b * hk, g * n, d), k[:, :, :hi].reshape(b * hk, hi, d).transpose(1, 2))
        s.view(b, hk, g, n, hi).add_(mask[:, :, lo:hi, :hi].reshape(b, 1, 1, n, hi))
        outs.append(torch.bmm(torch.softmax(s, -1), v[:, :, :hi].reshape(b * hk, hi, d)).view(b, hq, n, d))
    return torch.cat(outs, 2).transpose(1, 2).contiguous()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--batch", type=int, default=0, help="which micro batch of the throughput benchmark")
    ap.add_argument("--no-lock", action="store_true")
    a = ap.parse_args()

    import torch
    from torch.utils.checkpoint import checkpoint
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaAttention

    import cpu_lock
    from loralab.config import RunConfig
    from loralab.io.attention import RECOMPUTE, _Blocks, _eager_recompute
    from loralab.io.models import load_tokenizer, resolve
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
    cores = {
        "loralab": lambda q, k, v: _eager_recompute(module, q, k, v, mask, scaling=d ** -0.5)[0],
        "grouped": lambda q, k, v: checkpoint(grouped, q, k, v, mask, use_reentrant=False),
        "halves": lambda q, k, v: checkpoint(grouped, q, k, v, mask, True, use_reentrant=False),
    }

    def step(core):
        q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
        out = core(q, k, v)
        out.backward(grad_out)
        return [out, q.grad, k.grad, v.grad]

    ref = step(cores["loralab"])
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
                      "speedup_vs_loralab": {n: round(med["loralab"] / m, 3) for n, m in med.items()},
                      "max_abs_diff_vs_loralab": diff}, indent=1))
    return 0


if __name__ == "__main__":
    from loralab.allocator import reexec_with_allocator

    reexec_with_allocator()
    sys.exit(main())

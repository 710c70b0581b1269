"""NF4 dequantization speed: loralab.peft.quant.dequantize_nf4's kernels against torchao's own, paired.

    .venv/bin/python benchmarks/experiments/nf4_dequant.py [--rounds 9] [--threads 2] [--json out.json]

Dequantizes the default model's (SmolLM2-135M) decoder weights once per pass, as QLoRA does in
forward and again in backward: one decoder layer's seven linear shapes, random N(0, 0.02) weights
quantized by loralab.peft.quant.to_nf4, timed over all of them and scaled by the 30 layers. Per
round the kernels alternate (torchao; loralab's torch gather, `torch`; bitsandbytes' CPU kernel,
`bitsandbytes`, where the qlora extra is installed), so a shared machine's slow phases hit all;
reported per output dtype (bf16, fp32): the median pass time of each and the median of the
per-round ratios torchao / kernel. Every output is checked equal to torchao's first. Holds
/tmp/loralab_cpu_lock.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/: the shared helpers

LAYERS = 30  # SmolLM2-135M's decoder layers
SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]  # q k v o gate up down


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--no-lock", action="store_true")
    a = ap.parse_args()
    import torch

    import cpu_lock
    import throughput as T
    from loralab.peft.quant import _bitsandbytes_op, dequantize_nf4, to_nf4

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    weights = [to_nf4(torch.randn(s) * 0.02) for s in SHAPES]
    kinds = {k: (lambda t, d, k=k: dequantize_nf4(t, d, k)) for k in ("torchao", "torch", "bitsandbytes")}
    if _bitsandbytes_op() is None:
        del kinds["bitsandbytes"]
    if not a.no_lock:
        cpu_lock.acquire("nf4_dequant")
    result = {"cpu_flags": T.cpu_flags(), "threads": a.threads, "weights": LAYERS * sum(r * c for r, c in SHAPES),
              "load_average_before": os.getloadavg()[0], "dtypes": {}}
    try:
        for dtype in (torch.bfloat16, torch.float32):
            for t in weights:  # warm-up and the oracle check
                for k, f in kinds.items():
                    if not torch.equal(f(t, dtype), t.get_original_weight().to(dtype)):
                        raise SystemExit(f"the {k} NF4 dequantization differs from torchao's ({dtype})")
            times = {k: [] for k in kinds}
            for _ in range(a.rounds):
                for k, f in kinds.items():
                    t0 = time.perf_counter()
                    for t in weights:
                        f(t, dtype)
                    times[k].append((time.perf_counter() - t0) * LAYERS)
            result["dtypes"][str(dtype).removeprefix("torch.")] = {
                **{f"{k}_pass_s": round(statistics.median(v), 4) for k, v in times.items()},
                **{f"torchao_over_{k}": round(statistics.median(ta / tk for ta, tk in zip(times["torchao"], v)), 2)
                   for k, v in times.items() if k != "torchao"}}
    finally:
        if not a.no_lock:
            cpu_lock.release()
    result["load_average_after"] = os.getloadavg()[0]
    text = json.dumps(result, indent=1)
    print(text)
    if a.json:
        a.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

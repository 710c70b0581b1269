"""LoRA dropout's keep mask on the CPU: loralab's (peft/dropout.keep_mask: numpy's PCG64DXSM bits,
four 16-bit uniforms per 64-bit draw) against the same split drawn by torch's own generator (mt19937)
and against torch's bernoulli_, at the LoRA inputs of the throughput bench's micro batch. Prints JSON.

    .venv/bin/python benchmarks/experiments/dropout_mask.py [--positions 986] [--rounds 200]
"""
from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--positions", type=int, default=986, help="token positions of the micro batch")
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--p", type=float, default=0.05)
    a = ap.parse_args()

    import torch

    from loralab.peft.dropout import keep_mask

    def torch_bits(x, p):  # the split drawn by torch's generator (keep_mask before 2026-12-04)
        n = x.numel()
        bits = torch.randint(-2**63, 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64)
        return bits.view(torch.int16)[:n].view(x.shape) >= round(p * 65536) - 32768

    def bernoulli(x, p):
        return torch.empty(x.shape, dtype=torch.bool).bernoulli_(1 - p)

    ways = {"loralab": keep_mask, "torch_bits": torch_bits, "bernoulli": bernoulli}
    result = {"threads": torch.get_num_threads(), "p": a.p, "shapes": {}}
    for width in (576, 1536):  # the default model's hidden and MLP widths
        x = torch.empty(a.positions, width, dtype=torch.bfloat16)
        times = {k: [] for k in ways}
        for _ in range(a.rounds):  # interleaved, so drifts hit every way alike
            for k, f in ways.items():
                t0 = time.perf_counter()
                f(x, a.p)
                times[k].append(time.perf_counter() - t0)
        med = {k: sorted(v)[len(v) // 2] * 1e6 for k, v in times.items()}
        kept = float(keep_mask(x, a.p).float().mean())
        result["shapes"][f"{a.positions}x{width}"] = {
            "median_us": {k: round(v, 1) for k, v in med.items()}, "kept_fraction": round(kept, 4),
            "speedup_vs_torch_bits": round(med["torch_bits"] / med["loralab"], 2),
            "speedup_vs_bernoulli": round(med["bernoulli"] / med["loralab"], 2)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

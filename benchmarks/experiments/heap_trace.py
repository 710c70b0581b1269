"""How much of a training run's peak RSS is live memory and how much is heap holes (CPU, glibc).

    .venv/bin/python benchmarks/experiments/heap_trace.py [--steps 16] [--batch 8] [--grad-accum 1]
        [--examples 128] [--packed 1] [--lr 2e-4]

Runs the throughput benchmark's loralab side (`loralab_side.worker_loralab`: `run_training` on the
workload, packed by default) with hooks on every decoder block (forward start and end, backward
start) and on the optimizer step. At each hook it reads the RSS (/proc/self/statm) and glibc's
`mallinfo2` (main heap: bytes in use, in mmapped chunks, size of the heap). Prints one JSON object: the
run's peak RSS (run_training's own VmHWM), the most
malloc had in use at any hook and where, the heap's largest size, and per optimizer step the RSS and
heap at its end, so one sees whether the peak follows live tensors or the heap's high-water mark.
The hooks cost time: this is a memory trace, not a speed benchmark.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/: the shared helpers
from loralab_side import worker_loralab  # noqa: E402

MB = 2**20


class MallInfo2(ctypes.Structure):  # glibc >= 2.33, struct mallinfo2: every field a size_t
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def _mallinfo2():
    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (AttributeError, OSError):
        raise SystemExit("heap_trace.py needs glibc >= 2.33 (mallinfo2)") from None
    fn.restype = MallInfo2
    return fn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--examples", type=int, default=128)
    ap.add_argument("--packed", type=int, default=1)
    ap.add_argument("--lr", type=float, default=2e-4)
    a = ap.parse_args()

    import torch
    import torch.optim.optimizer as optimizer_hooks

    import loralab.run as run_module  # the run object calls train() from here
    from loralab.memory.measure import current_rss_bytes
    from loralab.train.compile import decoder_blocks

    mallinfo2 = _mallinfo2()
    marks, steps = [], []  # marks: (label, in use, heap) at each block hook; steps: after each optimizer step

    def heap() -> tuple[int, int]:  # bytes malloc has in use, bytes it holds (heap + mmapped chunks)
        m = mallinfo2()
        return m.uordblks + m.hblkhd, m.arena + m.hblkhd

    def mark(label: str) -> None:
        marks.append((label, *heap()))

    def after_step(*_):
        in_use, held = heap()
        steps.append({"rss_mb": round(current_rss_bytes() / MB), "in_use_mb": round(in_use / MB),
                      "heap_mb": round(held / MB)})

    train = run_module.train

    def traced_train(model, *args, **kwargs):  # the very loop run_training runs, with hooks added
        for i, block in enumerate(decoder_blocks(model)):
            block.register_forward_pre_hook(lambda *_, i=i: mark(f"forward {i} start"))
            block.register_forward_hook(lambda *_, i=i: mark(f"forward {i} end"))
            block.register_full_backward_pre_hook(lambda *_, i=i: mark(f"backward {i} start"))
        optimizer_hooks.register_optimizer_step_post_hook(after_step)
        return train(model, *args, **kwargs)

    run_module.train = traced_train
    spec = dict(name="packed" if a.packed else "loralab", packed=bool(a.packed), examples=a.examples, seed=42,
                lr=a.lr, batch=a.batch, grad_accum=a.grad_accum, steps=a.steps, warmup=0, precision="auto")
    t0 = time.perf_counter()
    out = worker_loralab(spec)
    top = max(marks, key=lambda m: m[1])
    print(json.dumps({
        "config": spec, "precision": out["precision"], "threads": torch.get_num_threads(),
        "wall_s": round(time.perf_counter() - t0, 1),
        "peak_rss_mb": round(out["peak_memory_bytes"] / MB),
        "rss_at_start_mb": round(out["memory_at_start_bytes"] / MB),
        "max_in_use_mb": round(top[1] / MB), "max_in_use_at": top[0],
        "max_heap_mb": round(max(m[2] for m in marks) / MB),
        "after_each_step": steps}, indent=1))


if __name__ == "__main__":
    main()

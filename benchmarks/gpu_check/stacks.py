"""Speed against the GPU stacks: tokens/s and MFU of loralab (run_training, packed) vs PEFT + transformers'
Trainer and TRL's SFTTrainer with packing (Liger kernels where liger_kernel imports), on the same examples and
micro batches: throughput.py's workers (peft_baseline.py, loralab_side.py, workload.py), each in its own
process. MFU is against the bf16 matmul peak measured here (CUDA: an 8192^3 GEMM; the CPU mode: workload's
2048^3 fp32 GEMM, since its sides run fp32 on a CPU without fast bf16)."""
from __future__ import annotations

import importlib.util
import math
import tempfile
import time
from pathlib import Path

import torch
from common import FAIL, PASS, TINY, Ctx, hf_config, model_config, row

SIDES = ("baseline", "baseline-sft", "packed")


def cuda_matmul_peak(n: int = 8192, reps: int = 10) -> float:
    """Best GFLOP/s of an n^3 bf16 GEMM on the current GPU."""
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    best = math.inf
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def shaped_folder(folder: Path, shape, tokenizer_vocab: bool = False) -> Path:
    """A model of `shape` (a config dict or a bundled name) with random weights, saved with the tests' tiny
    tokenizer (tests/tiny_tokenizer.py) where the workers load it; tokenizer_vocab: the vocabulary cut to the
    tokenizer's (else the shape's, which keeps the output layer's cost)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
    from transformers import AutoModelForCausalLM

    from tiny_tokenizer import make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    special = dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    cfg = model_config(shape)
    cfg = dict(cfg, **special, **({"vocab_size": len(tok)} if tokenizer_vocab else {}))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(hf_config(cfg)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _model(ctx: Ctx, tmp: Path) -> tuple[str, str]:
    """(model folder or name, what it is): the default model, fetched where it is not cached; where it cannot
    be (a machine with no registry), random weights of its shape with the tiny tokenizer, whose tokens are
    characters: more tokens per example than SmolLM2's, the same on every side."""
    import throughput


    if ctx.tiny:
        return str(shaped_folder(tmp / "tiny", TINY, tokenizer_vocab=True)), "a tiny Llama, the tests' tokenizer"
    from loralab.io.models import resolve

    try:
        return str(resolve(throughput.MODEL)), throughput.MODEL
    except Exception as e:  # no registry, no cache: any failure of the fetch
        why = f"{type(e).__name__}: {e}"[:120]
        return str(shaped_folder(tmp / "shape", throughput.MODEL)), \
            f"random weights of {throughput.MODEL}'s shape, the tests' tokenizer (the model: {why})"


def stacks(ctx: Ctx) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="gpu-check-stacks-") as tmp:
        model, what = _model(ctx, Path(tmp))
        return _stacks(ctx, model, what)


def _stacks(ctx: Ctx, model: str, what: str) -> list[dict]:
    import throughput
    from loralab.train.precision import resolve_precision
    from workload import matmul_peak, model_shape

    steps, batch = (3, 2) if ctx.tiny else (12, 8)
    precision = resolve_precision("auto", ctx.device)
    if ctx.cuda:
        peak, peak_kind = cuda_matmul_peak(), "bf16 8192^3"
    else:
        kind = "bf16" if precision == "bf16" else "fp32"
        peak, peak_kind = matmul_peak(reps=3, precisions=(kind,))[f"{kind}_gflops"], f"{kind} 2048^3 (CPU)"
    liger = ctx.cuda and importlib.util.find_spec("liger_kernel") is not None
    base = dict(steps=steps, batch=batch, grad_accum=1, examples=steps * batch, lr=1e-3, warmup=0, seed=42,
                baseline_weights="fp32", precision=precision, baseline_allocator="system", model=model, liger=liger)
    ctx.steps["stacks"] = {"steps": steps, "micro_batch": batch, "sides": list(SIDES)}
    shape = model_shape(model)
    rows, results = [], {}
    for side in SIDES:
        spec = throughput.side_spec(side, base, 0)
        res, note = _side(throughput, side, spec)
        if res is None:
            rows.append(row("stacks", side, FAIL, note))
            continue
        s = throughput.summarize(res, shape, peak)
        results[side] = s
        ok = s["tokens"] > 0 and all(math.isfinite(x) for x in s["losses"])
        how = s["how"] + (" + Liger kernels" if spec.get("liger") and side == "baseline-sft" else "")
        if side == "baseline-sft" and ctx.cuda and not liger:
            note += "liger_kernel does not import here: without Liger; "
        rows.append(row("stacks", f"{side}: {how}", PASS if ok else FAIL,
                        f"{note}{s['tokens']:,} tokens in {s['steps']} steps; MFU against {peak_kind} = "
                        f"{peak:,.0f} GFLOP/s; peak {s['peak_memory_bytes'] / 2**20:,.0f} MiB "
                        f"({s.get('memory_method', '')})",
                        tokens_per_s=s["tokens_per_s"], mfu=s["mfu"], step_s=s["step_time_s_median"]))
    baselines = [x for x in results if x in throughput.BASELINES]
    if "packed" in results and baselines:
        fastest = max(baselines, key=lambda x: results[x]["tokens_per_s"])
        ratio = results["packed"]["tokens_per_s"] / results[fastest]["tokens_per_s"]
        rows.append(row("stacks", f"loralab (packed) / the fastest stack ({fastest}): tokens/s", PASS,
                        f"{ratio:.2f}x; the same {steps * batch} examples on every side; model: {what}",
                        tokens_per_s=ratio))
    return rows


def _side(throughput, side: str, spec: dict) -> tuple[dict | None, str]:
    """(the worker's result or None, a note). throughput's driver ends a failed worker with SystemExit: here it
    is that side's failed row. TRL's side that fails with Liger runs again without it."""
    kind = "baseline" if side in throughput.BASELINES else "loralab"
    try:
        return throughput._run_worker(kind, spec, None), ""
    except SystemExit as e:
        if not spec.get("liger"):
            return None, str(e)[-600:]
        spec["liger"] = False
        try:
            return throughput._run_worker(kind, spec, None), f"failed with Liger ({str(e)[-200:]}), ran without; "
        except SystemExit as e2:
            return None, str(e2)[-600:]

PARTS = {"stacks": stacks}

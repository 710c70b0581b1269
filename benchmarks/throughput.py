"""Throughput, memory and MFU: loralab's training loop vs the Hugging Face stack, same data.

    .venv/bin/python benchmarks/throughput.py [--steps 16] [--batch 8] [--grad-accum 1] [--examples N]
        [--precision auto|bf16|fp32] [--sides baseline,baseline-grouped,baseline-sft,loralab,packed]
        [--qlora-steps 6] [--json results.json]

Every side fine-tunes the default model (smollm2-135m) with LoRA r=16, alpha=32, dropout 0.05 on
every linear layer, on the SAME encoded examples (the same tokens and loss masks), the same number
of them (steps x batch x grad-accum: one epoch by default), the same seed, lr, warmup and cosine
schedule, in the same precision: `--precision auto` picks it as a careful user would on this CPU
(bf16 where the CPU has bf16 matmuls, AVX512-BF16 or AMX, that measure faster than fp32's:
`loralab.train.precision.cpu_has_fast_bf16`; else fp32), `--precision fp32` forces the path of CPUs
without bf16 (AVX2-only) on any CPU.
  - baseline sides (peft_baseline.py), configured as a careful user would: `bf16=True` (autocast)
    only where the precision is bf16, no evaluation, logs to a list, report_to=[], use_cpu=True on
    the CPU, 0 dataloader workers. `--baseline-weights bf16` loads the base in bf16 too (default: fp32
    weights, the textbook mixed precision that bf16=True switches on). Warmup defaults to 0:
    transformers' warmup gives step 0 lr 0 where loralab's gives lr/warmup, a one-step offset that
    alone moves a short run's final loss by a few percent.
      baseline          `peft.get_peft_model` (target_modules="all-linear") + `transformers.Trainer`
                        with DataCollatorForSeq2Seq (pads per batch), fed the very micro batches loralab
                        draws, in the same order: the loss curves compare implementations, not orders.
      baseline-grouped  the same with the length-grouped sampler (group_by_length): less padding.
      baseline-sft      TRL's SFTTrainer with packing (padding-free rows of one loralab step's tokens).
    The headline ratios are against the FASTEST baseline side of the run.
  - loralab: `loralab.pipeline.run_training` (what `loralab train` runs) given the workload's
    examples, no evaluation; read back from its summary.json (runtime, tokens/s, peak memory) and
    metrics.jsonl (each step's elapsed time and loss). Levers are its config keys.
  - packed: the same, with the packing lever (`loralab.data.layout`): each micro batch (the very
    examples of the unpacked run) laid end to end in fewer rows, position ids restarting per
    example, block-diagonal causal attention: `train.packing=true` (the default of `loralab
    train`; the plain side sets it false to show what packing gives).
Each side runs in its own process, so its peak memory (peak RSS of the training phase, via
`loralab.memory.measure.PeakMemory`, the same measurement for all: run_training's own for loralab)
is clean. The matmul peaks (bf16 and fp32) are measured in the same run (2048^3 GEMM, best of
several); model FLOPs utilisation (MFU) is against the peak of the precision in use:

  model FLOPs = sum over examples of
        (2 N + 2 N) T            frozen base: forward + backward input-gradient (no weight gradient)
      + 6 N_lora T               LoRA factors: forward, input-gradient, weight-gradient
      + 12 L d_attn S(S+1)/2     causal attention (QK^T and AV: forward 4, backward 8 per pair)
      + 4 V d T_label            output layer (frozen): forward + input-gradient at labelled positions
  T = S = the example's real (non-padding) tokens, N = weights of the decoder's linear layers,
  N_lora = LoRA parameters, L layers, d_attn = heads x head_dim, V vocabulary, d hidden size.
  Padding and positions the loss does not need earn nothing: MFU = model FLOPs / runtime / peak.

Also: QLoRA vs LoRA step time inside loralab (model.quant=nf4), short runs on the same batches
(skipped, with the reason, when torchao is not installed). `--json PATH` writes everything,
with top-level `tokens_per_s_ratio` and `peak_memory_ratio` (loralab / the fastest baseline side;
loralab = the `--headline` side, packed by default), `ratios` for every pair, the CPU's flags.
Respects /tmp/loralab_cpu_lock (waits while someone times).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cpu_lock
from loralab_side import worker_loralab
from peft_baseline import worker_baseline
from workload import (
    AVX2_ONLY_ENV,
    FLOPS_FORMULA,
    LORA,
    MAX_SEQ_LEN,
    MODEL,
    matmul_peak,
    model_flops,
    model_shape,
    worker_env,
)

HERE = Path(__file__).resolve()

# ----------------------------------------------------------------------------------------------
# Workers (each in its own process)

# The Hugging Face sides (peft_baseline.py's variants): the headline ratios are against the fastest.
BASELINES = {"baseline": "trainer", "baseline-grouped": "grouped", "baseline-sft": "sft"}
SIDE_HELP = ("a side is baseline (PEFT + Trainer, loralab's batches), baseline-grouped (+ length-grouped "
             "sampler), baseline-sft (TRL SFTTrainer with packing), or loralab | packed | grouped, "
             "optionally with modifiers joined by '+': "
             "sdpa (attention), ckpt (gradient checkpointing), compile (torch.compile of the decoder blocks), "
             "t1 (one thread), trim (heap trims in forward: train.trim_heap=true), nodrop (LoRA dropout 0, changes the "
             "recipe: for reference), e.g. packed+sdpa")


def side_spec(name: str, base: dict, group_window: int) -> dict:
    kind, *mods = name.split("+")
    if name in BASELINES:
        return dict(base, name=name, variant=BASELINES[name])
    known = {"sdpa", "ckpt", "compile", "t1", "trim", "nodrop"}
    if kind not in ("loralab", "packed", "grouped") or not set(mods) <= known:
        raise SystemExit(f"unknown side {name!r}: {SIDE_HELP}")
    return dict(base, name=name, packed=kind == "packed", group_window=group_window if kind == "grouped" else 0,
                attn="sdpa" if "sdpa" in mods else "auto", ckpt="ckpt" in mods, compile="compile" in mods,
                threads=1 if "t1" in mods else None, trim_heap="trim" in mods,
                dropout=0.0 if "nodrop" in mods else LORA["dropout"])


def worker(kind: str, spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    if kind == "matmul":
        res = matmul_peak(precisions=spec.get("precisions", ("bf16", "fp32")))
    elif kind == "baseline":
        res = worker_baseline(spec)
    else:
        res = worker_loralab(spec)
    Path(out_path).write_text(json.dumps(res))


# ----------------------------------------------------------------------------------------------
# Driver

def run_worker(kind: str, spec: dict, threads: int | None) -> dict:
    cpu_lock.acquire(f"{kind}/{spec.get('name', '')}")
    try:
        return _run_worker(kind, spec, threads)
    finally:
        cpu_lock.release()


def _run_worker(kind: str, spec: dict, threads: int | None) -> dict:
    with tempfile.TemporaryDirectory(prefix="throughput-") as tmp:
        sp, op = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        sp.write_text(json.dumps(spec))
        # the baselines on loralab's malloc too with --baseline-allocator same (for reference; users' default: system)
        env = worker_env(kind == "loralab" or (kind == "baseline" and spec.get("baseline_allocator") == "same"))
        if spec.get("compile"):
            env["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tmp) / "inductor")  # cold: a first run's compile
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        proc = subprocess.run([sys.executable, str(HERE), "--worker", kind, str(sp), str(op)], env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0 or not op.exists():
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            raise SystemExit(f"worker {kind}/{spec.get('name')} failed (exit {proc.returncode}):\n{tail}")
        return json.loads(op.read_text())


def tail_mean(losses: list[float], frac: float = 0.1) -> float:
    k = max(1, round(len(losses) * frac))
    return statistics.fmean(losses[-k:])


def summarize(res: dict, shape: dict, peak_gflops: float) -> dict:
    flops = model_flops(shape, [tuple(x) for x in res["examples_trained"]])
    steps = res["step_times_s"]
    return {**{k: v for k, v in res.items() if k not in ("examples_trained",)},
            "model_flops": flops, "mfu": flops / res["runtime_s"] / (peak_gflops * 1e9),
            "achieved_gflops": flops / res["runtime_s"] / 1e9,
            "padding_fraction": 1 - res["tokens"] / res["slots"] if res["slots"] else 0.0,
            "step_time_s_median": statistics.median(steps), "step_time_s_mean": statistics.fmean(steps),
            "first_step_s": steps[0], "tokens_per_s_after_first_step": (res["tokens"] - _first_tokens(res)) /
            max(res["runtime_s"] - steps[0], 1e-9),
            "final_loss_tail_mean": tail_mean(res["losses"])}


def _first_tokens(res: dict) -> int:
    """Real tokens of the first optimizer step (its examples lead examples_trained)."""
    per_step = len(res["examples_trained"]) // max(res["steps"], 1)
    return sum(t for t, _ in res["examples_trained"][:per_step])


DEFAULT_SIDES = "baseline,baseline-grouped,baseline-sft,loralab,packed"


def cpu_flags() -> list[str]:
    """The CPU flags that decide the precision and the kernels: AVX2, AVX-512, AVX512-BF16, AMX."""
    try:
        have = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    return [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in have]


def fastest_baseline(res: dict) -> str | None:
    """The Hugging Face side with the most tokens/s: the one the headline ratios use."""
    sides = [s for s in res if s in BASELINES]
    return max(sides, key=lambda s: res[s]["tokens_per_s"]) if sides else None


def ratios(r: dict, b: dict) -> dict:
    return {"tokens_per_s_ratio": r["tokens_per_s"] / b["tokens_per_s"],
            "peak_memory_ratio": r["peak_memory_bytes"] / b["peak_memory_bytes"],
            "final_loss_diff_pct": 100 * (r["final_loss_tail_mean"] - b["final_loss_tail_mean"])
            / b["final_loss_tail_mean"]}


def fmt_mb(b: float) -> str:
    return f"{b / 2**20:,.0f} MB"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--examples", type=int, default=None, help="default: steps x batch x grad-accum (one epoch)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--sides", default=DEFAULT_SIDES, help="comma list; " + SIDE_HELP)
    ap.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                    help="of every side: auto = bf16 (autocast for the baselines) where the CPU has bf16 "
                         "matmuls (AVX512-BF16 / AMX), else fp32, as a careful user picks; fp32 forces the "
                         "path of CPUs without bf16 (AVX2-only) on any CPU")
    ap.add_argument("--isa", choices=["native", "avx2"], default="native",
                    help="avx2: every worker's kernels held to AVX2 (oneDNN, ATen, MKL: " +
                         " ".join(f"{k}={v}" for k, v in AVX2_ONLY_ENV.items()) +
                         "), an AVX2-only CPU reproduced on this one; auto precision then picks fp32")
    ap.add_argument("--headline", default="packed", help="the loralab side the top-level ratios use")
    ap.add_argument("--baseline-weights", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--group-window", type=int, default=16)
    ap.add_argument("--qlora-steps", type=int, default=6, help="0 skips the QLoRA vs LoRA step-time check")
    ap.add_argument("--qlora-batch", type=int, default=None, help="micro batch of the QLoRA check (default --batch)")
    ap.add_argument("--baseline-allocator", choices=["system", "same"], default="system",
                    help="the Hugging Face sides' malloc: the system's (as their users run them) or the one "
                         "the loralab command preloads (LORALAB_ALLOCATOR, loralab/runtime/allocator.py)")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the workers")
    ap.add_argument("--no-lock", action="store_true", help="do not wait for / take /tmp/loralab_cpu_lock")
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        worker(*a.worker)
        return 0
    n_examples = a.examples or a.steps * a.batch * a.grad_accum
    if a.isa == "avx2":
        os.environ.update(AVX2_ONLY_ENV)  # before the precision is resolved; the workers inherit it
    from loralab.train.precision import bf16_speedup, cpu_has_fast_bf16, resolve_precision

    precision = resolve_precision(a.precision, "cpu")
    base = dict(steps=a.steps, batch=a.batch, grad_accum=a.grad_accum, examples=n_examples, lr=a.lr,
                warmup=a.warmup, seed=a.seed, baseline_weights=a.baseline_weights, precision=precision,
                baseline_allocator=a.baseline_allocator)
    sides = [s.strip() for s in a.sides.split(",") if s.strip()]
    specs = {s: side_spec(s, base, a.group_window) for s in sides}
    cpu_lock.enabled = not a.no_lock
    t_start = time.perf_counter()
    try:
        peaks_of = {"precisions": ["fp32"] if precision == "fp32" else ["bf16", "fp32"]}
        peak_before = run_worker("matmul", peaks_of, a.threads)
        raw = {}
        for s in sides:
            print(f"running {s}...", file=sys.stderr)
            raw[s] = run_worker("baseline" if s in BASELINES else "loralab", specs[s],
                                1 if specs[s].get("threads") == 1 else a.threads)
            r = raw[s]
            print(f"  {s}: {r['tokens_per_s']:.1f} tokens/s, peak {fmt_mb(r['peak_memory_bytes'])}, "
                  f"{r['cpu_s'] / r['runtime_s']:.2f} cores busy", file=sys.stderr)
        qlora = None
        if a.qlora_steps and importlib.util.find_spec("torchao") is None:
            qlora = {"skipped": "torchao is not installed (model.quant=nf4 needs it)"}
        elif a.qlora_steps:
            qb = a.qlora_batch or a.batch
            q = dict(side_spec("packed", base, 0), steps=a.qlora_steps, warmup=0, batch=qb,
                     examples=max(n_examples, a.qlora_steps * qb * a.grad_accum))
            print("running QLoRA vs LoRA...", file=sys.stderr)
            lo = run_worker("loralab", dict(q, name="lora-short"), a.threads)
            ql = run_worker("loralab", dict(q, name="qlora-short", quant=True), a.threads)
            # the first step holds one-time work (quantized kernels warm up): median of the rest
            tl, tq = (statistics.median(r["step_times_s"][1:] or r["step_times_s"]) for r in (lo, ql))
            qlora = {"steps": a.qlora_steps, "batch": qb, "lora_step_s": tl, "qlora_step_s": tq, "ratio": tq / tl,
                     "lora_peak_memory_bytes": lo["peak_memory_bytes"],
                     "qlora_peak_memory_bytes": ql["peak_memory_bytes"],
                     "lora_losses": lo["losses"], "qlora_losses": ql["losses"]}
        # Measured again at the end: on a shared (virtual) machine the attainable peak drifts; MFU
        # divides by the higher of the two, so it is never flattered by a slow measurement.
        peak_after = run_worker("matmul", peaks_of, a.threads)
    finally:
        cpu_lock.release()
    peak = {"threads": peak_before["threads"]}
    for name in peaks_of["precisions"]:  # bf16 is not measured where it would be emulated
        peak[f"{name}_gflops"] = max(peak_before[f"{name}_gflops"], peak_after[f"{name}_gflops"])
        peak[f"{name}_gflops_start_end"] = [peak_before[f"{name}_gflops"], peak_after[f"{name}_gflops"]]
    # MFU against the peak of the precision the sides compute in
    peak["mfu_gflops"] = peak[f"{precision}_gflops"]
    total_s = time.perf_counter() - t_start

    folder = next(iter(raw.values()))["folder"]
    shape = model_shape(folder)
    res = {s: summarize(r, shape, peak["mfu_gflops"]) for s, r in raw.items()}
    cpu = {"flags": cpu_flags(), "has_fast_bf16": cpu_has_fast_bf16(), "precision": precision, "isa": a.isa,
           "bf16_speedup": bf16_speedup()}
    print_table(res, peak, qlora, a, n_examples, total_s, cpu)
    out = {"config": {**base, "model": MODEL, "lora": LORA, "max_seq_len": MAX_SEQ_LEN, "sides": sides},
           "cpu": cpu,
           "matmul_peak": peak, "flops_formula": FLOPS_FORMULA, "model_shape": shape, "sides": res,
           "qlora": qlora, "total_s": total_s}
    head = a.headline if a.headline in res else next((s for s in ("packed", "loralab") if s in res), None)
    fastest = fastest_baseline(res)
    if fastest and head:
        b, l = res[fastest], res[head]
        out.update(headline_side=head, headline_baseline=fastest,
                   tokens_per_s_ratio=l["tokens_per_s"] / b["tokens_per_s"],
                   peak_memory_ratio=l["peak_memory_bytes"] / b["peak_memory_bytes"],
                   final_loss_diff_pct=100 * (l["final_loss_tail_mean"] - b["final_loss_tail_mean"])
                   / b["final_loss_tail_mean"])
        # every loralab side against every baseline side
        out["ratios"] = {s: {bs: ratios(r, res[bs]) for bs in res if bs in BASELINES}
                         for s, r in res.items() if s not in BASELINES}
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
        print(f"\nwrote {a.json}")
    return 0


def print_table(res: dict, peak: dict, qlora, a, n_examples: int, total_s: float, cpu: dict) -> None:
    any_r = next(iter(res.values()))
    st = any_r["data_stats"]
    print(f"throughput: smollm2-135m, LoRA r={LORA['r']} alpha={LORA['alpha']} dropout={LORA['dropout']} "
          "all linear layers; "
          f"{a.steps} steps x batch {a.batch} x accum {a.grad_accum}, {n_examples} examples "
          f"({st['n_tokens']:,} tokens, {st['n_label_tokens']:,} labelled), seed {a.seed}, lr {a.lr:g}, "
          f"warmup {a.warmup}, cosine; {peak['threads']} threads")
    print(f"CPU flags: {', '.join(cpu['flags']) or '?'}{' held to AVX2 (--isa avx2)' if a.isa == 'avx2' else ''} "
          f"(fast bf16 matmuls: {cpu['has_fast_bf16']}; measured bf16 speed-up {cpu['bf16_speedup']}); "
          f"precision of every side: {cpu['precision']} (--precision {a.precision})")
    print("matmul peak (2048^3, best of 8, higher of start/end): " + ", ".join(
        f"{n} {peak[f'{n}_gflops']:.0f} GFLOP/s (start {peak[f'{n}_gflops_start_end'][0]:.0f}, "
        f"end {peak[f'{n}_gflops_start_end'][1]:.0f})" for n in ("bf16", "fp32") if f"{n}_gflops" in peak))
    print(f"MFU: {FLOPS_FORMULA}; / runtime / {cpu['precision']} peak ({peak['mfu_gflops']:.0f} GFLOP/s)\n")
    cols = ["side", "tokens/s", "step (median)", "padding", "peak memory", "GFLOP/s", "MFU", "cores†", "final loss*"]
    rows = []
    for s, r in res.items():
        rows.append([s, f"{r['tokens_per_s']:,.1f}", f"{r['step_time_s_median']:.2f} s",
                     f"{100 * r['padding_fraction']:.0f}%", fmt_mb(r["peak_memory_bytes"]),
                     f"{r['achieved_gflops']:.1f}", f"{100 * r['mfu']:.1f}%", f"{r['cpu_s'] / r['runtime_s']:.2f}",
                     f"{r['final_loss_tail_mean']:.4f}"])
    fastest = fastest_baseline(res)
    if fastest:
        b = res[fastest]
        cols += [f"tok/s ÷ {fastest}", "memory ratio", "loss diff"]
        for row, r in zip(rows, res.values()):
            loss_diff = (r["final_loss_tail_mean"] - b["final_loss_tail_mean"]) / b["final_loss_tail_mean"]
            row += [f"{r['tokens_per_s'] / b['tokens_per_s']:.2f}x",
                    f"{r['peak_memory_bytes'] / b['peak_memory_bytes']:.2f}x", f"{100 * loss_diff:+.2f}%"]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
    print("* mean training loss over the last 10% of steps (each side's own; the baseline sides other than "
          "`baseline` order or pack the examples differently); † CPU seconds / wall seconds of the training phase "
          f"(below ~{0.9 * peak['threads']:.1f} with {peak['threads']} threads: another process took CPU, "
          "timings suspect)")
    for s, r in res.items():
        print(f"  {s}: {r['how']}; weights {r['weights_dtype']}; runtime {r['runtime_s']:.1f} s for {r['steps']} steps "
              f"(first {r['first_step_s']:.1f} s; after it {r['tokens_per_s_after_first_step']:.1f} tokens/s), "
              f"{r['tokens']:,} real tokens; load {r['load_s']:.1f} s")
    if qlora is None:
        print("QLoRA vs LoRA: not run (--qlora-steps 0)")
    elif "skipped" in qlora:
        print(f"QLoRA vs LoRA: skipped ({qlora['skipped']})")
    else:
        print(f"QLoRA vs LoRA (loralab, packed, batch {qlora['batch']}, {qlora['steps']} steps each, "
              "median step after the first): "
              f"LoRA {qlora['lora_step_s']:.2f} s, QLoRA {qlora['qlora_step_s']:.2f} s -> {qlora['ratio']:.2f}x; "
              f"peak memory LoRA {fmt_mb(qlora['lora_peak_memory_bytes'])}, "
              f"QLoRA {fmt_mb(qlora['qlora_peak_memory_bytes'])}")
    print(f"total {total_s:.0f} s")


if __name__ == "__main__":
    sys.exit(main())

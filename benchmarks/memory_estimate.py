"""How close is the analytic memory estimate (loralab.memory.estimate) to the measured peak? A grid of
short real training runs on this CPU, each in its own process so every peak is clean.

    .venv/bin/python benchmarks/memory_estimate.py [--json results.json] [--only NAME,...] [--steps 3] [--repeat 3]

Each run: loralab.pipeline.run_training with max_steps steps, no evaluation, no validation split, on
data that fills max_seq_len (a long response after a short prompt, so almost every position carries
a label). Measured: the run's peak_memory_bytes (peak RSS of the training phase), the median of
--repeat runs (the same run's peak varied by up to 17% between processes). Estimated:
estimate_for_run(cfg, config.json, "cpu"). Models: the default smollm2-135m and two random-init
tiny Llama models saved as HF folders (with the default model's tokenizer).
Respects /tmp/loralab_cpu_lock: waits while a colleague holds it (they are timing something).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import cpu_lock  # benchmarks/ is on sys.path when run as a script
from workload import worker_env

TINY = {  # random-init Llama shapes: a small tied one and a wider untied one with full multi-head attention
    "tiny-a": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, tie_word_embeddings=True),
    "tiny-b": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=6, num_attention_heads=8,
                   num_key_value_heads=8, tie_word_embeddings=False),
}
SMOL = "smollm2-135m"
# name, model, overrides: varies r, targets, seq, batch, quantization, optimizer, precision, checkpointing
GRID = [
    ("smol-r8-all-s256-b4", SMOL, ["lora.r=8", "data.max_seq_len=256", "train.batch_size=4"]),
    ("smol-r64-all-s256-b4", SMOL, ["lora.r=64", "data.max_seq_len=256", "train.batch_size=4"]),
    ("smol-r8-qv-s512-b2", SMOL, ["lora.targets=qv", "data.max_seq_len=512", "train.batch_size=2"]),
    ("smol-r8-all-s128-b8-sgd", SMOL, ["data.max_seq_len=128", "train.batch_size=8", "train.optimizer=sgd"]),
    ("smol-r8-all-s512-b4-ckpt", SMOL, ["data.max_seq_len=512", "train.batch_size=4",
                                        "train.gradient_checkpointing=true"]),
    ("smol-r16-mlp-s256-b2-fp32", SMOL, ["lora.r=16", "lora.targets=mlp", "data.max_seq_len=256",
                                         "train.batch_size=2", "train.precision=fp32"]),
    ("smol-nf4-r8-all-s256-b4", SMOL, ["model.quant=nf4", "data.max_seq_len=256", "train.batch_size=4"]),
    ("smol-nf4-r8-qv-s512-b2", SMOL, ["model.quant=nf4", "lora.targets=qv", "data.max_seq_len=512",
                                      "train.batch_size=2"]),
    ("smol-full-s128-b4", SMOL, ["train.method=full", "data.max_seq_len=128", "train.batch_size=4"]),
    ("tiny-a-r16-attn-s1024-b2", "tiny-a", ["lora.r=16", "lora.targets=attn", "data.max_seq_len=1024",
                                           "train.batch_size=2"]),
    ("tiny-b-r8-all-s256-b8-sgd", "tiny-b", ["data.max_seq_len=256", "train.batch_size=8", "train.optimizer=sgd"]),
    ("tiny-b-nf4-r32-all-s512-b4", "tiny-b", ["model.quant=nf4", "lora.r=32", "data.max_seq_len=512",
                                             "train.batch_size=4"]),
    ("smol-r8-qv-s256-b4-ckpt", SMOL, ["lora.targets=qv", "data.max_seq_len=256", "train.batch_size=4",
                                       "train.gradient_checkpointing=true"]),
    ("tiny-b-r8-all-s1024-b2-ckpt", "tiny-b", ["data.max_seq_len=1024", "train.batch_size=2",
                                               "train.gradient_checkpointing=true"]),
]


def write_data(path: Path, n: int = 48) -> None:
    """Records whose response alone is longer than any max_seq_len used here (truncated to fill it)."""
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()
    with open(path, "w") as f:
        for i in range(n):
            text = " ".join(words[(i + j) % len(words)] + str(j % 97) for j in range(1200))
            f.write(json.dumps({"prompt": f"Story {i}:", "response": text}) + "\n")


def make_tiny_models(root: Path) -> dict[str, Path]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from loralab.io.models import resolve

    smol = resolve(SMOL)
    out = {}
    for name, shape in TINY.items():
        folder = root / name
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=49152, max_position_embeddings=2048, pad_token_id=2, bos_token_id=1,
                          eos_token_id=2, **shape)
        LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder)
        for f in smol.iterdir():
            if f.name.startswith("tokenizer") or f.name == "chat_template.jinja":
                shutil.copy(f, folder / f.name)
        out[name] = folder
    return out


def child(spec: dict) -> None:
    """One run in this (fresh) process; prints one JSON line with measured and estimated bytes."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from loralab.config import load_config
    from loralab.io.models import resolve
    from loralab.memory.arch import resolve_model_config
    from loralab.memory.estimate import estimate_for_run
    from loralab.pipeline import run_training

    cfg = load_config(None, spec["overrides"])
    summary = run_training(cfg, quiet=True)
    est = estimate_for_run(cfg, resolve_model_config(str(resolve(cfg.model.name))), "cpu")
    print("RESULT " + json.dumps({"measured": summary["peak_memory_bytes"], "start": summary["memory_at_start_bytes"],
                                  "allocator": summary.get("allocator"),
                                  "estimate": est, "method": summary["method"], "precision": summary["precision"]}))


def run_one(name: str, model: str, overrides: list[str], tmp: Path, data: Path, steps: int, repeat: int) -> dict:
    """The config `repeat` times, each in a fresh process: the same run's peak RSS varies from one
    process to the next (where glibc's heap holes fall; up to 17% measured), so the median is compared."""
    spec = {"overrides": [f"model.name={model}", f"data.path={data}", "data.template=raw", "data.val_fraction=0",
                          "eval.n=0", "eval.before=false", "train.progress=false", f"train.max_steps={steps}",
                          f"output_dir={tmp / 'runs' / name}", "resume=false", *overrides]}
    results = []
    for _ in range(repeat):
        cpu_lock.wait()
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                              env=worker_env(True))  # on the malloc the `loralab` command runs on
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            return {"name": name, "error": tail[:300]}
        results.append(json.loads(lines[-1][len("RESULT "):]))
    peaks = sorted(r["measured"] for r in results)
    measured = statistics.median(peaks)
    r = results[0]
    est = r["estimate"]["peak_bytes"]
    return {"name": name, "model": model, "overrides": overrides, "measured_bytes": measured, "measured_all": peaks,
            "start_bytes": r["start"], "allocator": r.get("allocator"), "estimated_bytes": est,
            "error": (est - measured) / measured,
            "breakdown": r["estimate"]["breakdown"], "activation_detail": r["estimate"]["activation_detail"]}


def row_line(r: dict) -> str:
    if isinstance(r.get("error"), str):
        return f"{r['name']:<30} failed: {r['error']}"
    mib = lambda n: f"{n / 2**20:,.0f}"  # noqa: E731
    spread = f"{mib(r['measured_all'][0])}-{mib(r['measured_all'][-1])}"
    return (f"{r['name']:<30} {mib(r['measured_bytes']):>13} {spread:>13} {mib(r['estimated_bytes']):>13} "
            f"{100 * r['error']:>+7.1f}%")


def format_table(rows: list[dict]) -> str:
    lines = [f"{'run':<30} {'median MiB':>13} {'min-max MiB':>13} {'estimate MiB':>13} {'error':>8}", "-" * 81]
    lines += [row_line(r) for r in rows]
    errs = [abs(r["error"]) for r in rows if not isinstance(r.get("error"), str)]
    if errs:
        lines.append(f"{len(errs)} runs: mean |error| {100 * sum(errs) / len(errs):.1f}%, max {100 * max(errs):.1f}%")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--only", default=None, help="comma-separated run names (default: the whole grid)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeat", type=int, default=3, help="runs per config; the median peak is compared")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0
    grid = [g for g in GRID if not args.only or g[0] in args.only.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="loralab-memest-") as t:
        tmp = Path(t)
        data = tmp / "long.jsonl"
        write_data(data)
        tiny = make_tiny_models(tmp) if any(g[1] in TINY for g in grid) else {}
        for name, model, overrides in grid:
            rows.append(run_one(name, str(tiny.get(model, model)), overrides, tmp, data, args.steps, args.repeat))
            rows[-1]["model"] = model
            print(row_line(rows[-1]), file=sys.stderr, flush=True)
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": rows}, indent=2) + "\n")
    return 0 if all(not isinstance(r.get("error"), str) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""The throughput benchmark's loralab sides: `loralab.pipeline.run_training`, as `loralab train` runs
it, on the workload's examples (given as its data, no evaluation), read back from what it reports:
summary.json (runtime, tokens/s, peak memory) and metrics.jsonl (each step's elapsed_s and loss).
Runs in its own process (throughput.py's `--worker loralab`)."""
from __future__ import annotations

import json
import tempfile
import time
from itertools import islice, pairwise
from pathlib import Path

from workload import ENCODING, LORA, MODEL, examples_of, make_examples, trained_batches


def run_config(spec: dict, output_dir: str):
    """The side as a loralab RunConfig: every lever is one of run_training's own config keys."""
    from loralab.config import from_dict

    return from_dict({
        # model: gpu_check's --tiny mode gives a tiny model folder
        "model": {"name": spec.get("model", MODEL), "quant": "nf4" if spec.get("quant") else "none",
                  "attn_implementation": spec.get("attn", "auto")},
        "lora": {"r": LORA["r"], "alpha": LORA["alpha"], "dropout": spec.get("dropout", LORA["dropout"]),
                 "targets": "all-linear"},
        "data": ENCODING,  # val_fraction, tasks: unused, the data is given
        "train": {"lr": spec["lr"], "batch_size": spec["batch"], "grad_accum": spec["grad_accum"],
                  "max_steps": spec["steps"], "warmup_steps": spec["warmup"], "scheduler": "cosine",
                  "seed": spec["seed"], "packing": spec.get("packed", False),
                  "precision": spec.get("precision", "auto"),
                  "group_by_length": spec.get("group_window", 0), "compile": bool(spec.get("compile")),
                  "gradient_checkpointing": bool(spec.get("ckpt")), "threads": spec.get("threads"),
                  "trim_heap": bool(spec.get("trim_heap")),
                  "progress": False},
        "eval": {"before": False},
        "output_dir": output_dir, "resume": False})


def worker_loralab(spec: dict) -> dict:
    """One `loralab.pipeline.run_training` on the workload, read back from what it reports:
    summary.json (runtime, tokens/s, peak memory) and metrics.jsonl (each step's elapsed_s and loss)."""
    import warnings

    import torch

    from loralab.data.prompts import encode_all
    from loralab.io.models import load_tokenizer, resolve
    from loralab.pipeline import Datasets, run_training
    from loralab.train.loop import micro_batches

    examples = make_examples(spec["examples"], spec["seed"])
    with tempfile.TemporaryDirectory(prefix="throughput-loralab-") as out:
        cfg = run_config(spec, out)
        metrics = Path(out) / "metrics.jsonl"
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            summary = run_training(cfg, quiet=True, data=Datasets(train=examples, val=[], tests={}))
        wall = time.perf_counter() - t0
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    t = cfg.train
    if t.packing and any("train.packing" in str(w.message) for w in caught):
        raise SystemExit("this model does not honour packed position ids; the run fell back to padded batches")
    # What was trained on, from the same encoding run_training applies (its data.* keys) and the
    # loop's own micro batch stream: padding (slots) and the examples the FLOPs count.
    folder = resolve(spec.get("model", MODEL))
    tok = load_tokenizer(folder)
    enc, stats = encode_all(examples, tok, template=cfg.data.template, system_prompt=cfg.data.system_prompt,
                            max_seq_len=cfg.data.max_seq_len)
    n_micro = t.max_steps * t.grad_accum
    # the loop packs in one row where 'auto' picks the attention on the CPU (model.attention.packs_one_row)
    one_row = t.packing and not t.compile and cfg.model.attn_implementation == "auto"
    stream = micro_batches(enc, t, tok.pad_token_id, one_row=one_row)
    slots = sum(b["input_ids"].numel() for b in islice(stream, n_micro))
    trained = examples_of(enc, trained_batches(enc, t.batch_size, t.seed, n_micro, t.group_by_length))
    if sum(n for n, _ in trained) != summary["train_tokens"]:
        raise SystemExit(f"examples_trained hold {sum(n for n, _ in trained):,} tokens, the run trained on "
                         f"{summary['train_tokens']:,}: the benchmark's encoding differs from run_training's")
    steps = [r for r in records if "loss" in r]
    elapsed = [r["elapsed_s"] for r in steps]
    how = "run_training()" + (" with train.packing=true" if t.packing else "") + \
        (f" with train.group_by_length={t.group_by_length}" if t.group_by_length else "")
    # compile happens in the first step and is counted in the runtime; the worker starts from an
    # empty inductor cache (run_worker), i.e. a first run's cost.
    mods = [m for m, on in (("train.compile (decoder blocks, cold cache)", t.compile),
                            ("sdpa attention", cfg.model.attn_implementation == "sdpa"),
                            ("gradient checkpointing", t.gradient_checkpointing), ("1 thread", t.threads == 1),
                            ("heap trims in forward", t.trim_heap),
                            ("LoRA dropout 0", cfg.lora.dropout == 0.0)) if on]
    memory = ("peak_memory_bytes", "memory_method", "memory_at_start_bytes", "cuda_peak_reserved_bytes", "allocator")
    return {"side": spec["name"], "how": how + "".join(f" + {m}" for m in mods),
            "load_s": wall - summary["runtime_s"],  # loading, encoding, saving: all but the loop
            "runtime_s": summary["runtime_s"], "cpu_s": summary["train_cpu_s"], "steps": summary["steps"],
            "tokens": summary["train_tokens"], "slots": slots, "tokens_per_s": summary["tokens_per_s"],
            "step_times_s": elapsed[:1] + [b - a for a, b in pairwise(elapsed)],
            "losses": [r["loss"] for r in steps], **{k: summary[k] for k in memory if k in summary},
            "examples_trained": trained, "data_stats": stats, "trainable_params": summary["trainable_params"],
            "precision": summary["precision"], "weights_dtype": summary["weights_dtype"],
            "threads": torch.get_num_threads(), "folder": str(folder)}

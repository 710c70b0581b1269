"""DPO with LoRA: loralab's loop (train.objective=dpo) against TRL's DPOTrainer + PEFT, on the same CPU, the same
pairs and the same micro batches: tokens/s and peak memory, then their ratios.

    python benchmarks/dpo_throughput.py [--steps 20] [--batch 8] [--threads 2] [--model smollm2-135m]

Both sides: SmolLM2-135M (fp32 weights: the precision loralab's auto picks on a CPU without fast bf16; pass
--precision bf16 on one with it), LoRA r=16 alpha=32 on every linear layer, no dropout, AdamW lr 5e-4, beta 0.1,
the sigmoid loss, the reference being the base with the adapter off (TRL: it creates the adapter from a
peft_config, so `use_adapter(None)` disables it; no ref_model copy). The data: the generated near-miss arithmetic
pairs (data/preference_tasks.py, 2da + 2ds), fed to TRL in the order loralab's loop draws its micro batches
(sequential sampler), as text records (prompt / chosen / rejected): TRL appends EOS as loralab's raw template does.
Each side runs in its own process (its peak is its own), measured with loralab.memory.measure.PeakMemory around
the training loop alone; tokens are the non-padding input tokens of both rows of every pair (the reference
forward's are not counted again); tokens/s excludes the first step (warm-up).
A number from this script is only meaningful on a quiet machine: say the CPU flags beside it
(`grep -o -w 'avx512_bf16\\|amx_bf16\\|avx2' /proc/cpuinfo | sort -u`).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TASKS = ["2da", "2ds"]
LORA = dict(r=16, alpha=32)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _config(args, out: str):
    from loralab.config import load_config

    return load_config(None, [
        f"model.name={args.model}", f"data.tasks=[{', '.join(TASKS)}]", f"data.n_train={args.steps * args.batch}",
        "data.val_fraction=0", "data.template=raw", f"lora.r={LORA['r']}", f"lora.alpha={LORA['alpha']}",
        "lora.dropout=0", "lora.targets=all-linear", "train.objective=dpo", "train.beta=0.1", "train.lr=5e-4",
        "train.scheduler=constant", f"train.batch_size={args.batch}", f"train.max_steps={args.steps}",
        f"train.threads={args.threads}", f"train.precision={args.precision}", "train.progress=false",
        "eval.before=false", "eval.n=1", "eval.test_loss=false", "eval.stop_check=false", "eval.preference=false",
        f"output_dir={out}"])


def _ordered_records(args) -> list[dict]:
    """The pairs as loralab's loop draws them (its micro batches, in order), as TRL's text records."""
    from loralab.data.batching import micro_batch_indices
    from loralab.io.models import load_tokenizer, resolve
    from loralab.prepare import build_datasets, encode_datasets

    cfg = _config(args, tempfile.mkdtemp())
    data = build_datasets(cfg)
    encoded, _, _ = encode_datasets(data, load_tokenizer(resolve(cfg.model.name)), cfg)
    stream = micro_batch_indices(encoded, args.batch, seed=cfg.train.seed)
    order = [i for _ in range(args.steps) for i in next(stream)]
    return [{"prompt": data.train[i].chosen.prompt, "chosen": data.train[i].chosen.response,
             "rejected": data.train[i].rejected.response} for i in order]


def run_loralab(args) -> dict:
    from loralab.pipeline import run_training

    out = tempfile.mkdtemp(prefix="dpo-bench-")
    summary = run_training(_config(args, out), quiet=True)
    steps = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "loss" in s]
    tokens = steps[-1]["tokens"] - steps[0]["tokens"]
    seconds = steps[-1]["elapsed_s"] - steps[0]["elapsed_s"]
    return {"side": "loralab", "tokens_per_s": tokens / seconds, "peak_memory_bytes": summary["peak_memory_bytes"],
            "final_loss": steps[-1]["loss"], "steps": len(steps)}


def run_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from loralab.io.models import load_tokenizer, resolve
    from loralab.memory.measure import PeakMemory
    from peft import LoraConfig

    torch.set_num_threads(args.threads)
    records = _ordered_records(args)
    folder = resolve(args.model)
    tok = load_tokenizer(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    marks, tokens = [], []

    class Record(TrainerCallback):
        def on_step_end(self, *a, **k):
            marks.append(time.perf_counter())

    dpo = DPOConfig(output_dir=tempfile.mkdtemp(), report_to="none", use_cpu=True, bf16=args.precision == "bf16",
                    per_device_train_batch_size=args.batch, max_steps=args.steps, learning_rate=5e-4,
                    lr_scheduler_type="constant", beta=0.1, loss_type=["sigmoid"], max_length=None,
                    train_sampling_strategy="sequential", logging_steps=1, save_strategy="no",
                    dataloader_num_workers=0, gradient_checkpointing=False)
    trainer = DPOTrainer(model=model, args=dpo, train_dataset=Dataset.from_list(records), processing_class=tok,
                         peft_config=LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                                                target_modules=TARGETS),
                         callbacks=[Record()])
    collate = trainer.data_collator
    trainer.data_collator = lambda rows: (lambda b: tokens.append(int(b["attention_mask"].sum())) or b)(collate(rows))
    t0 = time.perf_counter()
    with PeakMemory("cpu") as peak:
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"side": "trl", "tokens_per_s": sum(tokens[1:args.steps]) / (marks[-1] - marks[0]),
            "peak_memory_bytes": peak.result()["peak_memory_bytes"], "final_loss": losses[-1] if losses else None,
            "steps": len(marks), "wall_s": time.perf_counter() - t0}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=8, help="pairs per micro batch (two rows each)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--worker", choices=("loralab", "trl"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps((run_loralab if args.worker == "loralab" else run_trl)(args)))
        return
    results = {}
    for side in ("loralab", "trl"):
        cmd = [sys.executable, __file__, "--worker", side, *(argv if argv is not None else sys.argv[1:])]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[side] = json.loads(done.stdout.strip().splitlines()[-1])
    ours, theirs = results["loralab"], results["trl"]
    print(json.dumps(results, indent=2))
    print(f"loralab / TRL: tokens/s x{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}, "
          f"peak memory x{ours['peak_memory_bytes'] / theirs['peak_memory_bytes']:.2f} "
          f"({args.steps} steps of {args.batch} pairs, {args.threads} threads, {args.precision})")


if __name__ == "__main__":
    main()

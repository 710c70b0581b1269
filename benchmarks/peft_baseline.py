"""The throughput benchmark's baseline sides: the Hugging Face stack as a careful user sets it up on
this CPU. Each runs in its own process (throughput.py's `--worker baseline`); `spec["variant"]` says which:

  trainer   PEFT's `get_peft_model` + transformers' `Trainer` with a padding collator
            (DataCollatorForSeq2Seq), fed the very micro batches loralab draws, in the same order
            (train_sampling_strategy="sequential"): the loss curves then differ only by implementation.
  grouped   the same with transformers' length-grouped sampler (train_sampling_strategy=
            "group_by_length", the former `group_by_length=True`): less padding, its own batch order.
  sft       TRL's `SFTTrainer` with packing (best-fit-decreasing into rows of `max_length`,
            padding-free: one flattened row with restarting position ids per step), its fused
            chunked LM head and a LoRA `peft_config`. Rows are as long as one loralab step's tokens
            (batch 1), so steps and tokens per step match loralab's; gradient checkpointing off (TRL
            turns it on by default: it trades ~30% speed for memory, and this side is the fast one).

Precision as a careful user picks it on this CPU (`spec["precision"]`, resolved by throughput.py:
bf16 only where the CPU has bf16 matmuls faster than fp32's, `loralab.train.precision.cpu_has_fast_bf16`): bf16 means
`bf16=True` (bf16 autocast over fp32 weights, the textbook mixed precision; `--baseline-weights bf16`
loads bf16 weights instead), fp32 means `bf16=False`: on a CPU without bf16, autocast makes torch
emulate it, many times slower than fp32.
"""
from __future__ import annotations

import math
import tempfile
import time

from workload import LORA, MODEL, encoded_data, trained_batches

VARIANTS = ("trainer", "grouped", "sft")


def _recorder(log: list, marks: dict):
    from transformers import TrainerCallback

    class Record(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            marks["begin"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            marks["steps"].append(time.perf_counter())

        def on_train_end(self, args, state, control, **kw):
            marks["end"] = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                log.append({"step": state.global_step, "loss": logs["loss"]})

    return Record()


def _packed_examples(batch) -> list[tuple[int, int]]:
    """(tokens, labelled positions) of each example in a padding-free packed batch (TRL's collator:
    one row, position ids restarting at 0 per example, the first label of each example masked)."""
    pos = batch["position_ids"][0].tolist()
    labels = batch["labels"][0].tolist()
    starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
    return [(b - a, sum(1 for x in labels[a:b] if x != -100)) for a, b in zip(starts, starts[1:]) if b > a]


def worker_baseline(spec: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from loralab.io.models import load_tokenizer, resolve
    from loralab.memory.measure import PeakMemory
    from peft import LoraConfig

    variant = spec.get("variant", "trainer")
    if variant not in VARIANTS:
        raise SystemExit(f"unknown baseline variant {variant!r}; one of {', '.join(VARIANTS)}")
    hf_logging.set_verbosity_error()
    torch.manual_seed(spec["seed"])
    t0 = time.perf_counter()
    folder = resolve(spec.get("model", MODEL))  # gpu_check's --tiny mode gives a tiny model folder
    tok = load_tokenizer(folder)
    dtype = torch.bfloat16 if spec["baseline_weights"] == "bf16" else torch.float32
    bf16 = spec["precision"] == "bf16"
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules="all-linear", task_type="CAUSAL_LM")
    enc, stats = encoded_data(tok, spec["examples"], spec["seed"])
    # The very micro batches loralab's loop draws (data.batching.micro_batch_indices), in its order
    # (train_sampling_strategy=sequential keeps it for `trainer`; the others reorder the same examples).
    n_micro = spec["steps"] * spec["grad_accum"]
    order = [i for idx in trained_batches(enc, spec["batch"], spec["seed"], n_micro) for i in idx]
    rows = [{"input_ids": enc[i].input_ids, "attention_mask": [1] * len(enc[i].input_ids),
             "labels": enc[i].labels} for i in order]

    seen: list[list[tuple[int, int]]] = []   # per micro batch: (tokens, labelled positions) of each example
    counts: list[tuple[int, int]] = []       # per micro batch: (real tokens, computed positions)
    log: list[dict] = []
    marks: dict = {"steps": []}
    out_dir = tempfile.mkdtemp(prefix="throughput-baseline-")
    common = dict(output_dir=out_dir, gradient_accumulation_steps=spec["grad_accum"], learning_rate=spec["lr"],
                  warmup_steps=spec["warmup"], lr_scheduler_type="cosine", weight_decay=0.0, max_grad_norm=1.0,
                  bf16=bf16, use_cpu=not torch.cuda.is_available(), logging_steps=1, report_to=[],
                  save_strategy="no", eval_strategy="no", dataloader_num_workers=0, seed=spec["seed"],
                  disable_tqdm=True)

    if variant == "sft":
        trainer, how = _sft_trainer(spec, model, tok, lora, rows, common)
        inner = trainer.data_collator

        def collator(features):  # counts what the packed batch holds; collates exactly as TRL's own
            batch = inner(features)
            n = batch["input_ids"].numel()
            counts.append((n, n))
            seen.append(_packed_examples(batch))
            return batch

        trainer.data_collator = collator
    else:
        from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

        from peft import get_peft_model

        model = get_peft_model(model, lora)
        inner = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)

        def collator(features):  # counts real tokens and computed positions; pads exactly as `inner`
            batch = inner(features)
            counts.append((int(batch["attention_mask"].sum()), batch["input_ids"].numel()))
            seen.append([(len(f["input_ids"]), sum(1 for x in f["labels"][1:] if x != -100)) for f in features])
            return batch

        strategy = "sequential" if variant == "trainer" else "group_by_length"
        args = TrainingArguments(per_device_train_batch_size=spec["batch"], max_steps=spec["steps"],
                                 remove_unused_columns=False, train_sampling_strategy=strategy, **common)
        trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collator)
        how = f"PEFT get_peft_model + Trainer (train_sampling_strategy={strategy}"
    trainer.add_callback(_recorder(log, marks))
    load_s = time.perf_counter() - t0

    cpu0 = time.process_time()
    with PeakMemory("cpu" if not torch.cuda.is_available() else "cuda") as peak:
        trainer.train()
    cpu_s = time.process_time() - cpu0
    n_steps = len(marks["steps"])
    n_micro = n_steps * spec["grad_accum"]  # the dataloader may fetch one batch ahead: count what trained
    tokens = sum(c[0] for c in counts[:n_micro])
    runtime = marks["end"] - marks["begin"]
    step_ends = [marks["begin"]] + marks["steps"]
    precision = "bf16 autocast" if bf16 else "fp32"
    return {"side": spec["name"], "how": f"{how}, bf16={bf16}, {spec['baseline_weights']} weights)",
            "variant": variant, "load_s": load_s, "runtime_s": runtime, "cpu_s": cpu_s, "steps": n_steps,
            "tokens": tokens, "slots": sum(c[1] for c in counts[:n_micro]), "tokens_per_s": tokens / runtime,
            "step_times_s": [b - a for a, b in zip(step_ends, step_ends[1:])],
            "losses": [r["loss"] for r in log], **peak.result(),
            "examples_trained": [x for b in seen[:n_micro] for x in b], "data_stats": stats,
            "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
            "precision": precision, "weights_dtype": str(dtype).replace("torch.", ""),
            "threads": torch.get_num_threads(), "folder": str(folder)}


def _sft_trainer(spec: dict, model, tok, lora, rows: list[dict], common: dict):
    """TRL's SFTTrainer with packing on the same examples, already tokenized with their loss masks
    (input_ids + labels: TRL keeps a given `labels` column and packs it along)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tokens = sum(len(r["input_ids"]) for r in rows)
    longest = max(len(r["input_ids"]) for r in rows)
    # one packed row per optimizer step, as many tokens as a loralab step holds on average
    max_length = max(longest, math.ceil(tokens / spec["steps"]))
    data = Dataset.from_list([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows])
    args = SFTConfig(per_device_train_batch_size=1, num_train_epochs=1, packing=True, packing_strategy="bfd",
                     max_length=max_length, gradient_checkpointing=False, dataset_num_proc=None,
                     use_liger_kernel=bool(spec.get("liger")), **common)  # gpu_check: where liger_kernel imports
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=lora)
    return trainer, f"TRL SFTTrainer (packing=True bfd, max_length={max_length}, batch 1, padding-free"

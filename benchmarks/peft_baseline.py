"""The throughput benchmark's baseline side: PEFT's LoRA + transformers' Trainer, configured as a
careful user would (bf16=True, a padding collator), fed the very micro batches loralab draws, in the
same order. Runs in its own process (throughput.py's `--worker baseline`)."""
from __future__ import annotations

import tempfile
import time

from workload import LORA, MODEL, encoded_data, trained_batches


def worker_baseline(spec: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments
    from transformers.utils import logging as hf_logging

    from loralab.io.models import load_tokenizer, resolve
    from loralab.memory.measure import PeakMemory
    from peft import LoraConfig, get_peft_model

    hf_logging.set_verbosity_error()
    torch.manual_seed(spec["seed"])
    t0 = time.perf_counter()
    folder = resolve(MODEL)
    tok = load_tokenizer(folder)
    dtype = torch.bfloat16 if spec["baseline_weights"] == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    enc, stats = encoded_data(tok, spec["examples"], spec["seed"])
    # The very micro batches loralab's loop draws (data.batching.micro_batch_indices), in its order
    # (train_sampling_strategy=sequential keeps it): the two loss curves then differ only by the
    # implementations, not by the data order.
    n_micro = spec["steps"] * spec["grad_accum"]
    order = [i for idx in trained_batches(enc, spec["batch"], spec["seed"], n_micro) for i in idx]
    dataset = [{"input_ids": enc[i].input_ids, "attention_mask": [1] * len(enc[i].input_ids),
                "labels": enc[i].labels} for i in order]
    load_s = time.perf_counter() - t0

    inner = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    seen: list[list[tuple[int, int]]] = []
    counts: list[tuple[int, int]] = []

    def collator(features):  # counts real tokens and computed positions; pads exactly as `inner`
        batch = inner(features)
        counts.append((int(batch["attention_mask"].sum()), batch["input_ids"].numel()))
        seen.append([(len(f["input_ids"]), sum(1 for x in f["labels"][1:] if x != -100)) for f in features])
        return batch

    log: list[dict] = []
    marks: dict = {"steps": []}

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

    out_dir = tempfile.mkdtemp(prefix="throughput-baseline-")
    args = TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=spec["batch"], gradient_accumulation_steps=spec["grad_accum"],
        max_steps=spec["steps"], learning_rate=spec["lr"], warmup_steps=spec["warmup"], lr_scheduler_type="cosine",
        weight_decay=0.0, max_grad_norm=1.0, bf16=True, use_cpu=not torch.cuda.is_available(), logging_steps=1,
        report_to=[], save_strategy="no", eval_strategy="no", dataloader_num_workers=0, seed=spec["seed"],
        disable_tqdm=True, remove_unused_columns=False, train_sampling_strategy="sequential")
    cpu0 = time.process_time()
    with PeakMemory("cpu" if not torch.cuda.is_available() else "cuda") as peak:
        trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                          callbacks=[Record()])
        trainer.train()
    cpu_s = time.process_time() - cpu0
    tokens = sum(c[0] for c in counts[:n_micro])  # the dataloader may fetch one batch ahead
    runtime = marks["end"] - marks["begin"]
    step_ends = [marks["begin"]] + marks["steps"]
    return {"side": "baseline", "how": f"PEFT get_peft_model + Trainer (bf16=True, {spec['baseline_weights']} weights)",
            "load_s": load_s, "runtime_s": runtime, "cpu_s": cpu_s, "steps": len(marks["steps"]), "tokens": tokens,
            "slots": sum(c[1] for c in counts[:n_micro]), "tokens_per_s": tokens / runtime,
            "step_times_s": [b - a for a, b in zip(step_ends, step_ends[1:])],
            "losses": [r["loss"] for r in log], **peak.result(),
            "examples_trained": [x for b in seen[:n_micro] for x in b], "data_stats": stats,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "precision": "bf16 autocast", "weights_dtype": str(dtype).replace("torch.", ""),
            "threads": torch.get_num_threads(), "folder": str(folder)}

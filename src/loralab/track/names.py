"""The metric names users know from other trainers, made from loralab's own records, in one place.

  train/loss, train/lr, train/grad_norm, train/tokens_per_s, train/tokens   every step
  eval/loss, eval/ppl, eval/<task>/accuracy                                   each validation / task eval
  train/peak_memory_gb, train/runtime_s, eval/<task>/accuracy_before, ...    once, from the summary
  (eval/<task>/accuracy is logged at step 0 before training and at the last step after it)
Hyper-parameters are the resolved config flattened to `section.key` names (`lora.r`, `train.lr`).
"""
from __future__ import annotations

import json


def step_metrics(record: dict) -> dict[str, float]:
    """A loop record (a training step, or a validation with optional task accuracies) by those names."""
    out: dict[str, float] = {}
    if "loss" in record:
        out["train/loss"] = record["loss"]
        out["train/lr"] = record["lr"]
        if record.get("grad_norm") is not None:
            out["train/grad_norm"] = record["grad_norm"]
        out["train/tokens"] = record["tokens"]
        if record.get("elapsed_s"):
            out["train/tokens_per_s"] = record["tokens"] / record["elapsed_s"]
    if "val_loss" in record:
        out["eval/loss"] = record["val_loss"]
        out["eval/ppl"] = record["val_ppl"]
    for key in ("reward_accuracy", "reward_margin", "policy_accuracy"):  # a preference objective's steps
        if key in record:
            out[f"train/{key}"] = record[key]
    for task, accuracy in (record.get("accuracy") or {}).items():
        out[f"eval/{task}/accuracy"] = accuracy
    return {k: float(v) for k, v in out.items()}


def eval_metrics(results: dict) -> dict[str, float]:
    """Task evaluation results (task -> {"accuracy": ...}) by name."""
    return {f"eval/{task}/accuracy": float(r["accuracy"]) for task, r in results.items()}


def summary_metrics(summary: dict) -> dict[str, float]:
    """The run's final numbers, from summary.json's dict."""
    # (tokens/s and accuracy after training are already the last step's train/tokens_per_s and eval/<task>/accuracy)
    out = {"train/runtime_s": summary.get("runtime_s"), "train/final_loss": summary.get("final_train_loss"),
           "eval/final_loss": summary.get("final_val_loss"), "train/trainable_params": summary.get("trainable_params")}
    if summary.get("peak_memory_bytes") is not None:
        out["train/peak_memory_gb"] = summary["peak_memory_bytes"] / 1e9
    for task, r in (summary.get("eval") or {}).items():
        out[f"eval/{task}/accuracy_before"] = r["before"]
    for name, r in (summary.get("preference") or {}).items():  # held-out preference pairs (eval/preference.py)
        out[f"eval/{name}/preference_accuracy"] = r["after"]["accuracy"]
        out[f"eval/{name}/reward_margin"] = r["after"]["reward_margin"]
    stops = summary.get("stops")
    if stops and stops["n"]:
        out["eval/stopped_on_eos"] = stops["stopped"] / stops["n"]
    return {k: float(v) for k, v in out.items() if v is not None}


def flat_params(config: dict, prefix: str = "") -> dict[str, str | int | float | bool]:
    """The nested config as `section.key` -> a plain value (lists, dicts and None as JSON text)."""
    out: dict = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and name.count(".") == 0:
            out.update(flat_params(value, name + "."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = json.dumps(value)
    return out

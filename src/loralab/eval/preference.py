"""Held-out preference accuracy: how often the model scores the chosen answer above the rejected one.

Per held-out pair, with the summed log-probabilities of each answer (train/preference.py's scores):
  accuracy        log π(chosen) > log π(rejected), the model as it is (the base before training)
  reward_margin   β · ((log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r))), the reference being the base
                  (LoRA switched off): DPO's implicit reward of chosen over rejected (0 for the base itself)
  reward_accuracy that margin > 0 (TRL's rewards/accuracies)
The held-out pairs: a generated task's held-out questions as pairs (data/preference_tasks.py), which exact
match also scores; for a preference file, its validation split. On by default for dpo / orpo runs;
`eval.preference: true` adds it to an SFT run (the preference study compares them).
"""
from __future__ import annotations

import torch

from ..data.preference import collate_pairs, encode_pairs
from ..data.preference_tasks import held_out_pairs
from ..data.tasks import TASKS
from ..peft.lora import lora_disabled, lora_modules, zero_updates_skipped
from ..train.preference import sequence_logps


def wanted(cfg) -> bool:
    """cfg: the RunConfig."""
    return cfg.eval.preference if cfg.eval.preference is not None else cfg.train.objective != "sft"


def held_out(data, cfg) -> dict[str, list]:
    """name -> held-out PreferencePairs: each generated arithmetic task's, and a preference file's validation."""
    out = {name: held_out_pairs(examples, cfg.data.seed) for name, examples in data.tests.items() if name in TASKS}
    if cfg.data.path and cfg.train.objective != "sft" and data.val:
        out["validation"] = data.val
    return out


@torch.no_grad()
def preference_metrics(model, encoded: list, *, beta: float, batch_size: int, pad_id: int) -> dict:
    """accuracy, reward_accuracy, reward_margin (means over the pairs), and n, for encoded pairs."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums = {"accuracy": 0.0, "reward_accuracy": 0.0, "reward_margin": 0.0}
    for i in range(0, len(encoded), batch_size):
        part = encoded[i:i + batch_size]
        n = len(part)
        batch = {k: v.to(device) for k, v in collate_pairs(part, pad_id).items()}
        with zero_updates_skipped(model):  # before training: no LoRA matmuls, and the reference is the model
            policy, _ = sequence_logps(model, batch)
            same = all(m.merged for _, m in lora_modules(model))
        if same:
            ref = policy
        else:
            with lora_disabled(model):
                ref, _ = sequence_logps(model, batch)
        margin = beta * ((policy[:n] - ref[:n]) - (policy[n:] - ref[n:]))
        sums["accuracy"] += float((policy[:n] > policy[n:]).sum())
        sums["reward_accuracy"] += float((margin > 0).sum())
        sums["reward_margin"] += float(margin.sum())
    model.train(was_training)
    return {**{k: v / max(len(encoded), 1) for k, v in sums.items()}, "n": len(encoded)}


def evaluate(model, tok, data, cfg) -> dict:
    """name -> preference_metrics over its held-out pairs ({} when not wanted)."""
    if not wanted(cfg):
        return {}
    kw = dict(template=cfg.data.template, system_prompt=cfg.data.system_prompt, max_seq_len=cfg.data.max_seq_len)
    out = {}
    for name, pairs in held_out(data, cfg).items():
        encoded = encode_pairs(pairs, tok, **kw)[0] if pairs else []
        if encoded:
            out[name] = preference_metrics(model, encoded, beta=cfg.train.beta, batch_size=cfg.eval.batch_size,
                                           pad_id=tok.pad_token_id)
    return out


def summary_part(before: dict, after: dict) -> dict:
    """summary.json's "preference": per held-out set, the metrics before and after training."""
    return {name: {"before": before.get(name), "after": r} for name, r in after.items()}


def table_lines(summary: dict) -> list[str]:
    """The printed table's preference rows: accuracy before -> after, and the reward margin after."""
    part = summary.get("preference") or {}
    if not part:
        return []
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"
    width = max(6, *map(len, part))
    lines = ["", f"  {'pairs':<{width}}  before    after   change   reward margin, accuracy (held-out preference)"]
    for name, r in part.items():
        b, a = (r["before"] or {}).get("accuracy"), r["after"]["accuracy"]
        change = "" if b is None else f"{100 * (a - b):+.1f} pts"
        lines.append(f"  {name:<{width}} {pct(b):>7} {pct(a):>8}   {change:>8}   "
                     f"{r['after']['reward_margin']:+.3f}, {pct(r['after']['reward_accuracy'])}")
    return lines

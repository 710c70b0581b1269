"""A training run: config -> model + adapters -> data -> the loop -> artifacts (and a printed table).

`loralab train`, studies and benchmarks call `run_training`; it owns the files, the loop does not.
Output directory layout:
  config.yaml      the resolved config
  metrics.jsonl    one line per step (step, loss, lr, tokens, elapsed_s) and per validation
  adapter/         PEFT format (adapter_config.json + adapter_model.safetensors)
  summary.json     runtime, tokens/s, peak memory, parameters, losses, eval before/after
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint
from . import lora as lora_lib
from .adapters import save_adapter
from .config import RunConfig, dump_yaml
from .data.batching import split_validation
from .data.formats import load_examples
from .data.prompts import encode_all
from .data.tasks import make_task
from .errors import UserError
from .estimate import run_memory_breakdown
from .evaluate import exact_match
from .fileio import atomic_write_text, write_json
from .memory import PeakMemory, fmt_bytes
from .models import base_model_path, load_model
from .train import Hooks, NonFiniteLoss, plan_steps, set_seed, snapshot, train
from .signals import StopFlag

stop_flag = StopFlag()


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' picks bf16 where the hardware has fast bf16 matmuls (CUDA sm80+, CPUs with AMX/AVX512-BF16)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    return "bf16" if ("amx_bf16" in flags or "avx512_bf16" in flags) else "fp32"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def prepare_output_dir(path: str) -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UserError(f"config key 'output_dir': {out} exists and is a file")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"config key 'output_dir': cannot create {out} ({e.strerror})") from None
    return out


@dataclass
class Datasets:
    train: list          # Example
    val: list            # Example
    tests: dict          # task name -> list[Example] (held-out, exact match)


def build_datasets(cfg: RunConfig) -> Datasets:
    d = cfg.data
    eval_tasks = cfg.eval.tasks if cfg.eval.tasks is not None else ([] if d.path else list(d.tasks))
    tests = {}
    if d.path:
        examples = load_examples(d.path)
    else:
        examples = []
        for name in d.tasks:
            train_set, test_set = make_task(name, d.n_train, cfg.eval.n, d.seed)
            examples += train_set
            tests[name] = test_set
    for name in eval_tasks:
        if name not in tests:
            tests[name] = make_task(name, 1, cfg.eval.n, d.seed)[1]
    train_set, val_set = split_validation(examples, d.val_fraction, d.seed)
    return Datasets(train_set, val_set, {k: tests[k] for k in eval_tasks})


def setup_model(cfg: RunConfig, device: torch.device):
    """Load the base, optionally quantize it, and choose what trains. Returns (model, tok, folder, info)."""
    precision = resolve_precision(cfg.train.precision, device)
    full = cfg.train.method == "full"
    # LoRA keeps frozen weights in bf16 (no per-step casts); full fine-tuning keeps fp32 masters.
    dtype = torch.bfloat16 if precision == "bf16" and not full else torch.float32
    model, tok, folder = load_model(cfg.model.name, dtype, trust_remote_code=cfg.model.trust_remote_code,
                                    device=device, attn_implementation=cfg.model.attn_implementation)
    info = {"precision": precision, "weights_dtype": str(dtype).replace("torch.", "")}
    if full:
        if cfg.model.quant != "none":
            raise UserError("config key 'model.quant': a quantized base cannot be fully fine-tuned (use lora)")
        model.requires_grad_(True)
        info["targets"] = []
    else:
        targets = lora_lib.resolve_targets(model, cfg.lora.targets)
        if cfg.model.quant == "nf4":
            from .quant import quantize_model

            info["quantized_modules"] = quantize_model(model, None if cfg.model.quant_all_linear else targets,
                                                       compute_dtype=dtype)
        info["targets"] = lora_lib.inject(model, targets, r=cfg.lora.r, alpha=cfg.lora_alpha,
                                          dropout=cfg.lora.dropout)
    trainable, total = lora_lib.count_parameters(model)
    info.update(trainable_params=trainable, total_params=total)
    return model, tok, folder, info


def find_resume(cfg: RunConfig, out: Path) -> dict | None:
    """The checkpoint to continue from, per `resume` (auto / true / false), or None to start fresh."""
    last = checkpoint.latest(out / "checkpoints")
    if cfg.resume is False:
        return None
    if last is None:
        if cfg.resume is True:
            raise UserError(f"config key 'resume': no checkpoint in {out / 'checkpoints'}")
        return None
    snap = checkpoint.load(last)
    diff = checkpoint.config_difference(snap["config"], cfg.to_dict())
    if diff:
        raise UserError(f"{last}: checkpoint of a different config ({diff}); use another output_dir, "
                        "or resume=false to start over")
    return snap


SMALL_DATASET = 10_000  # examples: below this, repeated epochs over the same data tend to overfit


def planned_epochs(n_examples: int, cfg: RunConfig) -> float:
    """Passes over the training set the run's planned steps make."""
    return plan_steps(n_examples, cfg.train) * cfg.train.batch_size * cfg.train.grad_accum / max(n_examples, 1)


def epoch_warnings(n_examples: int, cfg: RunConfig) -> list[str]:
    """The article's finding: more than one epoch over a small static dataset made results worse."""
    epochs = planned_epochs(n_examples, cfg)
    one_step = cfg.train.batch_size * cfg.train.grad_accum / max(n_examples, 1)  # of an epoch
    # one partial last batch (rounding up to whole steps) is not a second epoch
    if epochs <= 1.0 + one_step or n_examples >= SMALL_DATASET:
        return []
    guard = "" if cfg.train.eval_every else "; set train.eval_every (and train.early_stopping_patience) to watch it"
    return [f"{epochs:.1f} epochs over {n_examples:,} static examples: multi-epoch training on a small "
            f"dataset tends to overfit (validation loss rises){guard}"]


def _truncate_metrics(path: Path, step: int) -> None:
    if not path.exists():
        return
    keep = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l).get("step", 0) <= step]
    atomic_write_text(path, "".join(l + "\n" for l in keep))


def run_evals(model, tok, tests: dict, cfg: RunConfig) -> dict:
    return {name: exact_match(model, tok, examples, template=cfg.data.template, system_prompt=cfg.data.system_prompt,
                              batch_size=cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens)
            for name, examples in tests.items()}


def run_training(cfg: RunConfig, *, quiet: bool = False) -> dict:
    """Run one configured fine-tune end to end and write its artifacts. Returns the summary dict."""
    out = prepare_output_dir(cfg.output_dir)
    log = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr))
    device = default_device()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    set_seed(cfg.train.seed)
    data = build_datasets(cfg)  # before the model: bad data fails fast
    model, tok, folder, info = setup_model(cfg, device)
    cfg.train.precision = info["precision"]
    enc_kw = dict(template=cfg.data.template, system_prompt=cfg.data.system_prompt, max_seq_len=cfg.data.max_seq_len)
    train_enc, train_stats = encode_all(data.train, tok, **enc_kw)
    val_enc = encode_all(data.val, tok, **enc_kw)[0] if data.val else []
    resume = find_resume(cfg, out)  # the config is resolved (precision) as it was when saved
    # Progress lines only once every input check has passed: bad input gets its error line alone.
    log(f"loralab: {cfg.model.name}: {info['trainable_params']:,} trainable of {info['total_params']:,} parameters"
        f" ({len(info['targets'])} LoRA modules), weights {info['weights_dtype']}")
    log(f"loralab: {len(train_enc):,} training examples ({train_stats['n_truncated']} truncated, "
        f"{train_stats['n_dropped']} dropped, {train_stats['n_tokens']:,} tokens), {len(val_enc):,} validation")
    warnings = epoch_warnings(len(train_enc), cfg)
    for w in warnings:
        log(f"loralab: warning: {w}")
    cfg_dict = cfg.to_dict()
    atomic_write_text(out / "config.yaml", dump_yaml(cfg))
    before_path = out / "eval_before.json"
    if resume is not None:
        checkpoint.restore_trainable(model, resume["trainable"], resume["path"])
        _truncate_metrics(out / "metrics.jsonl", resume["step"])  # drop lines after the checkpoint
        log(f"loralab: resuming from {resume['path']} (step {resume['step']})")
    if resume is not None and before_path.exists():
        before = json.loads(before_path.read_text())
    elif cfg.eval.before and data.tests:
        log("loralab: evaluating the base model...")
        before = run_evals(model, tok, data.tests, cfg)
        write_json(before_path, before)
    else:
        before = {}
    adapter_args = dict(base_model_name_or_path=base_model_path(cfg.model.name, folder), r=cfg.lora.r,
                        alpha=cfg.lora_alpha, dropout=cfg.lora.dropout, target_modules=info["targets"])
    metrics = open(out / "metrics.jsonl", "a" if resume is not None else "w")

    def write_metric(record: dict):
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()

    def on_eval(record: dict):
        if cfg.train.eval_every and data.tests:  # task accuracy beside the validation loss
            record["accuracy"] = {name: r["accuracy"] for name, r in run_evals(model, tok, data.tests, cfg).items()}
        write_metric(record)
        if record.get("is_best") and cfg.train.method == "lora" and cfg.train.eval_every:
            save_adapter(model, out / "best_adapter", **adapter_args)

    def on_checkpoint(state):
        checkpoint.save(out / "checkpoints", snapshot(state), cfg_dict, keep=cfg.train.keep_checkpoints)

    hooks = Hooks(on_log=write_metric, on_eval=on_eval, on_checkpoint=on_checkpoint, should_stop=stop_flag.is_set)
    try:
        with PeakMemory(device) as peak, stop_flag.installed():
            result = train(model, train_enc, cfg.train, pad_id=tok.pad_token_id, val_data=val_enc, hooks=hooks,
                           resume=resume)
    except NonFiniteLoss as e:
        last = checkpoint.latest(out / "checkpoints")
        raise UserError(f"non-finite {e.what} at step {e.step}; last good checkpoint: {last or 'none'} "
                        "(set train.skip_nonfinite=true to skip such batches)") from None
    finally:
        metrics.close()
    if result.interrupted:
        raise UserError(f"interrupted at step {result.steps}; checkpoint saved in {out / 'checkpoints'}; "
                        f"run the same command again to resume")

    after = run_evals(model, tok, data.tests, cfg) if data.tests else {}
    adapter_dir = out / "adapter"
    if cfg.train.method == "lora":
        save_adapter(model, adapter_dir, **adapter_args)
    summary = {
        "model": cfg.model.name,
        "method": "qlora" if cfg.model.quant == "nf4" else cfg.train.method,
        "device": str(device),
        "precision": info["precision"],
        "steps": result.steps,
        "train_examples": len(train_enc),
        "truncated_examples": train_stats["n_truncated"],
        "dropped_examples": train_stats["n_dropped"],
        "runtime_s": round(result.runtime_s, 3),
        "train_tokens": result.train_tokens,
        "tokens_per_s": round(result.tokens_per_s, 2),
        **peak.result(),
        # what the analytic model (loralab.estimate) attributes the peak to, for the longest example
        "memory_breakdown": run_memory_breakdown(cfg, folder, device, seq=max(len(e.input_ids) for e in train_enc)),
        "trainable_params": info["trainable_params"],
        "total_params": info["total_params"],
        "final_train_loss": result.final_train_loss,
        "final_val_loss": result.final_val_loss,
        "val_history": result.val_history,
        "skipped_steps": result.skipped_steps,
        "epochs": round(planned_epochs(len(train_enc), cfg), 3),
        "warnings": warnings,
        "stopped_early": result.stopped_early,
        "best_val_loss": min((v["val_loss"] for v in result.val_history), default=None),
        "best_step": min(result.val_history, key=lambda v: v["val_loss"])["step"] if result.val_history else None,
        "best_adapter_dir": str(out / "best_adapter") if (out / "best_adapter").is_dir() else None,
        "eval": {name: {"before": before[name]["accuracy"] if name in before else None,
                        "after": after[name]["accuracy"], "n": after[name]["n"]} for name in after},
        "eval_samples": {name: r["samples"] for name, r in after.items()},
        "adapter_dir": str(adapter_dir) if cfg.train.method == "lora" else None,
    }
    write_json(out / "summary.json", summary)
    return summary


def _breakdown_lines(parts: dict | None) -> list[str]:
    if not parts:
        return []
    names = ("frozen_weights", "trainable_weights", "gradients", "optimizer_state", "activations", "other")
    return [f"    estimated     {fmt_bytes(parts['estimated_peak_bytes'])}: "
            + ", ".join(f"{n.replace('_', ' ')} {fmt_bytes(parts[n])}" for n in names[:3]),
            "                  " + ", ".join(f"{n.replace('_', ' ')} {fmt_bytes(parts[n])}" for n in names[3:])]


def format_table(summary: dict, cfg: RunConfig) -> str:
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"
    lines = [
        f"loralab run -> {cfg.output_dir}",
        f"  model           {summary['model']} ({summary['method']}, {summary['precision']}, {summary['device']})",
        f"  LoRA            r={cfg.lora.r} alpha={cfg.lora_alpha:g} targets={cfg.lora.targets}"
        if summary["method"] != "full" else "  method          full fine-tuning",
        f"  trainable       {summary['trainable_params']:,} / {summary['total_params']:,} params "
        f"({100 * summary['trainable_params'] / summary['total_params']:.2f}%)",
        f"  steps           {summary['steps']} ({summary['train_examples']:,} examples, "
        f"batch {cfg.train.batch_size}x{cfg.train.grad_accum})",
        f"  runtime         {summary['runtime_s']:.1f} s (training loop)",
        f"  tokens/s        {summary['tokens_per_s']:,.0f}",
        f"  peak memory     {fmt_bytes(summary['peak_memory_bytes'])} ({summary['memory_method']})",
        *_breakdown_lines(summary.get("memory_breakdown")),
        f"  loss            train {summary['final_train_loss']:.4f}, val "
        + ("-" if summary["final_val_loss"] is None else f"{summary['final_val_loss']:.4f}"),
    ]
    if summary["eval"]:
        lines += ["", "  task    before    after   change (exact match, held-out)"]
        for name, r in summary["eval"].items():
            change = "" if r["before"] is None else f"{100 * (r['after'] - r['before']):+.1f} pts"
            lines.append(f"  {name:<6} {pct(r['before']):>7} {pct(r['after']):>8}   {change}")
    if summary["adapter_dir"]:
        lines += ["", f"  adapter saved to {summary['adapter_dir']} (PEFT format)"]
    return "\n".join(lines)

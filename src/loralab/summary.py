"""What a run reports: the summary dict (summary.json), the printed table, and the multi-epoch warning."""
from __future__ import annotations

from pathlib import Path

from .config import RunConfig
from .data.tasks import expand_tasks
from .eval.forgetting import table_lines as forgetting_lines
from .eval.preference import table_lines as preference_lines
from .memory.measure import fmt_bytes
from .prepare import ModelSetup
from .train.optim import plan_steps
from .train.state import TrainResult

SMALL_DATASET = 10_000  # examples: below this, repeated epochs over the same data tend to overfit
# Below this share of training examples whose learned text ends on a stop token (EOS / end of
# turn), the model mostly learns to keep going: warned about before the run starts.
MIN_STOP_SHARE = 0.5


def global_batch(cfg: RunConfig, world: int = 1) -> int:
    """Examples per optimizer step: micro batch x accumulation x processes."""
    return cfg.train.batch_size * cfg.train.grad_accum * world


def planned_epochs(n_examples: int, cfg: RunConfig, world: int = 1) -> float:
    """Passes over the training set the run's planned steps make."""
    return plan_steps(n_examples, cfg.train, world) * global_batch(cfg, world) / max(n_examples, 1)


def epoch_warnings(n_examples: int, cfg: RunConfig, world: int = 1) -> list[str]:
    """The article's finding: more than one epoch over a small static dataset made results worse."""
    epochs = planned_epochs(n_examples, cfg, world)
    one_step = global_batch(cfg, world) / max(n_examples, 1)  # of an epoch
    # one partial last batch (rounding up to whole steps) is not a second epoch
    if epochs <= 1.0 + one_step or n_examples >= SMALL_DATASET:
        return []
    guard = "" if cfg.train.eval_every else "; set train.eval_every (and train.early_stopping_patience) to watch it"
    return [f"{epochs:.1f} epochs over {n_examples:,} static examples: multi-epoch training on a small "
            f"dataset tends to overfit (validation loss rises){guard}"]


def stop_warnings(train_stats: dict, cfg: RunConfig) -> list[str]:
    """Data that would teach the model never to stop: few targets end on a stop token."""
    n, k = train_stats["n_kept"], train_stats.get("n_end_with_stop", 0)
    if not n or k >= MIN_STOP_SHARE * n:
        return []
    why = (f"{train_stats['n_truncated']:,} were cut by data.max_seq_len={cfg.data.max_seq_len}"
           if train_stats["n_truncated"]
           else "the tokenizer has no EOS token, or the template closes replies without one")
    return [f"only {k:,} of {n:,} training examples end with a learned EOS / end-of-turn token ({why}): "
            f"the model will learn not to stop"]


def build_summary(cfg: RunConfig, *, device, setup: ModelSetup, train_cpu_s: float, result: TrainResult,
                  n_train: int, train_stats: dict, memory: dict, breakdown: dict | None, warnings: list[str],
                  before: dict, after: dict, out: Path, world: int = 1, stops: dict | None = None) -> dict:
    """summary.json: what the run did and cost, its losses, and the held-out accuracy before and after.
    setup: what prepare.setup_model built; train_cpu_s: CPU seconds (all threads) the loop took."""
    lora = cfg.train.method == "lora"
    trained = set() if cfg.data.path else set(expand_tasks(cfg.data.tasks))
    best = min(result.val_history, key=lambda v: v["val_loss"]) if result.val_history else None
    return {
        "model": cfg.model.name,
        "method": "qlora" if cfg.model.quant == "nf4" else cfg.train.method,
        "device": str(device),
        "processes": world,
        "distributed": cfg.train.distributed if world > 1 else None,
        "precision": setup.precision,
        "weights_dtype": setup.weights_dtype,
        "converters": setup.converters,  # the model rewrites applied and declined, with reasons
        "steps": result.steps,
        "train_examples": n_train,
        "truncated_examples": train_stats["n_truncated"],
        "dropped_examples": train_stats["n_dropped"],
        "runtime_s": round(result.runtime_s, 3),
        "train_cpu_s": round(train_cpu_s, 3),  # CPU seconds of all threads: / runtime = cores kept busy
        "train_tokens": result.train_tokens,
        "tokens_per_s": round(result.tokens_per_s, 2),
        **memory,
        # what the analytic model (loralab.memory.estimate) attributes the peak to, for the longest example
        "memory_breakdown": breakdown,
        "trainable_params": setup.trainable_params,
        "total_params": setup.total_params,
        "final_train_loss": result.final_train_loss,
        "final_val_loss": result.final_val_loss,
        "val_history": result.val_history,
        "skipped_steps": result.skipped_steps,
        "epochs": round(planned_epochs(n_train, cfg, world), 3),
        "warnings": warnings,
        "stopped_early": result.stopped_early,
        "best_val_loss": best["val_loss"] if best else None,
        "best_step": best["step"] if best else None,
        "best_adapter_dir": str(out / "best_adapter") if (out / "best_adapter").is_dir() else None,
        # trained: the task's items were in the training data (its test items still held out); false:
        # a task never trained on (the suite's held-out families). test_loss: on the held-out answers.
        "eval": {name: {"before": before[name]["accuracy"] if name in before else None,
                        "after": after[name]["accuracy"], "n": after[name]["n"], "trained": name in trained,
                        "test_loss": after[name].get("test_loss")} for name in after},
        "eval_samples": {name: r["samples"] for name, r in after.items()},
        # held-out generations that ended on EOS / end of turn within the budget (eval/stops.py)
        "stops": stops,
        "adapter_dir": str(out / "adapter") if lora else None,
    }


def _breakdown_lines(parts: dict | None) -> list[str]:
    if not parts:
        return []
    names = ("frozen_weights", "trainable_weights", "gradients", "optimizer_state", "activations", "other")
    return [f"    estimated     {fmt_bytes(parts['estimated_peak_bytes'])}: "
            + ", ".join(f"{n.replace('_', ' ')} {fmt_bytes(parts[n])}" for n in names[:3]),
            "                  " + ", ".join(f"{n.replace('_', ' ')} {fmt_bytes(parts[n])}" for n in names[3:])]


def _layers(cfg: RunConfig) -> str:
    """' layers=10-29' (or a list) when lora.layers picks a subset of the decoder layers."""
    layers = cfg.lora.layers
    if layers is None:
        return ""
    ids = sorted([layers] if isinstance(layers, int) else layers)
    run = len(ids) > 2 and ids == list(range(ids[0], ids[-1] + 1))
    return f" layers={ids[0]}-{ids[-1]}" if run else " layers=" + ",".join(map(str, ids))


def _phase_lines(phases: dict | None) -> list[str]:
    """Where the run's wall time went, the evaluations included (run.py's phases)."""
    if not phases:
        return []
    return ["  wall time       " + ", ".join(f"{name} {s:.0f} s" for name, s in phases.items())]


def format_table(summary: dict, cfg: RunConfig) -> str:
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"
    lines = [
        f"loralab run -> {cfg.output_dir}",
        f"  model           {summary['model']} ({summary['method']}, {summary['precision']}, {summary['device']})",
        f"  LoRA            r={cfg.lora.r} alpha={cfg.lora_alpha:g} targets={cfg.lora.targets}{_layers(cfg)}"
        + (f" + experts {','.join(cfg.lora.target_parameters)}" if cfg.lora.target_parameters else "")
        if summary["method"] != "full" else "  method          full fine-tuning",
        f"  trainable       {summary['trainable_params']:,} / {summary['total_params']:,} params "
        f"({100 * summary['trainable_params'] / summary['total_params']:.2f}%)",
        f"  steps           {summary['steps']} ({summary['train_examples']:,} examples, "
        f"batch {cfg.train.batch_size}x{cfg.train.grad_accum}"
        + (f"x{summary['processes']} processes, {summary['distributed']})" if summary.get("processes", 1) > 1 else ")"),
        f"  runtime         {summary['runtime_s']:.1f} s (training loop)",
        *_phase_lines(summary.get("phase_s")),
        f"  tokens/s        {summary['tokens_per_s']:,.0f}",
        f"  peak memory     {fmt_bytes(summary['peak_memory_bytes'])} ({summary['memory_method']}"
        + (f", malloc: {summary['allocator']}" if summary.get("allocator") else "")
        + (", the largest rank's)" if summary.get("processes", 1) > 1 else ")"),
        *_breakdown_lines(summary.get("memory_breakdown")),
        f"  loss            train {summary['final_train_loss']:.4f}, val "
        + ("-" if summary["final_val_loss"] is None else f"{summary['final_val_loss']:.4f}"),
    ]
    stops = summary.get("stops")
    if stops:
        lines.append(f"  stops on EOS    {stops['stopped']}/{stops['n']} held-out generations "
                     f"({stops['held_out']}; within {stops['budget']})")
    if summary["eval"]:
        width = max(6, *map(len, summary["eval"]))
        lines += ["", f"  {'task':<{width}}  before    after   change (exact match, held-out)"]
        for name, r in summary["eval"].items():
            change = "" if r["before"] is None else f"{100 * (r['after'] - r['before']):+.1f} pts"
            new = "" if r.get("trained", True) else "   (task never trained on)"
            lines.append(f"  {name:<{width}} {pct(r['before']):>7} {pct(r['after']):>8}   {change}{new}")
    lines += forgetting_lines(summary)  # what the run cost other skills (eval/forgetting.py)
    lines += preference_lines(summary)  # held-out preference accuracy (eval/preference.py)
    if summary["adapter_dir"]:
        lines += ["", f"  adapter saved to {summary['adapter_dir']} (PEFT format)"]
    return "\n".join(lines)

"""One training run: config -> model + adapters -> data -> the loop -> artifacts.

`loralab train`, studies (one process per run) and benchmarks call `run_training`; it owns the
files, the loop does not. Output directory layout:
  config.yaml      the resolved config
  metrics.jsonl    one line per step (step, loss, lr, tokens, elapsed_s) and per validation
  adapter/         PEFT format (adapter_config.json + adapter_model.safetensors)
  summary.json     runtime, tokens/s, peak memory, parameters, losses, eval before/after (summary.py)
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import RunConfig, dump_yaml
from .data.batching import split_validation
from .data.formats import load_examples
from .data.prompts import encode_all
from .data.tasks import make_task
from .errors import UserError
from .eval.metrics import exact_match
from .io.fileio import atomic_write_text, write_json
from .io.models import base_model_path, load_model
from .memory.estimate import run_memory_breakdown
from .memory.measure import PeakMemory
from .peft.adapters import save_adapter
from .peft.inject import SpecFor, count_parameters, inject, per_module
from .peft.lora import LoraSpec
from .peft.names import filter_layers
from .peft.targets import resolve_targets
from .summary import build_summary, epoch_warnings
from .train import checkpoint
from .train.loop import Hooks, NonFiniteLoss, train
from .train.precision import default_device, resolve_precision
from .train.signals import StopFlag
from .train.state import set_seed, snapshot

stop_flag = StopFlag()


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


def resolve_config(cfg: RunConfig, device: torch.device) -> RunConfig:
    """A copy of the config with what depends on the machine decided (train.precision: auto), as
    the run records it (config.yaml, checkpoints: a resume on other hardware is refused, not
    silently continued in another precision). The caller's config is left as it was."""
    train_cfg = dataclasses.replace(cfg.train, precision=resolve_precision(cfg.train.precision, device))
    return dataclasses.replace(cfg, train=train_cfg)


def lora_spec(cfg: RunConfig) -> SpecFor:
    """The run's LoRA spec: one LoraSpec, or (with lora.rank_pattern / alpha_pattern) a function
    giving each full module name its own. Checks r, alpha, dropout, init before any model loads."""
    lo = cfg.lora
    spec = LoraSpec(r=lo.r, alpha=cfg.lora_alpha, dropout=lo.dropout, use_rslora=lo.use_rslora,
                    use_dora=lo.use_dora, init=lo.init)
    return per_module(spec, lo.rank_pattern, lo.alpha_pattern)


def setup_model(cfg: RunConfig, device: torch.device):
    """Load the base, optionally quantize it, and choose what trains. Returns (model, tok, folder, info)."""
    precision = resolve_precision(cfg.train.precision, device)
    full = cfg.train.method == "full"
    # LoRA keeps frozen weights in bf16 (no per-step casts); full fine-tuning keeps fp32 masters.
    dtype = torch.bfloat16 if precision == "bf16" and not full else torch.float32
    spec = None if full else lora_spec(cfg)  # checks r, alpha, dropout before the model loads
    model, tok, folder = load_model(cfg.model.name, dtype, trust_remote_code=cfg.model.trust_remote_code,
                                    device=device, attn_implementation=cfg.model.attn_implementation)
    info = {"precision": precision, "weights_dtype": str(dtype).replace("torch.", "")}
    if full:
        if cfg.model.quant != "none":
            raise UserError("config key 'model.quant': a quantized base cannot be fully fine-tuned (use lora)")
        model.requires_grad_(True)
        info["targets"] = []
    else:
        targets = resolve_targets(model, cfg.lora.targets)
        if cfg.lora.layers is not None:
            targets = filter_layers(targets, cfg.lora.layers)
        if cfg.model.quant == "nf4":
            from .peft.quant import quantize_model

            info["quantized_modules"] = quantize_model(model, None if cfg.model.quant_all_linear else targets,
                                                       compute_dtype=dtype)
        info["targets"] = inject(model, targets, spec)
    trainable, total = count_parameters(model)
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


def _truncate_metrics(path: Path, step: int) -> None:
    if not path.exists():
        return
    keep = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l).get("step", 0) <= step]
    atomic_write_text(path, "".join(l + "\n" for l in keep))


def run_evals(model, tok, tests: dict, cfg: RunConfig) -> dict:
    return {name: exact_match(model, tok, examples, template=cfg.data.template, system_prompt=cfg.data.system_prompt,
                              batch_size=cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens)
            for name, examples in tests.items()}


def run_training(cfg: RunConfig, *, quiet: bool = False, data: Datasets | None = None) -> dict:
    """Run one configured fine-tune end to end and write its artifacts. Returns the summary dict.

    `data` replaces the config's data (a benchmark's own workload); by default it is built from
    `cfg.data` before the model loads, so bad data fails fast."""
    out = prepare_output_dir(cfg.output_dir)
    log = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr))
    device = default_device()
    cfg = resolve_config(cfg, device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    set_seed(cfg.train.seed)
    data = data or build_datasets(cfg)
    model, tok, folder, info = setup_model(cfg, device)
    enc_kw = dict(template=cfg.data.template, system_prompt=cfg.data.system_prompt, max_seq_len=cfg.data.max_seq_len)
    train_enc, train_stats = encode_all(data.train, tok, **enc_kw)
    val_enc = encode_all(data.val, tok, **enc_kw)[0] if data.val else []
    resume = find_resume(cfg, out)
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
    base_path = base_model_path(cfg.model.name, folder)
    metrics = open(out / "metrics.jsonl", "a" if resume is not None else "w")

    def write_metric(record: dict):
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()

    def on_eval(record: dict):
        if cfg.train.eval_every and data.tests:  # task accuracy beside the validation loss
            record["accuracy"] = {name: r["accuracy"] for name, r in run_evals(model, tok, data.tests, cfg).items()}
        write_metric(record)
        if record.get("is_best") and cfg.train.method == "lora" and cfg.train.eval_every:
            save_adapter(model, out / "best_adapter", base_model_name_or_path=base_path)

    def on_checkpoint(state):
        checkpoint.save(out / "checkpoints", snapshot(state), cfg_dict, keep=cfg.train.keep_checkpoints)

    hooks = Hooks(on_log=write_metric, on_eval=on_eval, on_checkpoint=on_checkpoint, should_stop=stop_flag.is_set)
    cpu0 = time.process_time()
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
    info["train_cpu_s"] = time.process_time() - cpu0
    if result.interrupted:
        raise UserError(f"interrupted at step {result.steps}; checkpoint saved in {out / 'checkpoints'}; "
                        f"run the same command again to resume")

    after = run_evals(model, tok, data.tests, cfg) if data.tests else {}
    if cfg.train.method == "lora":
        save_adapter(model, out / "adapter", base_model_name_or_path=base_path)
    longest = max(len(e.input_ids) for e in train_enc)
    summary = build_summary(cfg, device=device, info=info, result=result, n_train=len(train_enc),
                            train_stats=train_stats, memory=peak.result(),
                            breakdown=run_memory_breakdown(cfg, folder, device, seq=longest),
                            warnings=warnings, before=before, after=after, out=out)
    write_json(out / "summary.json", summary)
    return summary

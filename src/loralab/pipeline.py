"""One training run: config -> data -> pre-flight checks -> model + adapters -> the loop -> artifacts.

`loralab train`, studies (one process per run) and benchmarks call `run_training`; it owns the
files, the loop does not. The data is encoded with the tokenizer alone and every check that can
refuse the run (limits, memory, resume) comes before the model's weights load (prepare.py).
Started by torchrun, every rank runs this; rank 0 alone writes files and prints. Output folder:
  config.yaml      the resolved config
  metrics.jsonl    one line per step (step, loss, lr, tokens, elapsed_s) and per validation
                   (train.report_to: jsonl, the default; tensorboard/ and mlflow runs too: track/)
  adapter/         PEFT format (adapter_config.json + adapter_model.safetensors)
  summary.json     runtime, tokens/s, peak memory, parameters, losses, eval before/after (summary.py)
  .loralab.lock    while a run is in progress (io.lock): a second run into the folder is refused
"""
from __future__ import annotations

import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from .config import RunConfig, dump_yaml
from .data.formats import fingerprint
from .data.prompts import encode_all, render_prompt
from .errors import UserError
from .eval import preference
from .eval.metrics import generate, score
from .eval.stops import stop_check, task_stops
from .io.fileio import atomic_write_text, remove_temp_files, write_json
from .io.lock import output_lock
from .io.models import base_model_path, load_tokenizer, resolve
from .memory.estimate import run_memory_breakdown
from .memory.measure import PeakMemory
from .memory.preflight import check_before_loading, check_disk
from .peft.adapters import save_adapter
from .prepare import (
    Datasets,
    build_datasets,
    encode_datasets,
    find_resume,
    prepare_output_dir,
    resolve_config,
    setup_model,
)
from .rerun import finished_summary
from .summary import build_summary, epoch_warnings, stop_warnings
from .track.fanout import Trackers, open_trackers
from .track.names import flat_params
from .train import checkpoint, distributed
from .train.distributed import SINGLE, Dist, gather, trainable_state, unsharded
from .train.loop import Hooks, NonFiniteLoss, train
from .train.loss import mean_loss
from .train.precision import default_device
from .train.signals import StopFlag
from .train.state import set_seed, snapshot

stop_flag = StopFlag()


def run_evals(model, tok, tests: dict, cfg: RunConfig, dist: Dist = SINGLE, module=None) -> dict:
    """Exact match on each task's held-out examples, all tasks' prompts in one generate() call (one
    fp32 upcast, full batches: many small suite families cost what one large task does). With
    several ranks each generates for its share (every world-th prompt) and the answers meet on
    every rank; a sharded (FSDP2) model generates in lockstep, inside its root unit's unsharded
    scope (`module`: the wrapped LossModule)."""
    synced = dist.mode == "fsdp" and module is not None
    flat = [ex for examples in tests.values() for ex in examples]
    mine = list(range(dist.rank, len(flat), dist.world))
    n_mine = len(mine)
    if synced:  # lockstep: every rank generates as many prompts (stand-ins' answers are dropped)
        mine += [0] * (-(-len(flat) // dist.world) - n_mine)
    prompts = [render_prompt(flat[i], tok, template=cfg.data.template, system_prompt=cfg.data.system_prompt)
               for i in mine]
    with unsharded(module, dist) if synced else nullcontext():
        gens = generate(model, tok, prompts, batch_size=cfg.eval.batch_size,
                        max_new_tokens=cfg.eval.max_new_tokens, synced_gpus=synced)
    by_index = dict(pair for part in gather(dist, list(zip(mine, gens))[:n_mine]) for pair in part)
    results, start = {}, 0
    for name, examples in tests.items():
        results[name] = score(examples, [by_index[start + i] for i in range(len(examples))])
        start += len(examples)
    return results


def test_losses(module, tok, tests: dict, cfg: RunConfig, dist: Dist = SINGLE) -> dict:
    """Each task's mean token loss on its held-out answers (teacher forced, like the validation
    loss): a held-out measure far less noisy than exact match on a few dozen questions."""
    kw = dict(template=cfg.data.template, system_prompt=cfg.data.system_prompt, max_seq_len=cfg.data.max_seq_len)
    out = {}
    for name, examples in tests.items():
        encoded = encode_all(examples, tok, **kw)[0]
        out[name] = mean_loss(module, encoded, batch_size=cfg.eval.batch_size, pad_id=tok.pad_token_id,
                              dist=dist) if encoded else None
    return out


def held_out_stops(model, tok, data: Datasets, after: dict, cfg: RunConfig, dist: Dist) -> dict | None:
    """How many held-out generations stop on EOS: the task answers' count, else the validation set's
    (generated on every rank alike; not under FSDP2, whose sharded model generates only in lockstep)."""
    if not cfg.eval.stop_check:
        return None
    if after:
        return task_stops(after, cfg.eval.max_new_tokens)
    if not data.val or not cfg.eval.n or dist.mode == "fsdp":
        return None
    return stop_check(model, tok, data.val[:cfg.eval.n], template=cfg.data.template,
                      system_prompt=cfg.data.system_prompt, slack=cfg.eval.max_new_tokens,
                      batch_size=cfg.eval.batch_size)


def run_training(cfg: RunConfig, *, quiet: bool = False, data: Datasets | None = None) -> dict:
    """Run one configured fine-tune end to end and write its artifacts. Returns the summary dict.

    `data` replaces the config's data (a benchmark's own workload); by default it is built from
    `cfg.data` before the model loads, so bad data fails fast. The output folder is locked for
    the run (a second run into it is refused)."""
    dist = distributed.init(cfg.train.distributed, default_device().type, cfg.train.distributed_timeout_s)
    try:
        out = prepare_output_dir(cfg.output_dir)
        quiet = quiet or not dist.is_main
        log = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr))
        with output_lock(out) if dist.is_main else nullcontext() as took_over:  # rank 0 holds it for all
            return _run(cfg, out, log, data, [took_over] if took_over else [], dist)
    finally:
        distributed.shutdown(dist)


def _run(cfg: RunConfig, out: Path, log, data: Datasets | None, notes: list[str], dist: Dist) -> dict:
    main = dist.is_main
    device = distributed.device(dist) if dist.enabled else default_device()
    cfg = resolve_config(cfg, device)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    set_seed(cfg.train.seed)  # the same on every rank: LoRA factors start equal everywhere
    data = data or build_datasets(cfg)
    folder = resolve(cfg.model.name)  # a local folder; no weights are read yet
    tok = load_tokenizer(folder, cfg.model.trust_remote_code)
    train_enc, train_stats, val_enc = encode_datasets(data, tok, cfg)
    data_sha = fingerprint(data.train + data.val)
    done = finished_summary(cfg, out, data_sha, len(train_enc), dist.world)
    if done is not None:
        log(f"loralab: {out} already finished this run ({done['steps']} steps; its summary.json); nothing to "
            f"train or evaluate (resume=false starts it over)")
        return done
    notes += check_before_loading(cfg, folder, device, train_enc)  # limits and memory, before any weight loads
    model, tok, folder, info = setup_model(cfg, device, folder, tok)
    resume, resume_notes = find_resume(cfg, out, data_sha)
    notes += resume_notes + info["notes"] + check_disk(out, info["trainable_params"], cfg)
    # Progress lines only once every input check has passed: bad input gets its error line alone.
    log(f"loralab: {cfg.model.name}: {info['trainable_params']:,} trainable of {info['total_params']:,} parameters"
        f" ({len(info['targets'])} LoRA modules), weights {info['weights_dtype']}"
        + (f"; {dist.world} processes ({dist.mode})" if dist.enabled else ""))
    log(f"loralab: {len(train_enc):,} training examples ({train_stats['n_truncated']} truncated, "
        f"{train_stats['n_dropped']} dropped, {train_stats['n_tokens']:,} tokens), {len(val_enc):,} validation")
    warnings = epoch_warnings(len(train_enc), cfg, world=dist.world) + stop_warnings(train_stats, cfg)
    for line in notes + [f"warning: {w}" for w in warnings]:
        log(f"loralab: {line}")
    cfg_dict = cfg.to_dict()
    if main:
        atomic_write_text(out / "config.yaml", dump_yaml(cfg))
    if resume is not None:
        checkpoint.restore_trainable(model, resume["trainable"], resume["path"])
        log(f"loralab: resuming from {resume['path']} (step {resume['step']})")
    # rank 0 reports for all (the others' trackers are empty)
    trackers = open_trackers(cfg.train.report_to if main else [], out, resume_step=resume["step"] if resume else 0,
                             run_name=cfg.train.run_name, experiment=cfg.train.experiment,
                             mlflow_uri=cfg.train.mlflow_uri)
    status = "FAILED"
    try:
        trackers.start(flat_params(cfg_dict), cfg.train.tags)
        summary = _train_and_report(cfg, dist, model, tok, folder, info, data, train_enc, train_stats, val_enc,
                                    resume, warnings, out, device, trackers, log, data_sha)
        status = "FINISHED"
    except UserError as e:
        status = "KILLED" if str(e).startswith("interrupted") else "FAILED"
        raise
    finally:
        trackers.close(status)
    if stop_flag.is_set():
        log("loralab: the signal came after the last step: the run finished its files first")
    return summary


def _train_and_report(cfg: RunConfig, dist: Dist, model, tok, folder, info, data: Datasets, train_enc, train_stats,
                      val_enc, resume, warnings, out: Path, device, trackers: Trackers, log, data_sha) -> dict:
    """The run once its inputs are checked: eval before, the loop, eval after, the files, the summary."""
    main = dist.is_main
    cfg_dict = cfg.to_dict()
    before_path = out / "eval_before.json"
    if resume is not None and before_path.exists():
        before = json.loads(before_path.read_text())
    elif cfg.eval.before and data.tests:
        log("loralab: evaluating the base model...")
        before = run_evals(model, tok, data.tests, cfg, dist)  # not wrapped yet: every rank has all weights
        if main:
            write_json(before_path, before)
        trackers.log_eval(before, step=0)
    else:
        before = {}
    # -- preference tuning (eval/preference.py): held-out preference accuracy before training, kept for a resume
    pref_path = out / "preference_before.json"
    pref_before = json.loads(pref_path.read_text()) if resume is not None and pref_path.exists() else (
        preference.evaluate(model, tok, data, cfg) if resume is None and cfg.eval.before else {})
    if main and pref_before:
        write_json(pref_path, pref_before)
    # --
    base_path = base_model_path(cfg.model.name, folder)
    loop: dict = {}  # the loop's state, once it is ready (hooks.on_start)

    def save_lora(folder_name: str):
        weights = trainable_state(model) if dist.mode == "fsdp" else None  # sharded: gathered whole
        if main:
            save_adapter(model, out / folder_name, base_model_name_or_path=base_path, weights=weights)

    def on_eval(record: dict):
        if cfg.train.eval_every and cfg.eval.with_validation and data.tests:  # accuracy beside the validation loss
            evals = run_evals(model, tok, data.tests, cfg, dist, loop["state"].result.module)
            record["accuracy"] = {name: r["accuracy"] for name, r in evals.items()}
        trackers.log(record)
        if record.get("is_best") and cfg.train.method == "lora" and cfg.train.eval_every:
            save_lora("best_adapter")

    def on_checkpoint(state):
        snap = snapshot(state)  # every rank: sharded tensors and RNG streams are gathered
        if main:
            checkpoint.save(out / "checkpoints", snap, cfg_dict, keep=cfg.train.keep_checkpoints,
                            data_sha256=data_sha)

    hooks = Hooks(on_start=lambda state: loop.update(state=state), on_log=trackers.log, on_eval=on_eval,
                  on_checkpoint=on_checkpoint, should_stop=stop_flag.is_set)
    cpu0 = time.process_time()
    with stop_flag.installed():
        try:
            with PeakMemory(device) as peak:
                result = train(model, train_enc, cfg.train, pad_id=tok.pad_token_id, val_data=val_enc, hooks=hooks,
                               resume=resume, dist=dist)
        except NonFiniteLoss as e:
            last = checkpoint.latest(out / "checkpoints")
            raise UserError(f"non-finite {e.what} at step {e.step}; last good checkpoint: {last or 'none'} "
                            "(set train.skip_nonfinite=true to skip such batches)") from None
        info["train_cpu_s"] = time.process_time() - cpu0
        if result.interrupted:
            raise UserError(f"interrupted at step {result.steps}; checkpoint saved in {out / 'checkpoints'}; "
                            f"run the same command again to resume")
        # Training is done and checkpointed: a signal now waits for the evaluation and the files
        # (each written atomically) rather than leaving the run to be redone from its last checkpoint.
        stop_flag.note = "finishing the final evaluation and save first (Ctrl-C again to abort)"
        after = run_evals(model, tok, data.tests, cfg, dist, result.module) if data.tests else {}
        if cfg.eval.test_loss:
            for name, loss in test_losses(result.module, tok, data.tests, cfg, dist).items():
                after[name]["test_loss"] = loss
        trackers.log_eval(after, step=result.steps)
        stops = held_out_stops(model, tok, data, after, cfg, dist)
        if main:
            for folder_with_temps in (out, out / "adapter", out / "best_adapter"):  # left by a run killed mid-save
                remove_temp_files(folder_with_temps)
        if cfg.train.method == "lora":
            save_lora("adapter")
        memory = peak.result()
        memory["peak_memory_bytes_per_rank"] = [int(b) for b in gather(dist, memory["peak_memory_bytes"])]
        memory["peak_memory_bytes"] = max(memory["peak_memory_bytes_per_rank"])
        longest = max(len(e.input_ids) for e in train_enc)
        summary = build_summary(cfg, device=device, info=info, result=result, n_train=len(train_enc),
                                train_stats=train_stats, memory=memory,
                                breakdown=run_memory_breakdown(cfg, folder, device, seq=longest),
                                warnings=warnings, before=before, after=after, out=out, world=dist.world,
                                stops=stops)
        summary["resumed_from_step"] = resume["step"] if resume is not None else None  # None: a fresh start
        with unsharded(result.module, dist):  # preference tuning: every rank scores all pairs (FSDP2: in lockstep)
            summary["preference"] = preference.summary_part(pref_before, preference.evaluate(model, tok, data, cfg))
        if main:
            write_json(out / "summary.json", summary)
        trackers.finish(summary)
    return summary

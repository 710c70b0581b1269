"""One training run as an object: its state in typed fields, its work in named phases.

    prepare        config resolved for this machine, data built, encoded and checked, the pre-flight
                   (limits, memory): nothing is created or written, so bad input leaves the output
                   folder as it was (or absent)
    load           the output folder created and locked (io/lock.py), a finished run recognised
                   (rerun.py), the model loaded with its adapters, the checkpoint to resume from
                   read, the disk checked; then config.yaml written and the trackers started
    evaluate_base  exact match before training (eval_before.json; a resumed run reads it back)
    train          the loop (train/loop.py), which never touches files: hooks write checkpoints,
                   metrics and the best adapter
    evaluate       exact match (and the held-out answer loss) after training
    save           the adapter, summary.json, the trackers' last records

A signal stops the first three phases at once (one "interrupted ... during <phase>" line, the lock
released, nothing half written); during the last three it waits for the step's checkpoint or for
the files (train/signals.py). Started by torchrun, every rank runs this; rank 0 alone writes and prints.
Output folder:
  config.yaml      the resolved config
  metrics.jsonl    one line per step (step, loss, lr, tokens, elapsed_s) and per validation
                   (train.report_to: jsonl, the default; tensorboard/ and mlflow runs too: track/)
  adapter/         PEFT format (adapter_config.json + adapter_model.safetensors); best_adapter/ likewise
  eval_before.json the base model's exact match; checkpoints/ the resumable states
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
from .errors import UserError
from .eval import forgetting, preference
from .io.fileio import atomic_write_text, remove_temp_files, write_json
from .io.lock import output_lock
from .io.models import base_model_path, load_tokenizer, resolve
from .memory.data_size import check_encoded
from .memory.estimate import run_memory_breakdown
from .memory.generation import check_evaluation
from .memory.measure import PeakMemory
from .memory.preflight import check_before_loading, check_disk
from .peft.adapter_files import write_stage
from .peft.adapters import check_stage_adapter, save_adapter
from .peft.lora import lora_disabled
from .prepare import (
    Datasets,
    ModelSetup,
    build_datasets,
    check_output_dir,
    encode_datasets,
    find_resume,
    prepare_output_dir,
    resolve_config,
    setup_model,
)
from .rerun import config_sha256, finished_summary
from .run_evals import held_out_stops, run_evals, test_losses
from .summary import build_summary, epoch_warnings, stop_warnings
from .track.fanout import Trackers, open_trackers
from .track.names import flat_params
from .train import checkpoint, distributed
from .train.distributed import SINGLE, Dist, gather, trainable_state, unsharded
from .train.loop import Hooks, NonFiniteLoss, batch_layout, train
from .train.precision import default_device
from .train.signals import Interrupted, StopFlag
from .train.state import TrainResult, set_seed, snapshot

stop_flag = StopFlag()

# The phases' names, as the interruption line says them.
PREPARE, LOAD, BASE_EVAL = "preparation", "loading", "the base evaluation"
TRAIN, FINAL_EVAL, SAVE = "training", "the final evaluation", "saving"
FINISHING = "finishing the final evaluation and save first (Ctrl-C again to abort)"


class Run:
    """`Run(cfg).execute()` trains, evaluates and writes one configured run; returns its summary.

    data: replaces the config's data (a benchmark's own workload). quiet: no progress lines."""

    def __init__(self, cfg: RunConfig, *, quiet: bool = False, data: Datasets | None = None):
        self.cfg = cfg
        self.quiet = quiet
        self.data = data
        self.dist: Dist = SINGLE
        self.device: torch.device | None = None
        self.out = Path(cfg.output_dir)
        self.notes: list[str] = []       # lines logged once every input check has passed
        self.warnings: list[str] = []    # summary.json's warnings (epochs, stop tokens)
        # set by the phases, in order
        self.folder: Path | None = None  # the base model's local folder
        self.tok = None
        self.train_enc: list = []
        self.train_stats: dict = {}
        self.val_enc: list = []
        self.data_sha = ""
        self.resume: dict | None = None
        self.model = None
        self.setup: ModelSetup | None = None
        self.trackers: Trackers = Trackers([])
        self.before: dict = {}
        self.after: dict = {}
        self.stops: dict | None = None   # held-out generations that stop on EOS (eval/stops.py)
        self.forget_start = None         # other skills' scores before training (eval/forgetting.py)
        self.forget_end: dict = {}       # and after: summary.json's forgetting, heldout_loss
        self.pref_before: dict = {}      # preference objectives: held-out pair accuracy before (eval/preference.py)
        self.pref_after: dict = {}       # ... and after
        self.result: TrainResult | None = None
        self.train_cpu_s = 0.0
        self.peak: PeakMemory | None = None
        self.summary: dict | None = None
        self.layout = None               # how the evaluations' loss batches are collated (load)
        self._cpu0 = 0.0                 # process CPU seconds when training began
        self.phase_s: dict = {}          # wall seconds per phase, in order (_enter)
        self._phase: tuple | None = None

    @property
    def main(self) -> bool:
        return self.dist.is_main

    def log(self, *parts) -> None:
        if not self.quiet:
            print(*parts, file=sys.stderr)

    # ------------------------------------------------------------------------------------------
    def execute(self) -> dict:
        cfg = self.cfg
        self.dist = distributed.init(cfg.train.distributed, default_device().type, cfg.train.distributed_timeout_s)
        self.quiet = self.quiet or not self.main
        try:
            with stop_flag.installed():
                return self._phases()
        finally:
            distributed.shutdown(self.dist)

    def _phases(self) -> dict:
        self._enter(PREPARE, hint="nothing was written")
        self.prepare()
        out = prepare_output_dir(self.cfg.output_dir)
        with output_lock(out) if self.main else nullcontext() as took_over:
            self._enter(LOAD, hint="run the same command again")
            if took_over:  # rank 0 holds it for all
                self.notes.insert(0, took_over)
            done = finished_summary(self.cfg, out, self.data_sha, len(self.train_enc), self.dist.world)
            if done is not None:
                self.log(f"loralab: {out} already finished this run ({done['steps']} steps; its summary.json); "
                         f"nothing to train or evaluate (resume=false starts it over)")
                return done
            self.load()
            status = "FAILED"
            try:
                self.trackers.start(flat_params(self.cfg.to_dict()), self.cfg.train.tags)
                for line in self.trackers.where():
                    self.log(f"loralab: {line}")
                self._enter(BASE_EVAL, hint=self._again())
                self.evaluate_base()
                self._enter(TRAIN, deferred=True)
                self.train()
                # Training is done and checkpointed: a signal now waits for the evaluation and the
                # files (each written atomically) rather than leave the run to be redone.
                self._enter(FINAL_EVAL, deferred=True, note=FINISHING)
                self.evaluate()
                self._enter(SAVE, deferred=True, note=FINISHING)
                self.save()
                status = "FINISHED"
            except (UserError, Interrupted) as e:
                status = "KILLED" if str(e).startswith("interrupted") else "FAILED"
                raise
            finally:
                self.trackers.close(status)
        if stop_flag.is_set():
            self.log("loralab: the signal came after the last step: the run finished its files first")
        return self.summary

    def _enter(self, phase: str, **kw) -> None:
        """A phase begins: what a signal now does (stop_flag), and the last phase's wall time (summary.json's
        phase_s: where a run's time went, evaluations included)."""
        now = time.perf_counter()
        if self._phase is not None:
            self.phase_s[self._phase[0]] = round(now - self._phase[1], 1)
        self._phase = (phase, now)
        stop_flag.enter(phase, **kw)

    def _again(self) -> str:
        return "run the same command again" + (" to resume" if self.resume is not None else "")

    # ------------------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Everything that can refuse the run without the weights or the output folder (the config
        resolved, the data built, encoded and pre-flighted), before that folder is created or locked."""
        dist = self.dist
        check_output_dir(self.cfg.output_dir)
        self.device = distributed.device(dist) if dist.enabled else default_device()
        self.cfg = cfg = resolve_config(self.cfg, self.device)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        set_seed(cfg.train.seed)  # the same on every rank: LoRA factors start equal everywhere
        self.data = data = self.data or build_datasets(cfg)
        self.folder = resolve(cfg.model.name)  # a local folder; no weights are read yet
        if cfg.model.adapter:
            check_stage_adapter(cfg.model.adapter)
        self.tok = load_tokenizer(self.folder, cfg.model.trust_remote_code)
        check_encoded(cfg, data, self.tok)  # the token ids' memory, before encoding
        self.train_enc, self.train_stats, self.val_enc = encode_datasets(data, self.tok, cfg)
        self.data_sha = fingerprint(data.train + data.val)
        self.notes += check_before_loading(cfg, self.folder, self.device, self.train_enc)  # limits and memory
        self.notes += check_evaluation(cfg, self.folder, self.device, data, self.tok, dist.world)  # eval's too

    def load(self) -> None:
        """The model with its adapters; then the files that say a run began (config.yaml, trackers)."""
        cfg, out = self.cfg, self.out
        self.model, self.tok, self.folder, self.setup = setup_model(cfg, self.device, self.folder, self.tok)
        # the evaluations' losses collate their batches as validation does: packed rows carry no padding
        self.layout = batch_layout(self.model, cfg.train, self.tok.pad_token_id)
        setup = self.setup
        self.resume, resume_notes = find_resume(cfg, out, self.data_sha)  # reads the checkpoints; writes nothing
        self.notes += resume_notes + setup.notes + check_disk(out, setup.trainable_params, cfg)
        # Progress lines only once every input check has passed: bad input gets its error line alone.
        self.log(f"loralab: {cfg.model.name}: {setup.trainable_params:,} trainable of {setup.total_params:,} "
                 f"parameters ({len(setup.targets)} LoRA modules), weights {setup.weights_dtype}"
                 + (f"; {self.dist.world} processes ({self.dist.mode})" if self.dist.enabled else ""))
        stats = self.train_stats
        self.log(f"loralab: {len(self.train_enc):,} training examples ({stats['n_truncated']} truncated, "
                 f"{stats['n_dropped']} dropped, {stats['n_tokens']:,} tokens), {len(self.val_enc):,} validation")
        self.warnings = epoch_warnings(len(self.train_enc), cfg, world=self.dist.world) + stop_warnings(stats, cfg)
        for line in self.notes + [f"warning: {w}" for w in self.warnings]:
            self.log(f"loralab: {line}")
        if self.main:
            atomic_write_text(out / "config.yaml", dump_yaml(cfg))
        if self.resume is not None:
            checkpoint.restore_trainable(self.model, self.resume["trainable"], self.resume["path"])
            self.log(f"loralab: resuming from {self.resume['path']} (step {self.resume['step']})")
        # rank 0 reports for all (the others' trackers are empty)
        self.trackers = open_trackers(cfg.train.report_to if self.main else [], out,
                                      resume_step=self.resume["step"] if self.resume else 0,
                                      run_name=cfg.train.run_name, experiment=cfg.train.experiment,
                                      mlflow_uri=cfg.train.mlflow_uri)

    def evaluate_base(self) -> None:
        """The base model's scores, before training. A resumed run's model has trained: it reads the scores
        its first segment wrote, and measures any it lacks (eval.* keys may change on a resume) with its LoRA
        layers switched off, which is its base again; a resumed full fine-tune has no base left to measure."""
        cfg, data, resumed = self.cfg, self.data, self.resume is not None
        measurable = not resumed or cfg.train.method == "lora"
        before_path = self.out / "eval_before.json"
        pref_path = self.out / "preference_before.json"  # kept for a resume, as eval_before.json
        with lora_disabled(self.model) if resumed and measurable else nullcontext():
            if resumed and before_path.exists():
                self.before = json.loads(before_path.read_text())
            elif measurable and cfg.eval.before and data.tests:
                self.log("loralab: evaluating the base model...")
                # not wrapped yet: every rank has all weights
                self.before = run_evals(self.model, self.tok, data.tests, cfg, self.dist)
                if self.main:
                    write_json(before_path, self.before)
                self.trackers.log_eval(self.before, step=0)
            if resumed and pref_path.exists():
                self.pref_before = json.loads(pref_path.read_text())
            elif measurable and cfg.eval.before:
                self.pref_before = preference.evaluate(self.model, self.tok, data, cfg)
                if self.main and self.pref_before:
                    write_json(pref_path, self.pref_before)
            if measurable or (self.out / forgetting.BEFORE_FILE).exists():
                self.forget_start = forgetting.before(self.model, self.tok, cfg, self.dist, self.out, resumed,
                                                      self.layout)

    def _save_lora(self, folder_name: str) -> None:
        weights = trainable_state(self.model) if self.dist.mode == "fsdp" else None  # sharded: gathered whole
        if self.main:
            save_adapter(self.model, self.out / folder_name, weights=weights,
                         base_model_name_or_path=base_model_path(self.cfg.model.name, self.folder))
            if self.cfg.model.adapter:  # relative to the base with the earlier stage merged in
                write_stage(self.out / folder_name, self.cfg.model.adapter)

    def _hooks(self) -> Hooks:
        cfg, data, dist = self.cfg, self.data, self.dist
        loop: dict = {}  # the loop's state, once it is ready (hooks.on_start)

        def on_eval(record: dict):
            if cfg.train.eval_every and cfg.eval.with_validation and data.tests:  # accuracy beside the val loss
                evals = run_evals(self.model, self.tok, data.tests, cfg, dist, loop["state"].result.module)
                record["accuracy"] = {name: r["accuracy"] for name, r in evals.items()}
            self.trackers.log(record)
            if record.get("is_best") and cfg.train.method == "lora" and cfg.train.eval_every:
                self._save_lora("best_adapter")

        def on_checkpoint(state):
            snap = snapshot(state)  # every rank: sharded tensors and RNG streams are gathered
            snap["result"]["measured"] = self._measured(self.peak.so_far(), time.process_time() - self._cpu0)
            if self.main:
                checkpoint.save(self.out / "checkpoints", snap, cfg.to_dict(), keep=cfg.train.keep_checkpoints,
                                data_sha256=self.data_sha)

        return Hooks(on_start=lambda state: loop.update(state=state), on_log=self.trackers.log, on_eval=on_eval,
                     on_checkpoint=on_checkpoint, should_stop=stop_flag.is_set)

    def _measured(self, peak_bytes: int, cpu_s: float) -> dict:
        """The loop's peak memory per rank and CPU seconds, this process's with those of the segments a resume
        continues (kept in each checkpoint): a run resumed at its last step, to evaluate, trained in none."""
        prior = ((self.resume or {}).get("result") or {}).get("measured") or {}
        peaks = [int(b) for b in gather(self.dist, peak_bytes)]
        if len(prior.get("peak_memory_bytes_per_rank") or []) == len(peaks):
            peaks = [max(a, b) for a, b in zip(peaks, prior["peak_memory_bytes_per_rank"])]
        return {"peak_memory_bytes_per_rank": peaks, "train_cpu_s": prior.get("train_cpu_s", 0.0) + cpu_s}

    def train(self) -> None:
        cfg, out = self.cfg, self.out
        self._cpu0 = cpu0 = time.process_time()
        try:
            with PeakMemory(self.device) as self.peak:  # the loop's peak (summary.json)
                self.result = train(self.model, self.train_enc, cfg.train, pad_id=self.tok.pad_token_id,
                                    val_data=self.val_enc, hooks=self._hooks(), resume=self.resume, dist=self.dist)
        except NonFiniteLoss as e:
            last = checkpoint.latest(out / "checkpoints")
            raise UserError(f"non-finite {e.what} at step {e.step}; last good checkpoint: {last or 'none'} "
                            "(set train.skip_nonfinite=true to skip such batches)") from None
        self.train_cpu_s = time.process_time() - cpu0
        if self.result.interrupted:
            raise UserError(f"interrupted at step {self.result.steps}; checkpoint saved in {out / 'checkpoints'}; "
                            f"run the same command again to resume")

    def evaluate(self) -> None:
        cfg, data, module = self.cfg, self.data, self.result.module
        self.after = run_evals(self.model, self.tok, data.tests, cfg, self.dist, module) if data.tests else {}
        if cfg.eval.test_loss:
            for name, loss in test_losses(module, self.tok, data.tests, cfg, self.dist, self.layout).items():
                self.after[name]["test_loss"] = loss
        self.trackers.log_eval(self.after, step=self.result.steps)
        self.forget_end = forgetting.after(self.forget_start, module, self.tok, cfg, data, self.dist, self.layout)
        self.stops = held_out_stops(self.model, self.tok, data, self.after, cfg, self.dist)
        with unsharded(module, self.dist):  # every rank scores all pairs (FSDP2: in lockstep)
            self.pref_after = preference.evaluate(self.model, self.tok, data, cfg)

    def save(self) -> None:
        cfg, out, dist = self.cfg, self.out, self.dist
        if self.main:
            for folder_with_temps in (out, out / "adapter", out / "best_adapter"):  # left by a run killed mid-save
                remove_temp_files(folder_with_temps)
        if cfg.train.method == "lora":
            self._save_lora("adapter")
        memory = self.peak.result()
        measured = self._measured(memory["peak_memory_bytes"], self.train_cpu_s)
        memory["peak_memory_bytes_per_rank"] = measured["peak_memory_bytes_per_rank"]
        memory["peak_memory_bytes"] = max(memory["peak_memory_bytes_per_rank"])
        longest = max(len(e.input_ids) for e in self.train_enc)
        summary = build_summary(cfg, device=self.device, setup=self.setup, train_cpu_s=measured["train_cpu_s"],
                                result=self.result, n_train=len(self.train_enc), train_stats=self.train_stats,
                                memory=memory, breakdown=run_memory_breakdown(cfg, self.folder, self.device,
                                                                              seq=longest),
                                warnings=self.warnings, before=self.before, after=self.after, out=out,
                                world=dist.world, stops=self.stops)
        summary["resumed_from_step"] = self.resume["step"] if self.resume is not None else None  # None: fresh
        summary.update(self.forget_end)  # forgetting, heldout_loss
        summary["preference"] = preference.summary_part(self.pref_before, self.pref_after)
        summary["phase_s"] = dict(self.phase_s)  # every phase but this one (writing files: seconds)
        summary["config_sha256"] = config_sha256(cfg)  # the config it describes (rerun.finished_summary)
        if self.main:
            write_json(out / "summary.json", summary)
        self.trackers.finish(summary)
        self.summary = summary

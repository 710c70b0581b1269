"""The run configuration: plain dataclasses, YAML loading, `key.sub=value` overrides, validation.

This module is the single source of truth for every default (r, alpha = 2r, targets, lr...).
Validation happens here, at the edge: everything below receives a checked `RunConfig`.
Errors are one line naming the key (with close matches for typos), raised as UserError.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config_checks import validate_converters, validate_preference, validate_variants
from .errors import UserError
from .io import reading, yamlfile

ARITHMETIC_DEFAULT = ["2da", "2ds"]


@dataclass
class ModelConfig:
    name: str = "smollm2-135m"        # bundled name, HF folder, .gguf file, or hub id in the local cache
    quant: str = "none"               # none | nf4: how frozen base linears are stored (nf4 = QLoRA)
    quant_all_linear: bool = False    # with nf4: also quantize frozen linears LoRA does not wrap
    trust_remote_code: bool = False   # run a model folder's own Python code (only for folders you trust)
    attn_implementation: str = "auto"  # auto | eager | eager_recompute | sdpa (model/attention.py)
    converters: Any = "auto"          # auto | off | a list of names: the rewrites of how it computes (model/convert.py)
    adapter: str | None = None        # an adapter folder merged into the base first: a staged run (SFT, then DPO)


@dataclass
class LoRAConfig:
    r: int = 8                        # LoRA rank: the inner size of each update B @ A
    alpha: float | None = None        # None means 2 * r (the article's rule of thumb)
    dropout: float = 0.05             # dropout on the LoRA path only (the frozen path sees the plain input)
    targets: Any = "all-linear"       # preset (qv, attn, mlp, all-linear, all-linear+head) or a list of names
    use_rslora: bool = False          # scale alpha / sqrt(r) instead of alpha / r (rank-stabilized LoRA)
    use_dora: bool = False            # weight-decomposed LoRA: a trainable magnitude per output row
    init: str = "kaiming"             # kaiming | gaussian | pissa | pissa_niter_N | olora
    rank_pattern: dict = field(default_factory=dict)   # module name or regex -> r (PEFT's semantics)
    alpha_pattern: dict = field(default_factory=dict)  # module name or regex -> alpha
    layers: Any = None                # decoder layers that get LoRA (an int or a list); None: all
    target_parameters: list = field(default_factory=list)  # fused 3-D expert weights (PEFT's target_parameters)


@dataclass
class DataConfig:
    path: str | None = None           # alpaca/chat/prompt-response json(l), txt; datasets folder, .parquet, .csv
    columns: dict | None = None       # loralab field -> the data's column, e.g. {instruction: question, output: answer}
    tasks: list = field(default_factory=lambda: list(ARITHMETIC_DEFAULT))  # synthetic tasks when no path
    n_train: int | dict = 2000        # training examples per synthetic task, or {task: count} for a mix
    val_fraction: float = 0.05        # held-out share of the training data for validation loss
    max_seq_len: int = 512            # longer examples are truncated (and counted in the log)
    template: str = "auto"            # auto | chat | alpaca | raw
    system_prompt: str | None = "default"  # default | none | any text
    seed: int = 1234                  # data generation and splits; fixed so every run sees the same test set


@dataclass
class TrainConfig:
    method: str = "lora"              # lora | full
    optimizer: str = "adamw"          # adamw | sgd | adafactor | lion (train/optim.py)
    lr: float = 3e-4                  # peak learning rate, reached after warmup_steps
    loraplus_lr_ratio: float | None = None  # LoRA+: B (and DoRA's magnitudes) learn at ratio x lr
    weight_decay: float = 0.0         # decoupled (AdamW) weight decay on the trainable parameters
    momentum: float = 0.9             # sgd only
    betas: list = field(default_factory=lambda: [0.9, 0.999])  # AdamW's two moment decay rates
    scheduler: str = "cosine"         # cosine | linear | constant (after linear warmup)
    warmup_steps: int = 0             # optimizer steps of linear warmup up to lr
    min_lr_ratio: float = 0.0         # cosine/linear decay floor, as a fraction of lr
    batch_size: int = 8               # micro batch
    grad_accum: int = 1               # micro batches per optimizer step
    epochs: float = 1.0               # passes over the training data (fractions allowed); max_steps wins when set
    max_steps: int | None = None      # overrides epochs when set
    max_grad_norm: float | None = 1.0  # clip the gradients' total norm to this (null: no clipping)
    seed: int = 42                    # python, numpy and torch seeds, and the training data's order
    precision: str = "auto"           # auto | bf16 | fp32 (bf16: frozen weights stored in bf16)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, more time
    packing: bool = True              # each micro batch's examples end to end in fewer rows: same math, less padding
    shared_prefix: bool = True        # first tokens all examples of a micro batch share (a system prompt): once per row
    group_by_length: int = 0          # > 0: sort by length within windows of this many batches (changes batch mixes)
    compile: bool = False             # torch.compile the decoder blocks: fused ops, less memory; step 1 compiles
    trim_heap: bool = False           # CPU, glibc's malloc: free pages handed back in forward: lower peak, slower steps
    log_every: int = 10               # steps between lines in metrics.jsonl and the trackers
    eval_every: int = 0               # validation loss every N steps (0: only at the end)
    early_stopping_patience: int = 0  # stop after N validations without improvement (0: never)
    save_every: int = 0               # checkpoint every N steps (0: only at the end and on a signal)
    keep_checkpoints: int = 2         # newest checkpoints kept on disk
    skip_nonfinite: bool = False      # skip a batch whose loss/grad is NaN/Inf instead of stopping
    threads: int | None = None        # torch CPU threads (None: torch's default)
    distributed: str = "auto"         # under torchrun: ddp | fsdp (auto: ddp); one process: ignored
    distributed_timeout_s: float = 600.0  # a collective waiting longer ends the job (a rank died or hangs)
    progress: bool = True             # the progress bar on the terminal
    preflight: str = "error"          # error | warn | off: refuse (or warn about) a run whose memory/disk won't fit
    # Experiment tracking (track/): where metrics go, and how the run is named there.
    report_to: list = field(default_factory=lambda: ["jsonl"])  # any of REPORT_TO
    run_name: str | None = None       # tensorboard / mlflow run name (None: output_dir's folder name)
    experiment: str = "loralab"       # mlflow experiment
    mlflow_uri: str | None = None     # None: $MLFLOW_TRACKING_URI, else a file store in <output_dir>/mlruns
    tags: dict = field(default_factory=dict)  # run tags (studies set study, cell, seed)
    # Preference tuning (train/preference.py): data of prompt / chosen / rejected pairs.
    objective: str = "sft"            # sft | dpo | orpo
    beta: float = 0.1                 # dpo: how far the policy may move from the reference (the base, LoRA off)
    dpo_loss: str = "sigmoid"         # dpo: sigmoid | hinge | ipo | robust
    label_smoothing: float = 0.0      # dpo sigmoid / robust: the share of pairs assumed mislabelled, in [0, 0.5)
    orpo_lambda: float = 0.1          # orpo: weight of the odds-ratio term beside the chosen answers' NLL


@dataclass
class EvalConfig:
    tasks: list | None = None         # exact-match tasks; None: the data's synthetic tasks
    n: int = 100                      # held-out questions per task
    before: bool = True               # also evaluate the base model before training
    batch_size: int = 50              # prompts generated at once
    max_new_tokens: int = 8           # longest generated answer, in tokens
    stop_check: bool = True           # after training: how many held-out generations stop on EOS (summary, table)
    test_loss: bool = True            # after training: each task's mean token loss on its held-out answers
                                      # (one teacher-forced forward over them; studies compare it)
    with_validation: bool = True      # exact match at every validation of train.eval_every too (false: after only)
    forgetting: bool = True           # loss on fixed tasks the run does not train on, before and after
                                      # (eval/forgetting.py: the summary's forgetting report)
    loss_items: int = 0               # > 0: `heldout_loss` over this many unseen items of the trained tasks
                                      # (one forward each; studies compare it)
    preference: bool | None = None    # held-out preference accuracy and reward margins (None: on for dpo / orpo)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "runs/default"  # where the run writes config.yaml, metrics.jsonl, adapter/, summary.json
    resume: Any = "auto"              # auto: continue from output_dir's checkpoint of the same config; true; false

    @property
    def lora_alpha(self) -> float:
        return float(self.lora.alpha) if self.lora.alpha is not None else 2.0 * self.lora.r

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["lora"]["alpha"] = self.lora_alpha  # the resolved config states the value used
        return d


REPORT_TO = ("jsonl", "tensorboard", "mlflow")  # jsonl: metrics.jsonl in output_dir
CHOICES = {
    "model.quant": ("none", "nf4"),
    "model.attn_implementation": ("auto", "eager", "eager_recompute", "sdpa"),
    "train.method": ("lora", "full"),
    "train.optimizer": ("adamw", "sgd", "adafactor", "lion"),
    "train.scheduler": ("cosine", "linear", "constant"),
    "train.precision": ("auto", "bf16", "fp32"),
    "train.distributed": ("auto", "ddp", "fsdp"),
    "train.preflight": ("error", "warn", "off"),
    "train.objective": ("sft", "dpo", "orpo"),
    "train.dpo_loss": ("sigmoid", "hinge", "ipo", "robust"),
    "data.template": ("auto", "chat", "alpaca", "raw"),
}

YAML_BOOL_WORDS = {"train.preflight": {False: "off", True: "error"},  # `preflight: off` reads as False
                   "model.converters": {False: "off", True: "auto"}}


# ---------------------------------------------------------------------------------------------
# Building a config from nested dicts, with one-line errors

def _unknown_key(key: str, known: list[str]) -> UserError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(close)}?)" if close else f" (known: {', '.join(known)})"
    return UserError(f"unknown config key '{key}'{hint}")


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check one leaf value against its annotation; ints are accepted where floats are expected."""
    ann = annotation
    origin = typing.get_origin(ann)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        if value is None:
            return None
        for alternative in args[1:]:  # int | dict: the first that fits, errors named after the first
            try:
                return _coerce(key, value, alternative)
            except UserError:
                pass
        ann = args[0]
        origin = typing.get_origin(ann)
    if ann is Any:
        return value
    if ann is bool:
        if isinstance(value, bool):
            return value
    elif ann is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif ann is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif ann is str:
        if isinstance(value, str):
            return value
    elif ann is dict or origin is dict:
        if isinstance(value, dict):
            return value
    elif ann is list or origin is list:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list):
            return value
    elif ann is dict or origin is dict:
        if isinstance(value, dict):
            return value
    name = getattr(ann, "__name__", str(ann))
    raise UserError(f"config key '{key}' must be {name}, got {value!r}")


def _build(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise UserError(f"config section '{prefix.rstrip('.') or '<top>'}' must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)  # resolves the string annotations of `from __future__`
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in fields:
            raise _unknown_key(full, list(fields))
        if dataclasses.is_dataclass(hints[key]):
            kwargs[key] = _build(hints[key], value or {}, f"{full}.")
        else:
            if isinstance(value, bool) and full in YAML_BOOL_WORDS:  # YAML 1.1 reads off / on as booleans
                value = YAML_BOOL_WORDS[full][value]
            kwargs[key] = _coerce(full, value, hints[key])
    return cls(**kwargs)


def validate(cfg: RunConfig) -> RunConfig:
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), allowed, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise UserError(f"config key '{key}' must be one of {', '.join(allowed)}, got {value!r}{hint}")
    checks = [
        ("lora.r", cfg.lora.r > 0, "must be > 0"),
        ("lora.alpha", cfg.lora.alpha is None or cfg.lora.alpha > 0, "must be > 0"),
        ("lora.dropout", 0 <= cfg.lora.dropout < 1, "must be in [0, 1)"),
        ("train.lr", cfg.train.lr > 0, "must be > 0"),
        ("train.batch_size", cfg.train.batch_size > 0, "must be > 0"),
        ("train.grad_accum", cfg.train.grad_accum > 0, "must be > 0"),
        ("train.epochs", cfg.train.epochs > 0, "must be > 0"),
        ("train.max_steps", cfg.train.max_steps is None or cfg.train.max_steps > 0, "must be > 0"),
        ("train.warmup_steps", cfg.train.warmup_steps >= 0, "must be >= 0"),
        ("train.weight_decay", cfg.train.weight_decay >= 0, "must be >= 0"),
        ("train.log_every", cfg.train.log_every > 0, "must be > 0"),
        ("train.eval_every", cfg.train.eval_every >= 0, "must be >= 0"),
        ("train.early_stopping_patience", cfg.train.early_stopping_patience >= 0, "must be >= 0"),
        ("train.save_every", cfg.train.save_every >= 0, "must be >= 0"),
        ("train.group_by_length", cfg.train.group_by_length >= 0, "must be >= 0"),
        ("train.keep_checkpoints", cfg.train.keep_checkpoints >= 1, "must be >= 1"),
        ("train.distributed_timeout_s", cfg.train.distributed_timeout_s > 0, "must be > 0"),
        ("data.max_seq_len", cfg.data.max_seq_len > 0, "must be > 0"),
        ("data.val_fraction", 0 <= cfg.data.val_fraction < 1, "must be in [0, 1)"),
        ("eval.n", cfg.eval.n >= 0, "must be >= 0"),
        ("eval.loss_items", cfg.eval.loss_items >= 0, "must be >= 0 (0: no held-out loss)"),
        ("eval.batch_size", cfg.eval.batch_size > 0, "must be > 0"),
        # the rest fail only deep in a run (generate, the optimizer, a seeder), after the output
        # folder's config.yaml and metrics.jsonl were already written: refused here instead
        ("eval.max_new_tokens", cfg.eval.max_new_tokens > 0, "must be > 0"),
        ("train.threads", cfg.train.threads is None or cfg.train.threads > 0, "must be > 0 (or null: torch's default)"),
        ("train.max_grad_norm", cfg.train.max_grad_norm is None or cfg.train.max_grad_norm > 0,
         "must be > 0 (or null: no clipping)"),
        ("train.min_lr_ratio", 0 <= cfg.train.min_lr_ratio <= 1, "must be in [0, 1]"),
        ("train.momentum", cfg.train.momentum >= 0, "must be >= 0"),
        ("train.seed", 0 <= cfg.train.seed < 2**63, "must be in [0, 2**63)"),
        ("data.seed", 0 <= cfg.data.seed < 2**63, "must be in [0, 2**63)"),
    ]
    n = cfg.data.n_train
    if not (isinstance(n, int) and n > 0 or isinstance(n, dict) and n and all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v > 0 for k, v in n.items())):
        raise UserError(f"config key 'data.n_train' must be a count > 0 or a mapping task -> count > 0, got {n!r}")
    for key, ok, why in checks:
        if not ok:
            section, name = key.split(".")
            raise UserError(f"config key '{key}' {why}, got {getattr(getattr(cfg, section), name)!r}")
    if len(cfg.train.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in cfg.train.betas):
        raise UserError(f"config key 'train.betas' must be two numbers in [0, 1), got {cfg.train.betas!r}")
    if not isinstance(cfg.lora.targets, (str, list)) or not cfg.lora.targets:
        raise UserError(f"config key 'lora.targets' must be a preset name or a non-empty list, "
                        f"got {cfg.lora.targets!r}")
    unknown = [s for s in cfg.train.report_to if s not in REPORT_TO]
    if unknown:
        raise UserError(f"config key 'train.report_to' has unknown {', '.join(map(repr, unknown))} "
                        f"(choose from {', '.join(REPORT_TO)})")
    if not all(isinstance(k, str) and isinstance(v, (str, int, float, bool)) for k, v in cfg.train.tags.items()):
        raise UserError(f"config key 'train.tags' must map names to plain values, got {cfg.train.tags!r}")
    if cfg.data.columns is not None and not (isinstance(cfg.data.columns, dict) and cfg.data.columns):
        raise UserError(f"config key 'data.columns' must map loralab fields to column names, got {cfg.data.columns!r}")
    validate_variants(cfg)
    validate_converters(cfg.model.converters)
    validate_preference(cfg)
    if not cfg.data.path and not cfg.data.tasks:
        raise UserError("config key 'data.path' or 'data.tasks' must be set")
    if cfg.resume != "auto" and not isinstance(cfg.resume, bool):  # 1 == True, but `resume: 1` is a typo
        raise UserError(f"config key 'resume' must be auto, true or false, got {cfg.resume!r}")
    if not str(cfg.output_dir).strip():
        raise UserError("config key 'output_dir' must not be empty")
    return cfg


def from_dict(data: dict) -> RunConfig:
    return validate(_build(RunConfig, data or {}))


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise UserError(f"override '{text}' must look like key.sub=value")
    key, raw = text.split("=", 1)
    try:  # strict as a file: a duplicate key, an alias bomb or deep nesting is refused
        value = yamlfile.load(raw, f"override '{key.strip()}'") if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not YAML (`data.system_prompt=Answer: {x}`): the text as it is
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override '{text}': '{part}' is not a section")
        node[path[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict:
    """A config or study file: a regular file under a size cap, UTF-8, strict YAML (io/yamlfile.py)."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: config file does not exist")
    if p.is_dir():
        raise UserError(f"{p}: is a directory, expected a YAML config file")
    text = reading.read_text(p, "YAML config file", reading.YAML_CAP)
    try:
        data = yamlfile.load(text, str(p))
    except yaml.YAMLError as e:
        line, problem = yamlfile.error_text(e)
        raise UserError(f"{p}{line}: invalid YAML ({problem})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{p}: a config must be a mapping of sections, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    data = read_yaml(path) if path else {}
    return from_dict(apply_overrides(data, list(overrides)))


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)

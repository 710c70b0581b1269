"""Setting up a run, before the loop: the output folder, the data (built and encoded), the config
resolved for this machine, the model with its adapters, and the checkpoint to resume from.
The run object (run.py) calls these in its phases; every check that can refuse the run comes
before the output folder is touched, and every one that does not need the weights before they load."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import DataConfig, RunConfig
from .data.batching import split_validation
from .data.preference import encode_pairs, load_preferences
from .data.preference_tasks import preference_task
from .data.prompts import encode_all
from .data.sources import load_data
from .data.tasks import expand_tasks, is_task, make_task
from .errors import UserError
from .io.models import load_tokenizer, resolve
from .memory.data_size import check_generation
from .memory.preflight import check_rank, module_widths
from .model.convert import Target, convert
from .model.load import copy_out_of_file, load_weights
from .peft.adapters import merge_stage
from .peft.experts import add_expert_lora
from .peft.init import dropout_warning
from .peft.inject import SpecFor, count_parameters, inject, per_module
from .peft.lora import LoraSpec
from .peft.names import filter_layers
from .peft.targets import resolve_targets
from .train import checkpoint
from .train.precision import resolve_precision


def check_output_dir(path: str) -> Path:
    """output_dir as a Path, refused when it names a file; nothing is created (a run creates it
    only once its config and data have been validated)."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UserError(f"config key 'output_dir': {out} exists and is a file")
    return out


def prepare_output_dir(path: str) -> Path:
    out = check_output_dir(path)
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


def _train_counts(n_train, tasks: list[str]) -> dict[str, int]:
    """data.n_train per task: one count for all, or a mapping. Tasks the mapping leaves out get the default
    count, and tasks it names but the run does not train are ignored, so a config's mix survives a
    `data.tasks=...` override; a name that is no task at all is a typo and an error."""
    if isinstance(n_train, int):
        return dict.fromkeys(tasks, n_train)
    unknown = sorted(name for name in n_train if not is_task(name))
    if unknown:
        raise UserError(f"config key 'data.n_train': {unknown[0]!r} is not a task")
    return {t: n_train.get(t, DataConfig.n_train) for t in tasks}


def build_datasets(cfg: RunConfig) -> Datasets:
    d = cfg.data
    train_tasks = [] if d.path else expand_tasks(d.tasks)  # the suite's group names expanded
    eval_tasks = expand_tasks(cfg.eval.tasks) if cfg.eval.tasks is not None else train_tasks
    check_generation(cfg, _train_counts(d.n_train, train_tasks), eval_tasks)  # sizes before generating or reading
    tests = {}
    pairs = cfg.train.objective != "sft"  # preference pairs (data/preference.py), generated or read
    if d.path:
        examples = load_preferences(d.path, d.columns) if pairs else load_data(d.path, d.columns)
    else:
        examples = []
        counts = _train_counts(d.n_train, train_tasks)
        for name in train_tasks:
            train_set, test_set = (preference_task if pairs else make_task)(name, counts[name], cfg.eval.n, d.seed)
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


@dataclass
class ModelSetup:
    """What setup_model decided and built beside the model: logged at the start of a run and
    recorded in summary.json (precision, weights_dtype, converters, parameter counts)."""
    precision: str                    # the resolved train.precision: bf16 or fp32
    weights_dtype: str                # the frozen weights' dtype (bfloat16 / float32)
    converters: dict                  # model rewrites applied and declined, with reasons (model/convert.py)
    targets: list[str] = field(default_factory=list)  # the modules wrapped with LoRA (none: full fine-tuning)
    notes: list[str] = field(default_factory=list)    # lines to log: the converters', then "warning: ..."
    quantized_modules: int | None = None               # NF4 layers (model.quant: nf4), else None
    trainable_params: int = 0
    total_params: int = 0


def setup_model(cfg: RunConfig, device: torch.device, folder: Path | None = None,
                tok=None) -> tuple[torch.nn.Module, object, Path, ModelSetup]:
    """Load the base, optionally quantize it, and choose what trains. Returns (model, tok, folder, setup);
    setup.notes: lines to log (a rank some targeted layers cannot use)."""
    precision = resolve_precision(cfg.train.precision, device)
    full = cfg.train.method == "full"
    # LoRA keeps frozen weights in bf16 (no per-step casts); full fine-tuning keeps fp32 masters.
    dtype = torch.bfloat16 if precision == "bf16" and not full else torch.float32
    spec = None if full else lora_spec(cfg)  # checks r, alpha, dropout before the model loads
    if full and cfg.model.quant != "none":
        raise UserError("config key 'model.quant': a quantized base cannot be fully fine-tuned (use lora)")
    folder = folder or resolve(cfg.model.name)
    tok = tok or load_tokenizer(folder, cfg.model.trust_remote_code)
    model = load_weights(folder, dtype, trust_remote_code=cfg.model.trust_remote_code, device=device,
                         attn_implementation=cfg.model.attn_implementation)
    if cfg.model.adapter:  # a staged run: the earlier stage becomes the base (and DPO's reference)
        model = merge_stage(model, cfg.model.adapter, dtype)
    rewrites = convert(model, cfg.model.converters, Target(torch.device(device), cfg.model.attn_implementation))
    setup = ModelSetup(precision=precision, weights_dtype=str(dtype).replace("torch.", ""),
                       converters=rewrites.as_dict())
    if full:
        model.requires_grad_(True)
    else:
        targets = resolve_targets(model, cfg.lora.targets)
        if cfg.lora.layers is not None:
            targets = filter_layers(targets, cfg.lora.layers)
        modules = dict(model.named_modules())
        widths = module_widths({n: modules[n] for n in targets})
        setup.notes = [f"warning: {w}" for w in check_rank(cfg.lora.r, widths)]  # before any LoRA weight exists
        if note := dropout_warning(cfg.lora.init, cfg.lora.dropout):
            setup.notes.append(f"warning: {note}")
        if cfg.model.quant == "nf4":
            from .peft.quant import quantize_model

            setup.quantized_modules = quantize_model(model, None if cfg.model.quant_all_linear else targets,
                                                     compute_dtype=dtype)
            copy_out_of_file(model)  # the fp32 file's pages that quantization read are released
        setup.targets = inject(model, targets, spec)
        setup.notes += add_expert_lora(model, cfg.lora, spec)  # lora.target_parameters (peft/experts.py)
    setup.notes.insert(0, rewrites.line())
    if cfg.model.adapter:
        setup.notes.insert(0, f"the base is {cfg.model.name} with the adapter {cfg.model.adapter} merged in "
                              f"(model.adapter: a staged run)")
    setup.trainable_params, setup.total_params = count_parameters(model)
    return model, tok, folder, setup


def find_resume(cfg: RunConfig, out: Path, data_sha256: str | None = None) -> tuple[dict | None, list[str]]:
    """The checkpoint to continue from, per `resume` (auto / true / false), or None to start fresh;
    and lines to log (newer checkpoints skipped as unreadable)."""
    if cfg.resume is False:
        return None, []
    snap, skipped = checkpoint.newest_readable(out / "checkpoints")
    if snap is None:
        if cfg.resume is True:
            raise UserError(f"config key 'resume': no checkpoint in {out / 'checkpoints'}")
        return None, []
    last = snap["path"]
    diff = checkpoint.config_difference(snap["config"], cfg.to_dict())
    if diff:
        raise UserError(f"{last}: checkpoint of a different config ({diff}); use another output_dir, "
                        "or resume=false to start over")
    if snap["data_sha256"] and data_sha256 and snap["data_sha256"] != data_sha256:
        what = f"data.path {cfg.data.path}" if cfg.data.path else "the generated data"
        raise UserError(f"{last}: the training data changed since this checkpoint ({what}: fingerprint "
                        f"{snap['data_sha256'][:12]} then, {data_sha256[:12]} now); restore it, use another "
                        "output_dir, or resume=false to start over")
    return snap, [f"warning: {line}; skipped, resuming from the one before" for line in skipped]


def encode_datasets(data: Datasets, tok, cfg: RunConfig) -> tuple[list, dict, list]:
    """(train, its stats, validation) as token ids with loss masks; truncation counted."""
    kw = dict(template=cfg.data.template, system_prompt=cfg.data.system_prompt, max_seq_len=cfg.data.max_seq_len)
    encode = encode_all if cfg.train.objective == "sft" else encode_pairs  # pairs: both rows encoded
    train_enc, train_stats = encode(data.train, tok, **kw)
    return train_enc, train_stats, (encode(data.val, tok, **kw)[0] if data.val else [])

"""Fail before the damage: the checks a run makes before it allocates anything big.

- **Memory** (`check_memory`): the analytic estimate (memory.estimate) for the run's own config and
  its longest example, against what the device has: on the CPU the smallest of MemAvailable, the
  cgroup's limit less its usage (v1 or v2, every level up the hierarchy) and `ulimit -v`
  (RLIMIT_AS less the address space already mapped); on CUDA the device's free memory. A run that
  will not fit is refused with one line: the estimate, what is available, and the cheapest changes
  that fit as config overrides (memory.fixes.suggest_fixes). `train.preflight: warn` turns the
  refusal into a warning, `off` skips it. Architectures the estimate does not model get a warning,
  never a refusal.
- **Disk** (`check_disk`): the checkpoint the run will write (and its adapter) against the free
  space of output_dir's file system; under `train.preflight` like memory.
- **Limits** that are always errors: a LoRA rank no targeted layer can use (`check_rank`), an
  example longer than the model's context, no training example left.

pipeline.run_training calls `check_before_loading` once the data is encoded (the longest example is
known) and before the model's weights load, and `check_disk` once the trainable parameters are counted.
"""
from __future__ import annotations

import importlib.util
import re
import resource
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..peft.layout import features
from ..peft.presets import OUTPUT_LAYER
from .arch import arch_from_config, lora_layers, resolve_model_config
from .estimate import CPU_RUNTIME_BYTES, OPTIMIZERS, estimate, run_settings
from .fixes import suggest_fixes
from .measure import current_rss_bytes, fmt_bytes

CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
CHECKPOINT_EXTRA_BYTES = 1 << 20  # state.json, RNG states, safetensors headers: a few KB each, rounded up
UNLIMITED = 1 << 60               # cgroup v1 writes "no limit" as ~2^63


@dataclass(frozen=True)
class Room:
    """Bytes the run can still take from `source`, counted from now."""
    bytes: int
    source: str


# ---------------------------------------------------------------------------------------------
# What the device has

def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit


def _meminfo_room(proc: Path) -> Room | None:
    try:
        m = re.search(r"^MemAvailable:\s+(\d+) kB", (proc / "meminfo").read_text(), re.M)
    except OSError:
        return None
    return Room(int(m.group(1)) * 1024, "MemAvailable") if m else None


def _cgroup_rooms(proc: Path, root: Path) -> list[Room]:
    """limit - usage at every level from this process's memory cgroup up to the root: a parent's
    limit binds the children too. In a container the hierarchy is often mounted at its own level,
    so a path that does not exist under `root` leaves the mount's top level alone to read."""
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return []
    rooms = []
    for line in lines:
        hier, controllers, rel = (line.split(":", 2) + ["", ""])[:3]
        if hier == "0" and controllers == "":  # v2: one unified hierarchy
            base = root if (root / "cgroup.controllers").exists() else root / "unified"
            limit_file, usage_file = "memory.max", "memory.current"
        elif "memory" in controllers.split(","):  # v1: the memory controller's own hierarchy
            base, limit_file, usage_file = root / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes"
        else:
            continue
        folder = base / rel.lstrip("/")
        while True:
            limit, usage = _read_int(folder / limit_file), _read_int(folder / usage_file)
            if limit is not None and usage is not None and limit < UNLIMITED:
                rooms.append(Room(limit - usage, f"cgroup {limit_file} {fmt_bytes(limit)}"))
            if folder == base or base not in folder.parents:
                break
            folder = folder.parent
    return rooms


def _address_space_room(proc: Path) -> Room | None:
    """`ulimit -v` (RLIMIT_AS) less the address space this process has already mapped (VmSize)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        m = re.search(r"^VmSize:\s+(\d+) kB", (proc / "self" / "status").read_text(), re.M)
    except OSError:
        m = None
    mapped = int(m.group(1)) * 1024 if m else 0
    return Room(soft - mapped, f"ulimit -v {fmt_bytes(soft)}")


def cpu_room(proc: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup")) -> Room | None:
    """The tightest of MemAvailable, the cgroup limits and RLIMIT_AS, or None if none can be read."""
    rooms = [r for r in (_meminfo_room(proc), *_cgroup_rooms(proc, cgroup_root), _address_space_room(proc)) if r]
    return min(rooms, key=lambda r: r.bytes) if rooms else None


def device_room(device) -> Room | None:
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)  # creates the CUDA context first: `free` is net of it
        return Room(int(free), f"free on {device}")
    return cpu_room() if device.type == "cpu" else None


# ---------------------------------------------------------------------------------------------
# Memory

@dataclass(frozen=True)
class MemoryVerdict:
    fits: bool | None     # None: the estimate does not cover this model or the room cannot be read
    line: str             # the one line to show


def _as_overrides(change: dict) -> str | None:
    """A suggest_fixes change as `key=value` overrides, or None when loralab has no such setting."""
    keys = {"batch": "train.batch_size", "grad_accum": "train.grad_accum", "seq": "data.max_seq_len",
            "r": "lora.r", "grad_checkpointing": "train.gradient_checkpointing"}
    methods = {"qlora": "model.quant=nf4", "lora": "train.method=lora"}
    out = []
    for k, v in change.items():
        if k in keys:
            out.append(f"{keys[k]}={str(v).lower() if isinstance(v, bool) else v}")
        elif k == "method" and v in methods:
            out.append(methods[v])
        else:
            return None  # e.g. 8-bit AdamW: not a loralab optimizer
    return " ".join(out)


def _fixes_text(fixes: list[dict]) -> str:
    usable = [(_as_overrides(f["settings"]), f) for f in fixes]
    usable = [(o, f) for o, f in usable if o]
    fitting = [f"{o} ({fmt_bytes(f['peak_bytes'])})" for o, f in usable if f["fits"]]
    if not fitting:
        return "no change to micro batch, checkpointing, quantization, sequence length or rank fits"
    return "fits with " + " | ".join(fitting[:3])


def budget_of(room: Room, device: str) -> tuple[int, str]:
    """(bytes an estimate that counts the whole process may reach, the words saying so): see check_memory."""
    held = min(current_rss_bytes(), CPU_RUNTIME_BYTES) if device == "cpu" else 0
    budget = max(room.bytes, 0) + held
    return budget, f"{fmt_bytes(budget)} available ({room.source}" + (f", + {fmt_bytes(held)} this process holds)"
                                                                     if held else ")")


def check_memory(cfg, model_config: dict, device, seq: int, room: Room | None) -> MemoryVerdict:
    """Does the run's estimated peak fit `room` (device_room) plus what this process already holds?

    The estimate counts the whole process, but `room` starts from now, when this process already
    holds the Python/torch/transformers runtime and the tokenizer (~0.55 GB, the estimate's runtime
    term; no weights yet). So on the CPU the budget is room + min(RSS now, that term). On CUDA the
    room is counted after the context exists and nothing of the run is allocated: no credit
    (conservative by the estimate's cuBLAS workspace, a few hundred MB)."""
    try:
        settings = run_settings(cfg, device, seq)
        est = estimate(model_config, **settings)
    except UserError as e:
        return MemoryVerdict(None, f"no memory estimate for this model ({e}); the pre-flight memory check is skipped")
    peak = est["peak_bytes"]
    if room is None:
        return MemoryVerdict(None, f"pre-flight: estimated peak {fmt_bytes(peak)}; available memory unknown")
    budget, where = budget_of(room, settings["device"])
    shape = f"micro batch {settings['batch']} x {seq} tokens"
    if peak <= budget:
        return MemoryVerdict(True, f"pre-flight: estimated peak {fmt_bytes(peak)} ({shape}) of {where}")
    fixes = suggest_fixes(model_config, budget / 2**30, **settings)  # takes GiB
    return MemoryVerdict(False, f"not enough memory: estimated peak {fmt_bytes(peak)} ({shape}) > {where}; "
                                f"{_fixes_text(fixes)}; set train.preflight=warn to run anyway")


# ---------------------------------------------------------------------------------------------
# Limits a config can break

def check_rank(r: int, widths: dict[str, tuple[int, int]]) -> list[str]:
    """widths: targeted module (short name) -> (in_features, out_features). A rank-r update of an
    in x out layer has rank at most min(in, out): above every targeted layer's, the rank is an
    error (no update can use it, and it only costs memory); above some, a warning."""
    if not widths:
        return []
    usable = {name: min(shape) for name, shape in widths.items()}
    widest = max(usable, key=usable.get)
    if r > usable[widest]:
        raise UserError(f"config key 'lora.r' is {r}, above what any targeted layer can use: an update of an "
                        f"in x out layer has rank at most min(in, out), {usable[widest]} for the widest ({widest} "
                        f"{widths[widest][0]} x {widths[widest][1]}); set lora.r <= {usable[widest]}")
    narrow = sorted(n for n, u in usable.items() if u < r)
    if not narrow:
        return []
    return [f"lora.r={r} is above min(in, out) of {', '.join(narrow)} ({min(usable[n] for n in narrow)}): "
            f"their updates cannot use the extra rank, which only costs memory"]


def module_widths(modules: dict) -> dict[str, tuple[int, int]]:
    """Full module name -> module (nn.Linear-like, or GPT-2's Conv1D, whose weight is (in, out)) as
    short name -> (in, out), the narrowest per name."""
    out: dict[str, tuple[int, int]] = {}
    for name, m in modules.items():
        shape = features(m)
        if shape is None:  # not a linear layer: no rank limit to read
            continue
        short = name.rpartition(".")[2]
        if short not in out or min(shape) < min(out[short]):
            out[short] = shape
    return out


def _config_widths(cfg, model_config: dict) -> dict[str, tuple[int, int]]:
    """The targeted layers' shapes from config.json, by short name, the narrowest per name ({} when not
    modelled)."""
    try:
        a = arch_from_config(model_config)
        wrapped, head = lora_layers(a, cfg.lora.targets)
    except UserError:  # another architecture, or a regex target: checked once the model is loaded
        return {}
    out: dict[str, tuple[int, int]] = {OUTPUT_LAYER: (a.hidden, a.vocab)} if head else {}
    for i, keys in enumerate(wrapped):
        for key in keys:
            fan_in, fan_out, _ = a.linears(i)[key]
            short = key.rpartition(".")[2]
            if short not in out or min(fan_in, fan_out) < min(out[short]):
                out[short] = (fan_in, fan_out)
    return out


def context_of(model_config: dict) -> tuple[str, int] | None:
    inner = model_config.get("text_config")
    for source in (model_config, inner if isinstance(inner, dict) else {}):
        for key in CONTEXT_KEYS:
            if isinstance(source.get(key), int) and source[key] > 0:
                return key, source[key]
    return None


def check_before_loading(cfg, folder, device, train_enc: list) -> list[str]:
    """Every check that needs the encoded data and config.json but no weights. Raises UserError for
    a run that cannot work; returns lines to log (warnings, the memory verdict)."""
    if cfg.model.quant == "nf4" and importlib.util.find_spec("torchao") is None:
        raise UserError("config key 'model.quant' is nf4, which needs torchao: pip install 'loralab[qlora]'")
    if not train_enc:
        raise UserError("no training examples left after truncation and drops (config key 'data.path' or "
                        "'data.tasks' gives none)")
    longest = max(len(e.input_ids) for e in train_enc)
    model_config = resolve_model_config(str(folder))
    ctx = context_of(model_config)
    if ctx and longest > ctx[1]:
        raise UserError(f"config key 'data.max_seq_len' is {cfg.data.max_seq_len}: the longest example has {longest} "
                        f"tokens, above the model's context of {ctx[1]} ({ctx[0]}); set data.max_seq_len={ctx[1]} "
                        "(longer examples are truncated)")
    if cfg.train.method != "full":
        check_rank(cfg.lora.r, _config_widths(cfg, model_config))  # errors only; the loaded model warns
    if cfg.train.preflight == "off":
        return []
    verdict = check_memory(cfg, model_config, device, longest, device_room(device))
    if verdict.fits is False and cfg.train.preflight == "error":
        raise UserError(verdict.line)
    return [verdict.line if verdict.fits else f"warning: {verdict.line}"]


# ---------------------------------------------------------------------------------------------
# Disk

def checkpoint_bytes(trainable: int, cfg) -> int:
    """A checkpoint's size: fp32 trainable weights, the optimizer's state, and small files."""
    state = OPTIMIZERS[cfg.train.optimizer] if cfg.train.optimizer != "sgd" or cfg.train.momentum > 0 else 0.0
    return int(trainable * (4 + state)) + CHECKPOINT_EXTRA_BYTES


def bytes_to_write(trainable: int, cfg) -> int:
    """What a run needs free at its largest save: a new checkpoint (written before old ones are
    pruned), plus the adapter (fp32 LoRA factors) and, with validation, the best adapter."""
    adapters = 0
    if cfg.train.method == "lora":
        adapters = (2 if cfg.train.eval_every else 1) * (trainable * 4 + CHECKPOINT_EXTRA_BYTES)
    return checkpoint_bytes(trainable, cfg) + adapters


def free_disk_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def check_disk(out: Path, trainable: int, cfg) -> list[str]:
    """Refuse (train.preflight: error) a run whose output_dir cannot hold its checkpoint and adapter."""
    if cfg.train.preflight == "off":
        return []
    need, free = bytes_to_write(trainable, cfg), free_disk_bytes(out)
    if need <= free:
        return []
    line = (f"config key 'output_dir': {out} has {fmt_bytes(free)} free, the run writes a {fmt_bytes(need)} "
            f"checkpoint and adapter ({trainable:,} trainable parameters); free some space or choose another "
            "output_dir (train.preflight=warn to run anyway)")
    if cfg.train.preflight == "error":
        raise UserError(line)
    return [f"warning: {line}"]

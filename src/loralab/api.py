"""loralab's Python API: train(), estimate(), load(). `loralab train`, `loralab estimate` and
`loralab generate` do what these do; the package exports them lazily (importing loralab stays cheap).

    import loralab
    result = loralab.train("demo", train__max_steps=4, output_dir="runs/try")
    print(result.summary["eval"], result.adapter_dir)
    loralab.estimate("llama-2-7b", method="qlora", seq=2048)["peak_bytes"]
    loralab.load(adapter=result.adapter_dir).generate(["What is 17 plus 25?"])

Overrides are config keys as keyword arguments, a double underscore for each dot
(`train__max_steps=4` is `train.max_steps=4`); a dict of dotted keys works too
(`**{"train.max_steps": 4}`). Values are Python values (lists, numbers, booleans, strings).
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import RunConfig, apply_overrides, from_dict, load_config
from .errors import UserError


@dataclass
class RunResult:
    """What a training run returns: its summary.json as a dict, its folder and adapter folder."""
    summary: dict
    output_dir: Path
    adapter_dir: Path | None      # None: full fine-tuning writes no adapter
    config: RunConfig

    @property
    def best_adapter_dir(self) -> Path | None:
        """The adapter of the lowest validation loss (train.eval_every), when the run kept one."""
        best = self.summary.get("best_adapter_dir")
        return Path(best) if best else None


def override_strings(overrides: dict[str, Any]) -> list[str]:
    """Keyword overrides as the CLI's `key.sub=value` strings: `__` in a name is a dot; values
    other than strings written as JSON (which YAML reads back as the same value)."""
    out = []
    for key, value in overrides.items():
        text = value if isinstance(value, str) else json.dumps(value)
        out.append(f"{key.replace('__', '.')}={text}")
    return out


def load_run_config(config_or_path: str | Path | RunConfig | dict | None = None,
                    overrides: list[str] = ()) -> RunConfig:
    """A validated RunConfig from a YAML path, a shipped config's name (`demo`), a RunConfig or a
    dict of sections (None: the defaults), with `key.sub=value` override strings applied."""
    if isinstance(config_or_path, RunConfig):
        return _with_overrides(config_or_path.to_dict(), overrides)
    if isinstance(config_or_path, dict):
        return _with_overrides(config_or_path, overrides)
    if config_or_path is not None and not isinstance(config_or_path, (str, Path)):
        raise UserError(f"config: expected a path, a shipped config's name, a RunConfig or a dict, "
                        f"got {type(config_or_path).__name__}")
    path = None
    if config_or_path is not None:
        from .shipped import resolve_config

        path = resolve_config(str(config_or_path))  # `demo`: the shipped config, from any folder
    return load_config(path, list(overrides))


def _with_overrides(data: dict, overrides: list[str]) -> RunConfig:
    return from_dict(apply_overrides(copy.deepcopy(data), list(overrides)))


def run(cfg: RunConfig, *, quiet: bool = False, data=None) -> RunResult:
    """Train one validated config (the run object, run.py) and return its result."""
    from .run import Run

    summary = Run(cfg, quiet=quiet, data=data).execute()
    adapter = summary.get("adapter_dir")
    return RunResult(summary=summary, output_dir=Path(cfg.output_dir), adapter_dir=Path(adapter) if adapter else None,
                     config=cfg)


def train(config_or_path: str | Path | RunConfig | dict | None = None, /, *, quiet: bool = False,
          **overrides) -> RunResult:
    """Fine-tune as `loralab train` does; returns a RunResult (summary, output_dir, adapter_dir).

    config_or_path: a YAML file, a shipped config's name (`"demo"`), a RunConfig, a dict of sections,
    or None (every default). overrides: config keys, `__` for each dot (`lora__r=16`,
    `train__max_steps=4`, `output_dir="runs/x"`), or dotted keys through a dict
    (`**{"lora.r": 16}`). quiet: no progress lines on stderr.
    Bad input raises loralab.errors.UserError (one line naming the key or file); a run into a folder
    that already holds this very run, finished, returns its summary without training again."""
    return run(load_run_config(config_or_path, override_strings(overrides)), quiet=quiet)


def estimate(model: str = "smollm2-135m", *, method: str = "lora", r: int = 8, targets: str = "all-linear",
             seq: int = 512, batch: int = 1, grad_accum: int = 1, optimizer: str = "adamw", precision: str = "bf16",
             grad_checkpointing: bool = False, dora: bool = False, device: str = "cuda", gpus: int = 1,
             fsdp: bool = False, gpu_gb: float | None = None) -> dict:
    """Predicted peak training memory per GPU from the model's config alone (no weights), as
    `loralab estimate`: a dict with peak_bytes and its breakdown; with gpu_gb, `fixes`: the cheapest
    changes that make the run fit (empty when it fits).

    model: a bundled config (llama-2-7b, mistral-7b, smollm2-135m, ...), an HF folder or a config.json.
    method: lora | qlora | full. The other arguments are `loralab estimate`'s options."""
    from .memory.arch import resolve_model_config
    from .memory.fixes import suggest_fixes
    from .memory.sharding import estimate_per_gpu
    from .runtime.allocator import active

    if fsdp and gpus < 2:
        raise UserError(f"fsdp shards across GPUs: give gpus=2 or more (got gpus={gpus})")
    settings = dict(method=method, r=r, targets=targets, seq=seq, batch=batch, optimizer=optimizer,
                    precision=precision, grad_checkpointing=grad_checkpointing, device=device,
                    grad_accum=grad_accum, gpus=gpus, fsdp=fsdp, dora=dora, malloc=active())
    model_config = resolve_model_config(model)
    result = estimate_per_gpu(model_config, **settings)
    if gpu_gb:
        result = {**result, "fixes": suggest_fixes(model_config, gpu_gb, estimator=estimate_per_gpu, **settings)}
    return result


@dataclass
class Loaded:
    """A base model with an adapter applied (or the base alone), ready to generate."""
    model: Any
    tokenizer: Any
    base: str
    adapter: str | None = None

    def generate(self, prompts: str | list[str], *, max_new_tokens: int = 128, raw: bool = False,
                 batch_size: int = 8) -> list[str]:
        """Greedy answers, one per prompt. Each prompt goes through the tokenizer's chat template as
        one user turn (raw=True: the text as it is, as a prompt/response run with template raw trained)."""
        from .eval.metrics import generate_answers
        from .inference import chat_prompt

        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        texts = prompts if raw else [chat_prompt(self.tokenizer, [{"role": "user", "content": p}]) for p in prompts]
        return generate_answers(self.model, self.tokenizer, texts, batch_size=batch_size,
                                max_new_tokens=max_new_tokens, stop_at_newline=False)


def load(model: str | None = None, adapter: str | Path | None = None) -> Loaded:
    """Load a base model (a bundled name, an HF folder or a GGUF; default: the adapter's own base,
    else smollm2-135m) with an adapter folder (PEFT format) applied, for generation, as `loralab generate`."""
    from .inference import DEFAULT_MODEL, adapter_base, load_with_adapter

    adapter = str(adapter) if adapter is not None else None
    m, tok = load_with_adapter(model, adapter)
    return Loaded(model=m, tokenizer=tok, base=model or adapter_base(adapter) or DEFAULT_MODEL, adapter=adapter)


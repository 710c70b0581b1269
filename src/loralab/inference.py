"""Using a trained adapter: load base + adapter, evaluate, generate, chat, merge into an HF folder."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import ModelConfig
from .data.prompts import stop_token_ids
from .data.tasks import expand_tasks, make_task
from .errors import UserError
from .eval.metrics import exact_match, generate_answers
from .io.export import new_output_folder, save_hf_folder
from .io.models import stored_dtype
from .model.load import load_model
from .peft.adapter_files import earlier_stage
from .peft.adapters import load_adapter
from .peft.merge import merge_and_unload

DEFAULT_MODEL = ModelConfig.name  # the config's default model


def adapter_base(adapter_dir: str | None) -> str | None:
    """The base model an adapter was trained on (its adapter_config.json's base_model_name_or_path)."""
    if not adapter_dir:
        return None
    cfg_path = Path(adapter_dir) / "adapter_config.json"
    if not cfg_path.exists():
        raise UserError(f"{cfg_path}: adapter folder has no adapter_config.json")
    try:
        return json.loads(cfg_path.read_text()).get("base_model_name_or_path")
    except json.JSONDecodeError as e:
        raise UserError(f"{cfg_path}:{e.lineno}: invalid JSON ({e.msg})") from None


def load_with_adapter(model: str | None, adapter_dir: str | None, dtype: torch.dtype = torch.float32,
                      *, with_folder: bool = False):
    """(model, tokenizer) for a base spec (default: the adapter's base) with the adapter applied;
    with_folder: (model, tokenizer, the base's local folder)."""
    spec = model or adapter_base(adapter_dir) or DEFAULT_MODEL
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base, tok, folder = load_model(spec, dtype, device=device)
    if adapter_dir:
        load_adapter(base, adapter_dir)
    base.eval()
    return (base, tok, folder) if with_folder else (base, tok)


def evaluate_model(model: str | None, adapter_dir: str | None, *, tasks: list[str], n: int = 100,
                   batch_size: int = 50, template: str = "auto", data_seed: int = 1234) -> dict:
    """Exact match on each task's held-out questions: "eval" scores the model as given (base + adapter,
    or the base alone); with an adapter, "base" scores the base alone too, from the same load (the
    adapter is applied after). data_seed matches DataConfig.seed: the questions a run evaluated."""
    spec = model or adapter_base(adapter_dir) or DEFAULT_MODEL
    tests = {name: make_task(name, 1, n, data_seed)[1] for name in expand_tasks(tasks)}  # groups: their families
    max_new_tokens = _check_evaluation(spec, tests, n=n, batch_size=batch_size, template=template)
    m, tok = load_with_adapter(spec, None)

    def scores() -> dict:
        out = {}
        for name, test in tests.items():
            r = exact_match(m, tok, test, template=template, batch_size=batch_size, max_new_tokens=max_new_tokens)
            out[name] = {k: r[k] for k in ("accuracy", "correct", "n")}
        return out

    base = scores() if adapter_dir else None
    if adapter_dir:
        load_adapter(m, adapter_dir)
        m.eval()
    result = {"model": spec, "adapter": adapter_dir, "eval": scores()}
    if base is not None:
        result["base"] = base
    return result


def _check_evaluation(spec: str, tests: dict, *, n: int, batch_size: int, template: str) -> int:
    """The training run's evaluation pre-flight (memory/generation.py) for `loralab eval`, before any
    weight loads: a batch that cannot fit is refused with the one that does. Returns the answers'
    token budget (eval.max_new_tokens, the run's)."""
    import sys

    from .config import load_config
    from .io.models import load_tokenizer, resolve
    from .memory.generation import check_evaluation
    from .prepare import Datasets

    folder = resolve(spec)
    cfg = load_config(None, [f"model.name={folder}", f"eval.n={n}", f"eval.batch_size={batch_size}",
                             f"data.template={template}"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        lines = check_evaluation(cfg, folder, device, Datasets([], [], tests), load_tokenizer(folder, False),
                                 context=False)
    except UserError as e:  # in this command's words: its options, no run config to relax
        text = str(e).split("; set train.preflight=warn")[0]
        raise UserError(text.replace("eval.batch_size", "--batch-size").replace("eval.max_new_tokens",
                                                                               "the answers' max_new_tokens")) from None
    for line in lines:
        print(f"loralab: {line}", file=sys.stderr)
    return cfg.eval.max_new_tokens


def format_eval(result: dict) -> str:
    """Each task's exact match: with an adapter, the base beside it (as `--harness` shows it)."""
    after, base = result["eval"], result.get("base")
    width = max(6, *map(len, after))
    pct = lambda r: f"{100 * r['accuracy']:.1f}% ({r['correct']}/{r['n']})"
    if base is None:
        return "\n".join(f"{name:<{width}} {pct(r):>16}" for name, r in after.items())
    lines = [f"{'task':<{width}} {'base':>16} {'adapter':>16}   change (exact match, held-out)"]
    for name, r in after.items():
        b = base[name]
        lines.append(f"{name:<{width}} {pct(b):>16} {pct(r):>16}   {100 * (r['accuracy'] - b['accuracy']):+.1f} pts")
    return "\n".join(lines)


def trained_on(adapter_dir: str) -> dict | None:
    """What an adapter was trained on, from its run folder's config.yaml (the adapter's parent, or
    the folder itself): {"path": data.path} or {"tasks": [the tasks, groups expanded]}. None when no
    readable config says."""
    import yaml

    for folder in (Path(adapter_dir), Path(adapter_dir).parent):
        try:
            data = yaml.safe_load((folder / "config.yaml").read_text()).get("data") or {}
        except (OSError, ValueError, AttributeError, yaml.YAMLError):
            continue
        if data.get("path"):
            return {"path": str(data["path"])}
        try:
            return {"tasks": expand_tasks(data.get("tasks") or [])}
        except UserError:
            return None
    return None


def task_mismatch(adapter_dir: str, tasks: list[str]) -> str | None:
    """One warning line when the tasks evaluated are not what the adapter trained on, else None."""
    trained = trained_on(adapter_dir)
    evaluated = expand_tasks(tasks)
    if trained is None:
        return None
    if "path" in trained:
        return (f"{adapter_dir} was trained on data.path {trained['path']} (its run's config.yaml), not on "
                f"{', '.join(evaluated)}: these scores do not measure what it learned")
    never = [t for t in evaluated if t not in trained["tasks"]]
    if not never:
        return None
    return (f"{adapter_dir} was trained on {', '.join(trained['tasks']) or 'no tasks'}; "
            f"{', '.join(never)} {'is' if len(never) == 1 else 'are'} not among them (held out from its training)")


def harness_before_after(model: str | None, adapter_dir: str | None, *, tasks: list[str], include_path=(),
                         batch_size: int = 32, limit: int | None = None) -> dict:
    """lm-eval on the base alone (before) and with the adapter (after), one model load."""
    from .eval.harness import run_harness

    spec = model or adapter_base(adapter_dir) or DEFAULT_MODEL
    m, tok = load_with_adapter(spec, None)
    kw = dict(include_path=list(include_path), batch_size=batch_size, limit=limit)
    out = {"model": spec, "adapter": adapter_dir, "before": run_harness(m, tok, tasks, **kw)["results"] if adapter_dir
           else None}
    if adapter_dir:
        load_adapter(m, adapter_dir)
        m.eval()
    out["after"] = run_harness(m, tok, tasks, **kw)["results"]
    return out


def chat_prompt(tok, history: list[dict]) -> str:
    """The conversation as the model's chat template renders it, ready for the assistant's turn."""
    if tok.chat_template:
        return tok.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in history)
    return text + "assistant:"


def generate_once(model: str | None, adapter_dir: str | None, prompt: str, *, max_new_tokens: int = 128,
                  raw: bool = False) -> str:
    m, tok = load_with_adapter(model, adapter_dir)
    text = prompt if raw else chat_prompt(tok, [{"role": "user", "content": prompt}])
    return generate_answers(m, tok, [text], batch_size=1, max_new_tokens=max_new_tokens, stop_at_newline=False)[0]


def chat(model: str | None, adapter_dir: str | None, *, max_new_tokens: int = 256) -> None:
    m, tok = load_with_adapter(model, adapter_dir)
    history: list[dict] = []
    print("loralab chat: empty line or Ctrl-D to quit")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        history.append({"role": "user", "content": line})
        reply = generate_answers(m, tok, [chat_prompt(tok, history)], batch_size=1,
                                 max_new_tokens=max_new_tokens, stop_at_newline=False)[0].strip()
        history.append({"role": "assistant", "content": reply})
        print(f"model> {reply}")


MERGE_DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def merged_model(adapter_dir: str, model: str | None = None):
    """(base with the adapter merged in, fp32 plain nn.Linear (or Conv1D) layers; tokenizer; the base's folder)."""
    m, tok, folder = load_with_adapter(model, adapter_dir, dtype=torch.float32, with_folder=True)
    merge_and_unload(m)  # in fp32: the caller casts
    return m, tok, folder


def set_stop_tokens(model, tok) -> list[int]:
    """The tokenizer's stop tokens (EOS, and the chat template's end of turn) as the model's
    generation eos_token_id, so generate() on a saved folder stops where training taught it to.
    (Bases converted from elsewhere often carry another id, e.g. <|endoftext|> for a chat model.)"""
    stops = stop_token_ids(tok)
    if stops:
        model.generation_config.eos_token_id = stops[0] if len(stops) == 1 else stops
        model.config.eos_token_id = stops[0]
    if tok.pad_token_id is not None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return stops


def merge_to_folder(adapter_dir: str, out_dir: str, *, dtype: str = "auto", model: str | None = None) -> Path:
    """Merge the adapter into its base; write an HF folder (safetensors + tokenizer) atomically.

    dtype "auto" keeps the base's stored dtype: an fp32 base merged into bf16 would round every
    weight (logits off by ~0.3 on the default model). generation_config.json carries the tokenizer's
    stop tokens (set_stop_tokens)."""
    if dtype not in MERGE_DTYPES:
        raise UserError(f"merge dtype must be one of {', '.join(MERGE_DTYPES)}, got {dtype!r}")
    out = new_output_folder(out_dir)
    m, tok, folder = merged_model(adapter_dir, model)
    m.to(MERGE_DTYPES[dtype] or stored_dtype(folder))
    set_stop_tokens(m, tok)
    return save_hf_folder(m, tok, out)


def export_gguf(adapter_dir: str | None, *, lora_out: str | None = None, merged_out: str | None = None,
                outtype: str = "f16", model: str | None = None) -> list[Path]:
    """`loralab export`: the adapter as a llama.cpp LoRA GGUF (lora_out) and/or base + adapter merged
    into one complete GGUF with its tokenizer (merged_out; without an adapter, the base alone)."""
    import tempfile

    from .io.gguf import LoraFactors, write_lora_gguf, write_model_gguf
    from .peft.adapter_files import read_adapter_config
    from .peft.lora import lora_modules

    if not lora_out and not merged_out:
        raise UserError("export: give --gguf OUT.gguf (the adapter) and/or --merged-gguf OUT.gguf (the merged model)")
    if lora_out and not adapter_dir:
        raise UserError("export: --gguf writes an adapter; give the adapter folder")
    for out in filter(None, (lora_out, merged_out)):
        if Path(out).exists():
            raise UserError(f"{out}: exists; remove it or choose another output file")
    if lora_out and read_adapter_config(adapter_dir).get("target_parameters"):
        raise UserError(f"export: {adapter_dir} has LoRA on fused expert weights (target_parameters), which "
                        f"loralab's GGUF export does not map; `loralab merge` folds it into an HF folder")
    if lora_out and (first := earlier_stage(adapter_dir)) is not None:
        raise UserError(f"export: {adapter_dir} applies on top of {first} merged into the base (a staged run); "
                        f"a llama.cpp adapter of the plain base cannot hold that: use --merged-gguf")
    m, tok, folder = load_with_adapter(model, adapter_dir, dtype=torch.float32, with_folder=True)
    written = []
    if lora_out:
        alpha = float(json.loads((Path(adapter_dir) / "adapter_config.json").read_text()).get("lora_alpha", 8))
        factors = [LoraFactors(name, mod.lora_A.weight, mod.lora_B.weight, mod.scaling)
                   for name, mod in lora_modules(m)]
        written.append(write_lora_gguf(lora_out, m.config, factors, alpha=alpha, name=Path(adapter_dir).name))
    if merged_out:
        merge_and_unload(m)
        stops = set_stop_tokens(m, tok)
        adds_bos = bool(tok.bos_token_id is not None and tok("a")["input_ids"][:1] == [tok.bos_token_id])
        eot = next((i for i in stops if i != tok.eos_token_id), None)  # the chat template's end of turn
        with tempfile.TemporaryDirectory(prefix="loralab-gguf-tok-") as tok_dir:
            tok.save_pretrained(tok_dir)
            written.append(write_model_gguf(merged_out, m.config, m.state_dict(), Path(tok_dir), outtype=outtype,
                                            name=Path(adapter_dir or folder).name, adds_bos=adds_bos, eot_id=eot))
    return written

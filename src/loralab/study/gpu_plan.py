"""The `--scale gpu` plan: before a GPU study starts (and in its dry run), each cell's expected
peak memory and time per run, from the estimates alone (memory/estimate.py, memory/throughput.py).

Token counts come from the cell's own data, rendered with the model's tokenizer (a sample of at
most SAMPLE examples): the mean sets the time, the longest sets the peak. Nothing loads weights,
and a plan needs only the model's config: `model.name` may be anything `loralab estimate` takes (a
bundled config such as llama-2-7b, a folder holding just config.json, a config.json). Without a
tokenizer beside the config, tokens are counted as CHARS_PER_TOKEN characters each (the plan says so).
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from ..io.models import load_tokenizer, resolve
from ..memory.arch import resolve_model_config
from ..memory.estimate import estimate_for_run
from ..memory.throughput import estimate_seconds
from .spec import Study, run_config

SAMPLE = 2000  # examples tokenized per distinct data config
CHARS_PER_TOKEN = 4  # English text in a BPE vocabulary of ~32k-50k: a rough count when there is no tokenizer
TEMPLATE_TOKENS = 10  # what a chat template adds around one turn, roughly
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def model_source(name: str) -> tuple[dict, Path | None]:
    """(the model's config dict, a folder with its tokenizer or None) for a plan: the config is all
    it needs, so a bundled config name or a config-only folder is enough (no weights are looked for)."""
    try:
        config = resolve_model_config(name)
    except UserError:  # a .gguf, a hub id in the cache, a bundled model: a folder with weights and tokenizer
        try:
            folder = resolve(name)
            return resolve_model_config(str(folder)), folder
        except UserError as e:
            raise UserError(f"--scale gpu plan: model.name={name}: {e}") from None
    p = Path(name).expanduser()
    folder = p if p.is_dir() else p.parent if p.is_file() else None
    if folder is not None and any((folder / f).is_file() for f in TOKENIZER_FILES):
        return config, folder
    return config, None


def _approx_length(ex) -> int:
    text = "".join(str(m.get("content", "")) for m in ex.messages) if ex.messages else ex.prompt + ex.response
    return len(text) // CHARS_PER_TOKEN + TEMPLATE_TOKENS


def _token_stats(cfg, cache: dict, tokenizer_folder: Path | None) -> dict:
    """{n_train, mean, longest, eval_prompts} of a run's data (cached per data + eval config)."""
    key = json.dumps([cfg.to_dict()["data"], cfg.to_dict()["eval"], cfg.model.name], sort_keys=True, default=str)
    if key not in cache:
        from ..data.prompts import encode_all
        from ..prepare import build_datasets  # data only: no model loads

        data = build_datasets(cfg)
        step = max(1, len(data.train) // SAMPLE)
        if tokenizer_folder is None:
            lengths = [min(_approx_length(ex), cfg.data.max_seq_len) for ex in data.train[::step]] or [1]
        else:
            tok = load_tokenizer(tokenizer_folder, cfg.model.trust_remote_code)
            encoded, _ = encode_all(data.train[::step], tok, template=cfg.data.template,
                                    system_prompt=cfg.data.system_prompt, max_seq_len=cfg.data.max_seq_len)
            lengths = [len(e.input_ids) for e in encoded] or [1]
        cache[key] = {"n_train": len(data.train), "mean": sum(lengths) / len(lengths), "longest": max(lengths),
                      "eval_prompts": sum(len(t) for t in data.tests.values())}
    return cache[key]


def plan_rows(study: Study, gpu: str | None = None) -> list[dict]:
    """One row per cell (and sweep point): runs, steps, tokens, estimated peak memory and time."""
    from ..train.optim import plan_steps

    first = run_config(study, study.cells[0], study.cells[0].seeds[0], Path("runs/plan"))
    model_config, tokenizer_folder = model_source(first.model.name)
    cache: dict = {}
    rows = []
    for cell in study.cells:
        points = [(p, len(cell.sweep_seeds)) for p, _ in cell.points] if cell.points else [(None, len(cell.seeds))]
        for i, (point, runs) in enumerate(points):
            if cell.points and i == 0:
                runs += len(cell.seeds) - len(cell.sweep_seeds)  # the chosen point's other seeds (any point)
            cfg = run_config(study, cell, cell.seeds[0], Path("runs/plan"), point=point)
            data = _token_stats(cfg, cache, tokenizer_folder)
            est = estimate_for_run(cfg, model_config, "cuda", seq=data["longest"])
            method = "full" if cfg.train.method == "full" else ("qlora" if cfg.model.quant == "nf4" else "lora")
            steps = 0 if cell.combine else plan_steps(data["n_train"], cfg.train)
            tokens = steps * cfg.train.batch_size * cfg.train.grad_accum * data["mean"]
            prompts = data["eval_prompts"] * (1 + (cfg.eval.before and not cell.combine))
            secs = estimate_seconds(model_config, method=method, trainable=est["params"]["trainable"],
                                    train_tokens=tokens, context=data["mean"],
                                    grad_checkpointing=cfg.train.gradient_checkpointing, eval_prompts=prompts,
                                    eval_batch=cfg.eval.batch_size, new_tokens=cfg.eval.max_new_tokens, gpu=gpu)
            rows.append({"cell": cell.name + (f" @ {point}" if point else ""), "runs": runs, "steps": steps,
                         "tokens": tokens, "mean_tokens": data["mean"], "longest": data["longest"],
                         "peak_gb": est["peak_bytes"] / 1e9, "train_s": secs["train_s"], "eval_s": secs["eval_s"],
                         "gpu": secs["gpu"], "approx_tokens": tokenizer_folder is None})
    return rows


def _hm(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else (f"{minutes}m" if minutes else "<1m")


def plan_text(study: Study, gpu: str | None = None) -> str:
    rows = plan_rows(study, gpu)
    total = sum(r["runs"] * (r["train_s"] + r["eval_s"]) for r in rows)
    lines = [f"plan on one {rows[0]['gpu']} (estimates, not measurements; about x2 either way):",
             f"  {'cell':<34} {'runs':>4} {'steps':>6} {'tokens/run':>11} {'peak GB':>8} {'train':>7} {'eval':>6}"]
    for r in rows:
        lines.append(f"  {r['cell']:<34} {r['runs']:>4} {r['steps']:>6} {r['tokens']:>11,.0f} {r['peak_gb']:>8.1f} "
                     f"{_hm(r['train_s']):>7} {_hm(r['eval_s']):>6}")
    lines.append(f"  in all: {sum(r['runs'] for r in rows)} runs, about {_hm(total)} of GPU time one after another "
                 f"(tokens per example: mean {rows[0]['mean_tokens']:.0f}, longest {rows[0]['longest']})")
    if rows[0]["approx_tokens"]:
        lines.append(f"  tokens counted as {CHARS_PER_TOKEN} characters each: model.name gives a config but no "
                     f"tokenizer")
    return "\n".join(lines)

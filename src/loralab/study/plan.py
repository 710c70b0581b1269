"""A study's plan, before it starts (and in its dry run): each cell's expected time per run and, at
`--scale gpu`, peak memory, from the estimates alone (memory/estimate.py, memory/throughput.py). A GPU
plan assumes the GPU's peak rate; a CPU plan measures this CPU's (memory/cpu_time.py) and adds each
run's start-up. Sweep points other than the chosen one only validate (spec.VALIDATION_ONLY).

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
from ..io.models import BUNDLED, bundled_dir, load_tokenizer, resolve
from ..memory.arch import resolve_model_config
from ..memory.cpu_time import RUN_START_S, cpu_device
from ..memory.estimate import estimate_for_run
from ..memory.throughput import Device, estimate_seconds
from ..train.precision import resolve_precision
from .spec import Study, run_config

SAMPLE = 2000  # examples tokenized per distinct data config
CHARS_PER_TOKEN = 4  # English text in a BPE vocabulary of ~32k-50k: a rough count when there is no tokenizer
TEMPLATE_TOKENS = 10  # what a chat template adds around one turn, roughly
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
FORGETTING_FORWARDS = 7 * 24  # eval/forgetting.py's items (FORGETTING_TASKS x FORGETTING_ITEMS), before and after


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
            raise UserError(f"study plan: model.name={name}: {e}") from None
    p = Path(name).expanduser()
    folder = p if p.is_dir() else p.parent if p.is_file() else None
    if name in BUNDLED and (bundled_dir(name) / "tokenizer.json").is_file():  # fetched: its tokenizer is cached
        folder = bundled_dir(name)
    if folder is not None and any((folder / f).is_file() for f in TOKENIZER_FILES):
        return config, folder
    return config, None


def _approx_length(ex) -> int:
    text = "".join(str(m.get("content", "")) for m in ex.messages) if ex.messages else ex.prompt + ex.response
    return len(text) // CHARS_PER_TOKEN + TEMPLATE_TOKENS


def _token_stats(cfg, cache: dict, tokenizer_folder: Path | None) -> dict:
    """{n_train, mean, longest, eval_prompts, n_val} of a run's data (cached per data + eval config)."""
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
                      "eval_prompts": sum(len(t) for t in data.tests.values()), "n_val": len(data.val)}
    return cache[key]


def _run_seconds(cfg, cell, data: dict, model_config: dict, trainable: int, device: Device | None,
                 gpu: str | None) -> dict:
    """One run's steps and tokens, and its seconds: training with its validations, the final evaluation.
    A preference objective's example is two rows (chosen, rejected), and DPO scores both once more with
    LoRA off (its reference), in training, validation and the held-out pairs' evaluation."""
    from ..eval.preference import wanted
    from ..train.optim import plan_steps

    rows = 1 if cfg.train.objective == "sft" else 2
    reference = 1 + (cfg.train.objective == "dpo")  # forwards per row outside training's own
    steps = 0 if cell.combine else plan_steps(data["n_train"], cfg.train)
    tokens = steps * cfg.train.batch_size * cfg.train.grad_accum * data["mean"] * rows
    validations = 1 + (steps // cfg.train.eval_every if cfg.train.eval_every else 0)
    ev = cfg.eval
    looks = 1 + (ev.before and not cell.combine)  # the final evaluation, and the base's before training
    forwards = (data["eval_prompts"] * looks * bool(ev.test_loss and ev.tasks) + ev.loss_items
                + 2 * FORGETTING_FORWARDS * bool(ev.forgetting)
                + 4 * data["eval_prompts"] * looks * bool(wanted(cfg)))  # pairs: 2 rows, policy and reference
    method = "full" if cfg.train.method == "full" else ("qlora" if cfg.model.quant == "nf4" else "lora")
    common = dict(method=method, trainable=trainable, context=data["mean"], gpu=gpu, device=device,
                  eval_batch=ev.batch_size, new_tokens=ev.max_new_tokens)
    validating = data["n_val"] * validations * rows * reference * data["mean"]
    train = estimate_seconds(model_config, train_tokens=tokens, grad_checkpointing=cfg.train.gradient_checkpointing,
                             forward_tokens=validating + tokens * (reference - 1), **common)
    final = estimate_seconds(model_config, train_tokens=0, eval_prompts=data["eval_prompts"] * looks * bool(ev.tasks),
                             forward_tokens=forwards * data["mean"], **common)
    return {"device": train["gpu"], "steps": steps, "tokens": tokens, "train_s": train["train_s"] + train["eval_s"],
            "eval_s": final["eval_s"]}


def plan_rows(study: Study, gpu: str | None = None, cpu_threads: int | None = None) -> list[dict]:
    """One row per cell (and sweep point): runs, steps, tokens, estimated peak memory and time per run
    (train_s, eval_s). `evaluated`: how many of the runs make the final evaluation (a sweep point's
    runs validate only, and the chosen point's are then evaluated: the first point's row stands for
    it). cpu_threads: plan for this CPU, each run on that many threads (its rate measured once per
    precision the runs resolve to: memory/cpu_time.py), else for the GPU `gpu`."""
    first = run_config(study, study.cells[0], study.cells[0].seeds[0], Path("runs/plan"))
    model_config, tokenizer_folder = model_source(first.model.name)
    cache: dict = {}
    rows = []
    for cell in study.cells:
        points = [(p, len(cell.sweep_seeds)) for p, _ in cell.points] if cell.points else [(None, len(cell.seeds))]
        for i, (point, runs) in enumerate(points):
            evaluated = 0 if cell.points else runs
            if cell.points and i == 0:
                runs, evaluated = runs + len(cell.seeds) - len(cell.sweep_seeds), len(cell.seeds)
            cfg = run_config(study, cell, cell.seeds[0], Path("runs/plan"), point=point)
            data = _token_stats(cfg, cache, tokenizer_folder)
            device = cpu_device(resolve_precision(cfg.train.precision, "cpu"), cpu_threads) if cpu_threads else None
            est = estimate_for_run(cfg, model_config, "cpu" if cpu_threads else "cuda", seq=data["longest"])
            secs = _run_seconds(cfg, cell, data, model_config, est["params"]["trainable"], device, gpu)
            rows.append({"cell": cell.name + (f" @ {point}" if point else ""), "runs": runs, "evaluated": evaluated,
                         "steps": secs["steps"], "tokens": secs["tokens"], "mean_tokens": data["mean"],
                         "longest": data["longest"], "peak_gb": est["peak_bytes"] / 1e9, "train_s": secs["train_s"],
                         "eval_s": secs["eval_s"], "gpu": secs["device"], "approx_tokens": tokenizer_folder is None})
    return rows


def total_seconds(rows: list[dict], start_s: float = 0.0) -> float:
    """The plan's runs one after another: each trains, the evaluated ones evaluate, each starts (start_s)."""
    return sum(r["runs"] * (r["train_s"] + start_s) + r["evaluated"] * r["eval_s"] for r in rows)


def _hm(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else (f"{minutes}m" if minutes else "<1m")


def plan_text(study: Study, gpu: str | None = None, cpu_threads: int | None = None, parallel: int = 1,
              rows: list[dict] | None = None) -> str:
    """The plan as printed before a study starts: a row per cell, then the whole study's time (a CPU
    plan's runs each start a process: RUN_START_S)."""
    rows = rows or plan_rows(study, gpu, cpu_threads)
    total = total_seconds(rows, RUN_START_S if cpu_threads else 0.0)
    where = rows[0]["gpu"] if cpu_threads else f"one {rows[0]['gpu']}"
    lines = [f"plan on {where} (estimates, not measurements; about x2 either way):",
             f"  {'cell':<34} {'runs':>4} {'steps':>6} {'tokens/run':>11} {'peak GB':>8} {'train':>7} {'eval':>6}"]
    for r in rows:
        lines.append(f"  {r['cell']:<34} {r['runs']:>4} {r['steps']:>6} {r['tokens']:>11,.0f} {r['peak_gb']:>8.1f} "
                     f"{_hm(r['train_s']):>7} {_hm(r['eval_s']) if r['evaluated'] else '-':>6}")
    at = f", about {_hm(total / parallel)} at --parallel {parallel}" if parallel > 1 else ""
    lines.append(f"  in all: {sum(r['runs'] for r in rows)} runs, about {_hm(total)} of "
                 f"{'CPU' if cpu_threads else 'GPU'} time one after another{at} (tokens per example: mean "
                 f"{rows[0]['mean_tokens']:.0f}, longest {rows[0]['longest']})")
    if rows[0]["approx_tokens"]:
        lines.append(f"  tokens counted as {CHARS_PER_TOKEN} characters each: model.name gives a config but no "
                     f"tokenizer")
    return "\n".join(lines)

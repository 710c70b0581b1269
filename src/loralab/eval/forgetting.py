"""What a run costs the model's other skills, and a held-out loss large enough to compare runs by.

Forgetting: the mean token loss (teacher forced, one forward per item) on a fixed set of generated
tasks the run did not train on (FORGETTING_TASKS, minus any it trained on), before training and
after. The set and its items are the same for every run (data.seed), so two runs' reports compare,
and a study pairs them seed by seed. Loss rather than exact match: it needs no generation, and it
moves before accuracy does (the article saw arithmetic scores collapse after instruction tuning).

Held-out loss (`eval.loss_items` items): the same kind of loss over many items of the tasks the run
trained on, items it never saw (checked by content against the training, validation and test
items). The few dozen evaluation questions a run generates for are too few to tell two cells apart.
It is not free: a forward per item, so a thousand items cost about what a few dozen training steps
of batch 8 do (three forwards' worth each).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..data.prompts import encode_all
from ..data.tasks import expand_tasks, is_task, make_task
from ..errors import UserError
from ..io.fileio import write_json
from ..train.loss import mean_loss

# Arithmetic the base model can half do (the article's forgetting) and held-out suite families.
FORGETTING_TASKS = ("2da", "2ds", "3da", "2dm", "divide", "lowercase", "sort_words")
FORGETTING_ITEMS = 24   # items per task: 168 forwards before and after
HELD_OUT_SEED_OFFSET = 1  # loss items are drawn with data.seed + this (then screened against the run's own)
BEFORE_FILE = "forgetting_before.json"  # in the run folder: the scores before training, for a resume


def _trained(cfg) -> set:
    return set() if cfg.data.path else set(expand_tasks(cfg.data.tasks))


def forgetting_sets(cfg) -> dict:
    """{task: items} of the fixed tasks this run does not train on."""
    return {name: make_task(name, 0, FORGETTING_ITEMS, cfg.data.seed)[1]
            for name in FORGETTING_TASKS if name not in _trained(cfg)}


def _key(ex) -> str:
    return json.dumps([ex.prompt, ex.response, ex.messages], sort_keys=True, default=str)


def held_out_items(cfg, data, total: int) -> list:
    """About `total` items of the trained generated tasks, none of which the run trains, validates
    or is tested on (an equal share per task)."""
    tasks = sorted(t for t in _trained(cfg) if is_task(t))
    if not tasks or total <= 0:
        return []
    seen = {_key(ex) for ex in data.train + data.val + [e for items in data.tests.values() for e in items]}
    share = math.ceil(total / len(tasks))
    items = []
    for name in tasks:
        try:  # a few extra, for those screened out; a small task gives what it has
            drawn = make_task(name, 0, share + share // 4 + 4, cfg.data.seed + HELD_OUT_SEED_OFFSET)[1]
        except UserError:
            drawn = make_task(name, 0, share, cfg.data.seed + HELD_OUT_SEED_OFFSET)[1]
        items += [ex for ex in drawn if _key(ex) not in seen][:share]
    return items


def _context(module) -> int:
    """The model's positions (a chat-form item can outgrow a small model's context, which the run's
    own data never reached): items are cut to it, alike before and after."""
    for m in module.modules():
        limit = getattr(getattr(m, "config", None), "max_position_embeddings", None)
        if isinstance(limit, int) and limit > 0:
            return limit
    return 1 << 62


def _loss(module, tok, examples, cfg, dist, layout=None) -> float | None:
    # in the run's own format, except chat-form items under data.template=raw (arithmetic runs): those
    # need a template, and auto picks the one the data would get without the raw setting
    raw_chat = cfg.data.template == "raw" and any(ex.is_chat for ex in examples)
    kw = dict(template="auto" if raw_chat else cfg.data.template, system_prompt=cfg.data.system_prompt,
              max_seq_len=min(cfg.data.max_seq_len, _context(module)))
    try:
        encoded = encode_all(examples, tok, **kw)[0] if examples else []
    except UserError:  # e.g. every answer cut away by a short data.max_seq_len: no score, not a failed run
        return None
    return mean_loss(module, encoded, batch_size=cfg.eval.batch_size, pad_id=tok.pad_token_id, dist=dist,
                     layout=layout) if encoded else None


def before(module, tok, cfg, dist, out: Path, resumed: bool, layout=None) -> dict:
    """The forgetting set's losses before training ({} when eval.forgetting is off); kept in
    forgetting_before.json so a resumed run (whose model already trained) reports the true start."""
    if not cfg.eval.forgetting:
        return {}
    path = Path(out) / BEFORE_FILE
    if resumed and path.exists():
        return json.loads(path.read_text())
    losses = {name: _loss(module, tok, items, cfg, dist, layout) for name, items in forgetting_sets(cfg).items()}
    if dist.is_main:
        write_json(path, losses)
    return losses


def after(start: dict, module, tok, cfg, data, dist, layout=None) -> dict:
    """The summary's fields: `forgetting` ({task: {before, after, change}}, mean_change: > 0 the
    run made those tasks worse) and `heldout_loss` / `heldout_items` (eval.loss_items). layout: how a
    batch is collated (train/loop.batch_layout: packed rows hold no padding), default padded rows."""
    out: dict = {}
    if start:
        sets = forgetting_sets(cfg)
        rows = {}
        for name, items in sets.items():
            end = _loss(module, tok, items, cfg, dist, layout)
            b = start.get(name)
            rows[name] = {"before": b, "after": end, "change": end - b if None not in (b, end) else None}
        changes = [r["change"] for r in rows.values() if r["change"] is not None]
        out["forgetting"] = {"tasks": rows, "mean_change": sum(changes) / len(changes) if changes else None,
                             "items_per_task": FORGETTING_ITEMS}
    if cfg.eval.loss_items:
        items = held_out_items(cfg, data, cfg.eval.loss_items)
        out["heldout_loss"], out["heldout_items"] = _loss(module, tok, items, cfg, dist, layout), len(items)
    return out


def table_lines(summary: dict) -> list[str]:
    """A run's table's lines: each forgotten task's token loss before and after (a table like the
    trained tasks' exact match), their mean change, and the held-out loss."""
    f = summary.get("forgetting") or {}
    rows = {name: r for name, r in (f.get("tasks") or {}).items() if r.get("change") is not None}
    lines = []
    if rows:
        width = max(6, *map(len, rows))
        lines += ["", f"  {'other':<{width}} {'before':>7} {'after':>8}   change (token loss, tasks not trained on)"]
        lines += [f"  {name:<{width}} {r['before']:>7.3f} {r['after']:>8.3f}   {r['change']:+.3f}"
                  for name, r in rows.items()]
        if f.get("mean_change") is not None:
            lines.append(f"  {'mean':<{width}} {'':>7} {'':>8}   {f['mean_change']:+.3f}")
    if summary.get("heldout_loss") is not None:
        lines.append(f"  held-out loss {summary['heldout_loss']:.4f} over {summary['heldout_items']} unseen items")
    return lines

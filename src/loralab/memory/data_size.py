"""The data's memory, decided before the data is made: the synthetic tasks' examples before they are
generated, a data file before it is read, the token ids and labels before they are encoded.

Data lives in the host's memory whatever the device, so each check compares with the CPU's room
(preflight.cpu_room: MemAvailable, cgroup limits, `ulimit -v`) counted from now, with no credit
for what the process holds (the data comes on top of it). Each estimate is measured on a sample of
the run's own data and scaled, so it follows the Python objects as they are:
  - generating: the peak bytes tracemalloc sees while one task generates SAMPLE examples (the
    Examples, their strings, the draw's set and lists), per example, times the examples asked for
    (data.n_train per task plus eval.n per evaluated task), plus a list slot per example; measured
    only when the count could matter (above the room at CEILING_BYTES_PER_EXAMPLE each);
  - reading a file read whole (JSONL, JSON, text): its bytes and their decoded text, at least
    READ_WHOLE_FACTOR x its size on disk (io.reading's size check gives the size before reading);
  - encoding: the deep size of an evenly spaced sample's Encoded examples (lists of ints) per token,
    times the tokens the whole set has at the sample's tokens per character, each example capped at
    data.max_seq_len.
Refusals are UserErrors under train.preflight=error (the default); warn and off skip these checks
(build_datasets has no log to warn in), and the run may then meet a MemoryError.
"""
from __future__ import annotations

import math
import sys
import tracemalloc
from pathlib import Path

from ..data.prompts import encode_all
from ..data.sources import TABLE_SUFFIXES
from ..data.tasks import make_task
from ..errors import UserError
from ..io import reading
from . import preflight as P
from .measure import fmt_bytes

SAMPLE = 512               # examples generated to measure their bytes (a few ms per task)
ENCODE_SAMPLE = 128        # examples encoded to measure theirs (the template's set-up is paid once, for the run too)
LIST_SLOT_BYTES = 8 * 3    # a pointer in the run's lists: all examples, then train and validation after the split
# A file read whole is held as bytes and as decoded text together; text needs at least 2/3 of a byte per UTF-8
# byte (a 3-byte character is 2 bytes in a str), so the pair takes >= 5/3 of the size on disk: a lower bound.
READ_WHOLE_FACTOR = 5 / 3
# Far above any task's measured bytes per example (short questions and answers: under 1 KiB): a
# generation that fits at this size everywhere is not measured: measuring every family of the suite is not free.
CEILING_BYTES_PER_EXAMPLE = 16 * 1024


def _room_bytes() -> tuple[int, str] | None:
    room = P.cpu_room()
    return None if room is None else (max(room.bytes, 0), f"{fmt_bytes(max(room.bytes, 0))} available ({room.source})")


def generated_bytes_per_example(task: str, seed: int) -> float:
    """Peak bytes per example while `task` generates SAMPLE training examples (measured)."""
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        start = tracemalloc.get_traced_memory()[0]
        made = make_task(task, SAMPLE, 0, seed)
        peak = tracemalloc.get_traced_memory()[1] - start
        del made
    finally:
        if not was_tracing:
            tracemalloc.stop()
    return peak / SAMPLE


def check_generation(cfg, counts: dict[str, int], eval_tasks: list[str]) -> None:
    """Refuse synthetic data (data.n_train per task in `counts`, eval.n per evaluated task) or a
    data.path file that cannot fit in memory, before anything is generated or read."""
    if cfg.train.preflight != "error":
        return
    if cfg.data.path:  # no training tasks then (counts is empty); evaluation tasks may still be generated
        _check_file(cfg.data.path)
    wanted = {t: n + (cfg.eval.n if t in eval_tasks else 0) for t, n in counts.items()}
    wanted.update({t: cfg.eval.n for t in eval_tasks if t not in wanted})
    wanted = {t: n for t, n in wanted.items() if n}
    room = _room_bytes()
    if not wanted or room is None or sum(wanted.values()) * CEILING_BYTES_PER_EXAMPLE <= room[0]:
        return
    per = {t: generated_bytes_per_example(t, cfg.data.seed) + LIST_SLOT_BYTES for t in wanted}
    need = sum(per[t] * n for t, n in wanted.items())
    if need <= room[0]:
        return
    total = sum(wanted.values())
    fixed = sum(per[t] * cfg.eval.n for t in eval_tasks if t in per)  # the test sets stay
    per_count = sum(per[t] for t in counts if t in per)  # bytes one more data.n_train adds
    most = math.floor((room[0] - fixed) / per_count) if per_count and room[0] > fixed else 0
    fix = (f"at most data.n_train={most:,} per task can be generated (their token ids need room too)" if most > 0
           else "lower data.n_train and eval.n")
    raise UserError(f"config keys 'data.n_train' and 'eval.n': generating {total:,} examples of "
                    f"{', '.join(wanted)} takes an estimated {fmt_bytes(need)} (~{fmt_bytes(need / total)} each) > "
                    f"{room[1]}; {fix}")


def _check_file(path: str) -> None:
    p = Path(path)
    if p.is_dir() or not p.exists() or p.suffix.lower() in TABLE_SUFFIXES:
        return  # a datasets folder or table is memory-mapped by Arrow; a missing file: its reader says so
    reading.check_file(p, "data file", reading.DATA_CAP)  # not a regular file, or too big: refused here
    room = _room_bytes()
    size = p.stat().st_size
    if room is None or size * READ_WHOLE_FACTOR <= room[0]:
        return
    raise UserError(f"config key 'data.path': {p} is {reading.size_text(size)}; reading it whole takes at least "
                    f"{fmt_bytes(size * READ_WHOLE_FACTOR)} (its bytes and their text) > {room[1]}; split it, or give "
                    "a Parquet file or datasets folder")


# ---------------------------------------------------------------------------------------------
# Encoded

def _chars(ex) -> int:
    return len(ex.prompt) + len(ex.response) + sum(len(str(m.get("content", ""))) for m in ex.messages or [])


def encoded_bytes(encoded: list) -> int:
    """Deep size of Encoded examples: the objects, their lists and the int objects (shared ones once)."""
    seen: set[int] = set()
    total = 0
    for e in encoded:
        for obj in (e, getattr(e, "__dict__", None), e.input_ids, e.labels, *e.input_ids, *e.labels):
            if obj is not None and id(obj) not in seen:
                seen.add(id(obj))
                total += sys.getsizeof(obj)
    return total


def encoded_estimate(examples: list, tok, cfg) -> dict:
    """The bytes `examples` take once encoded (module docstring), from an evenly spaced sample."""
    step = max(1, len(examples) // ENCODE_SAMPLE)
    sample = examples[::step][:ENCODE_SAMPLE]
    kw = dict(template=cfg.data.template, system_prompt=cfg.data.system_prompt, max_seq_len=cfg.data.max_seq_len)
    enc = encode_all(sample, tok, **kw)[0]  # a dropped example has no tokens: it is not kept in memory either
    tokens = sum(len(e.input_ids) for e in enc)
    if not tokens:
        return {"bytes": 0, "per_token": 0.0, "tokens": 0}
    per_token = encoded_bytes(enc) / tokens
    per_char = tokens / max(1, sum(map(_chars, sample)))
    cap = cfg.data.max_seq_len
    n_tokens = sum(min(cap, math.ceil(_chars(ex) * per_char)) for ex in examples)
    return {"bytes": int(n_tokens * per_token), "per_token": per_token, "tokens": n_tokens}


def check_encoded(cfg, data, tok) -> None:
    """Refuse training and validation data whose token ids and labels cannot fit, before encoding."""
    if cfg.train.preflight != "error":
        return
    examples = data.train + data.val
    room = _room_bytes()
    if not examples or room is None:
        return
    est = encoded_estimate(examples, tok, cfg)
    if est["bytes"] <= room[0]:
        return
    most = int(len(examples) * room[0] / est["bytes"])
    source = f"data.path {cfg.data.path}" if cfg.data.path else "data.n_train"
    raise UserError(f"not enough memory for the tokenized data: {len(examples):,} examples ({source}) encode to "
                    f"~{est['tokens']:,} tokens, an estimated {fmt_bytes(est['bytes'])} of token ids and labels "
                    f"(~{est['per_token']:.0f} bytes per token) > {room[1]}; about {most:,} examples fit "
                    "(fewer examples, or a lower data.max_seq_len)")

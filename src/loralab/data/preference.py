"""Preference pairs: a prompt with a chosen and a rejected answer (DPO, ORPO: train/preference.py).

Records as TRL names them, from any source data/sources.py reads (JSONL, JSON, a `datasets` folder,
Parquet, CSV; `data.columns` maps `prompt` / `chosen` / `rejected` to the data's columns):
  - standard:        {"prompt": "...", "chosen": "...", "rejected": "..."}
  - conversational:  {"prompt": [messages], "chosen": [assistant message(s)], "rejected": [...]}
  - implicit prompt: {"chosen": [the whole conversation], "rejected": [...]}: the leading messages both
                     share are the prompt (conversational only: text has no turn to cut at).
Each pair is two Examples (prompt + chosen, prompt + rejected), so rendering and loss masks are
prompts.py's, exactly as SFT's. A micro batch holds both rows of each of its pairs: chosen rows
first, then the rejected ones in the same order (collate_pairs), as TRL's trainers lay them out.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError
from .batching import collate
from .formats import ROLES, Example
from .prompts import IGNORE_INDEX, Encoded, _encode_many, stop_token_ids
from .sources import load_data

FIELDS = ("prompt", "chosen", "rejected")
PAIRS = "pair_count"  # a collated pair batch's key: its number of pairs (chosen rows first, then as many rejected)


@dataclass
class PreferencePair:
    chosen: Example
    rejected: Example
    source: str = ""

    def fingerprint_parts(self) -> list:
        """What formats.fingerprint hashes: both conversations."""
        return [[e.prompt, e.response, e.messages] for e in (self.chosen, self.rejected)]

    # Read as an Example, a pair is its prompt with the chosen answer (a stop check renders its prompt).
    prompt = property(lambda self: self.chosen.prompt)
    response = property(lambda self: self.chosen.response)
    messages = property(lambda self: self.chosen.messages)
    kind = property(lambda self: self.chosen.kind)
    is_chat = property(lambda self: self.chosen.is_chat)
    answer = property(lambda self: self.chosen.answer)
    question = property(lambda self: self.chosen.question)


def _text(obj: dict, key: str, src: str, nonempty: bool) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise UserError(f"{src}: '{key}' must be a string (or, in a conversation, a list of messages), "
                        f"got {type(value).__name__}")
    if nonempty and not value.strip():
        raise UserError(f"{src}: '{key}' is empty")
    return value


def _turns(value, key: str, src: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise UserError(f"{src}: '{key}' must be a non-empty list of {{role, content}} messages")
    out = []
    for i, m in enumerate(value):
        where = f"{src}: {key}[{i}]"
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UserError(f"{where} must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise UserError(f"{where}: unknown role {m['role']!r} (allowed: {', '.join(ROLES)})")
        if not isinstance(m["content"], str):
            raise UserError(f"{where}: 'content' must be a string, got {type(m['content']).__name__}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _answer(turns: list[dict], key: str, src: str) -> list[dict]:
    if turns[-1]["role"] != "assistant" or not turns[-1]["content"].strip():
        raise UserError(f"{src}: '{key}' must end with a non-empty assistant message")
    return turns


def parse_preference(obj, src: str) -> PreferencePair:
    """One record (decoded JSON or a table row) to a PreferencePair; `src` names its file and line or row."""
    if not isinstance(obj, dict):
        raise UserError(f"{src}: expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in ("chosen", "rejected") if k not in obj]
    if missing:
        raise UserError(f"{src}: a preference record needs 'chosen' and 'rejected' (missing "
                        f"{', '.join(map(repr, missing))}; record keys: {', '.join(map(str, obj)) or 'none'})")
    conversational = isinstance(obj["chosen"], list)
    if not conversational:
        if "prompt" not in obj:
            raise UserError(f"{src}: missing 'prompt' (text pairs need it; only conversations give it implicitly)")
        prompt = _text(obj, "prompt", src, nonempty=False)
        chosen, rejected = (_text(obj, k, src, nonempty=True) for k in ("chosen", "rejected"))
        return PreferencePair(Example(prompt=prompt, response=chosen, source=src, kind="prompt"),
                              Example(prompt=prompt, response=rejected, source=src, kind="prompt"), src)
    chosen, rejected = (_turns(obj[k], k, src) for k in ("chosen", "rejected"))
    if "prompt" in obj:
        prompt = _turns(obj["prompt"], "prompt", src)
    else:  # implicit: the shared leading turns
        k = 0
        while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
            k += 1
        prompt, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
        if not prompt or not chosen or not rejected:
            raise UserError(f"{src}: 'chosen' and 'rejected' share no leading prompt messages and differ after it")
    _answer(chosen, "chosen", src)
    _answer(rejected, "rejected", src)
    return PreferencePair(Example(messages=prompt + chosen, source=src, kind="chat"),
                          Example(messages=prompt + rejected, source=src, kind="chat"), src)


def load_preferences(path, columns: dict | None = None) -> list[PreferencePair]:
    """data.path (+ data.columns: prompt / chosen / rejected -> the data's columns) as preference pairs."""
    return load_data(path, columns, parse_preference, FIELDS)


@dataclass
class EncodedPair:
    chosen: Encoded
    rejected: Encoded

    @property
    def longer(self) -> Encoded:
        return self.chosen if len(self.chosen.input_ids) >= len(self.rejected.input_ids) else self.rejected

    # What length-aware code (grouping by length, context checks, the memory estimate) reads: the longer row.
    input_ids = property(lambda self: self.longer.input_ids)
    labels = property(lambda self: self.longer.labels)


def is_pair(item) -> bool:
    return isinstance(item, (PreferencePair, EncodedPair))


def encode_pairs(pairs: list[PreferencePair], tokenizer, **kw) -> tuple[list[EncodedPair], dict]:
    """Both rows of every pair with loss masks (keywords as prompts.encode_all's); a pair either of whose
    answers is truncated away is dropped. stats as encode_all's, tokens counted over both rows."""
    n = len(pairs)
    rows = _encode_many([p.chosen for p in pairs] + [p.rejected for p in pairs], tokenizer, **kw)
    stats = {"n": n, "n_kept": 0, "n_truncated": 0, "n_dropped": 0, "n_tokens": 0, "n_label_tokens": 0,
             "first_dropped": None, "n_end_with_stop": 0}
    stops = set(stop_token_ids(tokenizer))
    out = []
    for pair, c, r in zip(pairs, rows[:n], rows[n:]):
        stats["n_truncated"] += c.truncated or r.truncated
        if not c.n_labels or not r.n_labels:
            stats["n_dropped"] += 1
            stats["first_dropped"] = stats["first_dropped"] or pair.source or None
            continue
        out.append(EncodedPair(c, r))
        stats["n_tokens"] += len(c.input_ids) + len(r.input_ids)
        stats["n_label_tokens"] += c.n_labels + r.n_labels
        learned = [t for t in c.labels if t != IGNORE_INDEX]
        stats["n_end_with_stop"] += learned[-1] in stops
    stats["n_kept"] = len(out)
    if pairs and not out:
        raise UserError(f"every preference pair has an answer empty or truncated away "
                        f"(data.max_seq_len={kw.get('max_seq_len')}; e.g. {stats['first_dropped']})")
    return out, stats


def collate_pairs(pairs: list[EncodedPair], pad_id: int) -> dict:
    """One padded batch of 2 x len(pairs) rows: the chosen answers, then the rejected ones in the same
    order. Packing does not apply (the loop pads preference batches)."""
    if not pairs:
        raise UserError("empty batch: no preference pairs to train on")
    batch = collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    batch[PAIRS] = torch.tensor(len(pairs))
    return batch

"""Data file readers: every supported format becomes a list of `Example`, validated line by line.

Formats (detected per file by extension, then by content; JSON records may mix kinds):
  - Alpaca: `.json` list of objects, or JSONL, with `instruction`, optional `input`, `output`.
    Stored as chat messages: user = instruction (+ "\\n\\n" + input when non-empty), assistant =
    output. prompts.py renders messages either through the model's chat template or as an
    Alpaca prompt ("### Instruction: ... ### Response:"), so one representation serves both.
  - chat JSONL: `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`.
  - raw JSONL: `prompt` + `response` (or `completion`): text before the answer (loss-masked) and
    the answer (learned). `{"text": ...}` records are plain text (loss on all of it).
  - plain text (`.txt`): blank-line separated blocks, each one Example(response=block).

Every problem is a UserError naming `file:line`; the first problem found is reported, so a user
fixes one line at a time with no traceback to read.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..io import reading

ROLES = ("system", "user", "assistant")
# What each record format is called in messages, so an error names what the user actually has.
KINDS = {"alpaca": "an Alpaca record (instruction/output)", "chat": "a chat record (messages)",
         "prompt": "a prompt/response record", "text": "a text record"}


@dataclass
class Example:
    prompt: str = ""                      # raw text before the response (loss-masked)
    response: str = ""                    # raw text the model learns (loss on it)
    messages: list[dict] | None = None    # chat form; loss on assistant contents only
    source: str = ""                      # "file.jsonl:7", for error messages
    kind: str = field(default="", compare=False)  # the record's format, a key of KINDS (for messages)

    @property
    def is_chat(self) -> bool:
        return self.messages is not None

    @property
    def answer(self) -> str:
        """What exact match compares a generation with: the response, or the last assistant turn."""
        if self.is_chat:
            return next((m["content"] for m in reversed(self.messages) if m["role"] == "assistant"), "")
        return self.response

    @property
    def question(self) -> str:
        """The text asked, for samples in reports: the prompt, or the last user turn."""
        if self.is_chat:
            return next((m["content"] for m in reversed(self.messages) if m["role"] == "user"), "")
        return self.prompt


def fingerprint(examples: list[Example]) -> str:
    """sha256 of what the examples say, in order (not where they came from: `source` is left out).
    A checkpoint records it, so a resume on data that changed since is refused."""
    h = hashlib.sha256()
    for ex in examples:  # a preference pair names its own parts (data/preference.py)
        parts = ex.fingerprint_parts() if hasattr(ex, "fingerprint_parts") else [ex.prompt, ex.response, ex.messages]
        h.update(json.dumps(parts, sort_keys=True).encode())
        h.update(b"\n")
    return h.hexdigest()


# The loralab fields a record may carry; data.columns maps each to a column (key) of the user's data.
FIELDS = ("instruction", "input", "output", "prompt", "response", "completion", "messages", "text")


def check_columns(columns: dict | None, fields: tuple = FIELDS) -> dict | None:
    """data.columns, checked: {loralab field: the data's column name} (`fields`: the record kind's; preference
    records have their own, data/preference.py)."""
    if columns is None:
        return None
    if not isinstance(columns, dict) or not columns:
        raise UserError(f"config key 'data.columns' must map loralab fields to column names, got {columns!r}")
    for field_name, column in columns.items():
        if field_name not in fields:
            raise UserError(f"config key 'data.columns' names unknown field {field_name!r} "
                            f"(fields: {', '.join(fields)})")
        if not isinstance(column, str) or not column:
            raise UserError(f"config key 'data.columns.{field_name}' must be a column name, got {column!r}")
    return columns


def remap(obj, columns: dict | None, src: str):
    """A record with data.columns applied: only the mapped columns, under loralab's field names."""
    if columns is None or not isinstance(obj, dict):
        return obj
    missing = [c for c in columns.values() if c not in obj]
    if missing:
        raise UserError(f"{src}: data.columns names {', '.join(map(repr, missing))}, not in the record "
                        f"(its keys: {', '.join(map(str, obj)) or 'none'})")
    return {field_name: obj[column] for field_name, column in columns.items()}


def load_examples(path: str | Path, columns: dict | None = None, parse=None, fields: tuple = FIELDS) -> list:
    """A data file's records, each read by `parse(record, "file:line")` (default parse_record: Examples)."""
    columns = check_columns(columns, fields)
    parse = parse or parse_record
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such data file")
    if p.is_dir():
        raise UserError(f"{p}: is a directory, expected a data file")
    # a FIFO, a device or a huge file is refused before reading; bad UTF-8 names line and column
    text = reading.decode_utf8(reading.read_bytes(p, "data file", reading.DATA_CAP), str(p))
    if not text.strip():
        raise UserError(f"{p}:1: data file is empty")
    name = str(p)  # as the user wrote it, so the message points at the file they passed
    suffix = p.suffix.lower()
    first = text.lstrip()[:1]
    if suffix == ".txt" or (suffix not in (".json", ".jsonl") and first not in "[{"):
        return _read_text(text, name)
    if first == "[":
        return _read_json_array(text, name, columns, parse)
    if suffix == ".json" and first != "{":
        raise UserError(f"{name}:1: expected a JSON list of records (or one JSON object per line)")
    return _read_jsonl(text, name, columns, parse)


# ---------------------------------------------------------------------------------------------
# File layouts

def _read_text(text: str, name: str) -> list[Example]:
    out, block, start = [], [], 0
    for lineno, line in enumerate(text.split("\n") + [""], start=1):  # lines as decode_utf8 counts them
        if line.strip():
            if not block:
                start = lineno
            block.append(line.rstrip())
        elif block:
            out.append(Example(response="\n".join(block), source=f"{name}:{start}", kind="text"))
            block = []
    return out


def _not_json(e: Exception, src: str) -> UserError:
    """What json raises beyond JSONDecodeError: RecursionError on deep nesting, ValueError on a
    number of thousands of digits (Python's int conversion limit)."""
    why = "nested too deeply" if isinstance(e, RecursionError) else str(e).split(":")[0]
    return UserError(f"{src}: malformed JSON ({why})")


def _read_jsonl(text: str, name: str, columns: dict | None, parse=None) -> list:
    out = []
    # "\n" alone ends a record (JSON Lines): splitlines() would also cut at U+2028 and other
    # separators that JSON allows inside strings
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue  # blank lines (e.g. a trailing one) are not records
        src = f"{name}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{src}: malformed JSON ({e.msg} at column {e.colno})") from None
        except (RecursionError, ValueError) as e:
            raise _not_json(e, src) from None
        out.append((parse or parse_record)(remap(obj, columns, src), src))
    return out


def _read_json_array(text: str, name: str, columns: dict | None, parse=None) -> list:
    """Decode a top-level JSON list element by element, so each record knows its line number."""
    dec = json.JSONDecoder()

    def line_at(pos: int) -> int:
        return text.count("\n", 0, pos) + 1

    def skip_ws(pos: int) -> int:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        return pos

    out: list[Example] = []
    pos = skip_ws(0) + 1  # past "["
    while True:
        pos = skip_ws(pos)
        if pos < len(text) and text[pos] == "]" and not out:
            break  # "[]": reported as empty below
        try:
            obj, end = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise UserError(f"{name}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        except (RecursionError, ValueError) as e:
            raise _not_json(e, f"{name}:{line_at(pos)}") from None
        src = f"{name}:{line_at(pos)}"
        out.append((parse or parse_record)(remap(obj, columns, src), src))
        pos = skip_ws(end)
        if pos < len(text) and text[pos] == ",":
            pos += 1
            continue
        if pos < len(text) and text[pos] == "]":
            if text[skip_ws(pos + 1):].strip():
                raise UserError(f"{name}:{line_at(pos + 1)}: malformed JSON (extra data after the list)")
            break
        raise UserError(f"{name}:{line_at(pos)}: malformed JSON (expected ',' or ']' after a record)")
    if not out:
        raise UserError(f"{name}:1: data file has no records (empty list)")
    return out


# ---------------------------------------------------------------------------------------------
# One record

def _string(obj: dict, key: str, src: str, *, required: bool = True, nonempty: bool = False) -> str:
    if key not in obj:
        if required:
            raise UserError(f"{src}: missing '{key}'")
        return ""
    value = obj[key]
    if not isinstance(value, str):
        raise UserError(f"{src}: '{key}' must be a string, got {type(value).__name__}")
    if nonempty and not value.strip():
        raise UserError(f"{src}: '{key}' is empty")
    return value


def parse_record(obj, src: str) -> Example:
    """One JSON record (already decoded) to an Example; `src` is its `file:line`."""
    if not isinstance(obj, dict):
        raise UserError(f"{src}: expected a JSON object, got {type(obj).__name__}")
    if "chosen" in obj and "rejected" in obj:
        raise UserError(f"{src}: a preference record (chosen / rejected): train it with train.objective=dpo or orpo")
    if "messages" in obj:
        return Example(messages=_messages(obj["messages"], src), source=src, kind="chat")
    if "instruction" in obj or "output" in obj:
        instruction = _string(obj, "instruction", src, nonempty=True)
        extra = _string(obj, "input", src, required=False)
        output = _string(obj, "output", src, nonempty=True)
        user = instruction + ("\n\n" + extra if extra.strip() else "")
        return Example(messages=[{"role": "user", "content": user},
                                 {"role": "assistant", "content": output}], source=src, kind="alpaca")
    if "prompt" in obj:
        key = "completion" if "completion" in obj and "response" not in obj else "response"
        prompt = _string(obj, "prompt", src)
        return Example(prompt=prompt, response=_string(obj, key, src, nonempty=True), source=src, kind="prompt")
    if "text" in obj:
        return Example(response=_string(obj, "text", src, nonempty=True), source=src, kind="text")
    raise UserError(f"{src}: missing 'instruction'/'output', 'messages', 'prompt'/'response' or 'text' "
                    f"(record keys: {', '.join(map(str, obj)) or 'none'})")


def _messages(msgs, src: str) -> list[dict]:
    if not isinstance(msgs, list) or not msgs:
        raise UserError(f"{src}: 'messages' must be a non-empty list of {{role, content}} objects")
    out = []
    for i, m in enumerate(msgs):
        where = f"{src}: messages[{i}]"
        if not isinstance(m, dict):
            raise UserError(f"{where} must be an object with 'role' and 'content', got {type(m).__name__}")
        if "role" not in m:
            raise UserError(f"{where}: missing 'role'")
        if "content" not in m:
            raise UserError(f"{where}: missing 'content'")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise UserError(f"{where}: unknown role {role!r} (allowed: {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise UserError(f"{where}: 'content' must be a string, got {type(content).__name__}")
        if role == "assistant" and not content.strip():
            raise UserError(f"{where}: assistant 'content' is empty")
        out.append({"role": role, "content": content})  # extra keys (name, tool ids) are dropped
    if not any(m["role"] == "assistant" for m in out):
        raise UserError(f"{src}: 'messages' has no assistant turn, so nothing to learn")
    return out

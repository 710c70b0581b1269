"""Rendering examples to text and tokens, with loss masks built from character offsets.

Every example is first rendered to one string plus the character spans the model must learn
(`render_example`); the string is tokenized once with offsets, and a token is labelled when its
characters overlap a span. Masks built this way do not depend on how a tokenizer merges pieces, or
on how a chat template decorates turns: we only need to know where each learned text sits.

Styles (`template`):
  - "chat": the tokenizer's chat template. Spans = each assistant content plus the special token
    that closes the turn right after it (<|im_end|>, <|eot_id|>, ...), so the model learns to stop.
  - "alpaca": "### Instruction:\\n...\\n\\n### Response:\\n" + content + eos, with the standard
    Alpaca preamble as the default system text. Used for chat data when a tokenizer has no template.
  - "raw": prompt + response + eos; spans = response + eos. Plain-text examples (no prompt) are
    always raw, whatever the template: loss on every token.
  - "auto": raw for prompt/response examples, chat for messages when a chat template exists,
    else alpaca. Forcing "chat"/"alpaca" on a prompt/response example turns it into one user turn
    (prompt, stripped) and one assistant turn (response, stripped).

Special tokens are never added by the tokenizer call: chat templates write their own, and for
alpaca/raw the BOS text is written into the string when the tokenizer would add one. So the
string from `render_prompt`, encoded with add_special_tokens=False, is exactly what training saw.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

from ..errors import UserError
from .formats import KINDS, Example

IGNORE_INDEX = -100
TEMPLATES = ("auto", "chat", "alpaca", "raw")
ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.")
# Stand-ins used to find where a template's system turn starts and ends (never reach the model).
_SYS_SENTINEL = "loralab-sentinel-system-7f3a"
_USER_SENTINEL = "loralab-sentinel-user-9c1e"


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]           # IGNORE_INDEX (-100) where masked; aligned with input_ids (shift in loss)
    truncated: bool = False

    @property
    def n_labels(self) -> int:
        """Labels the loss can use: position 0 is never predicted (the loss shifts by one)."""
        return sum(1 for t in self.labels[1:] if t != IGNORE_INDEX)


# ---------------------------------------------------------------------------------------------
# Options

def _system_policy(system_prompt) -> tuple[str, str | None]:
    """("default", None) | ("none", None) | ("text", the text)."""
    if system_prompt is None or (isinstance(system_prompt, str) and system_prompt.strip().lower() in ("none", "")):
        return "none", None
    if system_prompt == "default":
        return "default", None
    if not isinstance(system_prompt, str):
        raise UserError(f"config key 'data.system_prompt' must be default, none or a text, got {system_prompt!r}")
    return "text", system_prompt


def _style(example: Example, tok, template: str) -> str:
    if template not in TEMPLATES:
        raise UserError(f"config key 'data.template' must be one of {', '.join(TEMPLATES)}, got {template!r}")
    if not example.is_chat and (template in ("auto", "raw") or not example.prompt):
        return "raw"
    if example.is_chat and template == "raw":
        what = KINDS.get(example.kind, "a chat record (messages)")
        raise UserError(f"{example.source or 'example'}: data.template=raw needs prompt/response or text records, "
                        f"this one is {what} (use data.template=auto, chat or alpaca)")
    has_chat = bool(getattr(tok, "chat_template", None))
    if template == "auto":
        return "chat" if has_chat else "alpaca"
    if template == "chat" and not has_chat:
        raise UserError("config key 'data.template' is chat but the tokenizer has no chat template "
                        "(use alpaca or auto)")
    return template


def _as_messages(example: Example) -> list[dict]:
    if example.is_chat:
        return example.messages
    return [{"role": "user", "content": example.prompt.strip()},
            {"role": "assistant", "content": example.response.strip()}]


_BOS_TEXT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # per tokenizer: asked once, not per example


def _bos_text(tok) -> str:
    """The BOS token's text when the tokenizer's own encode would prepend it (Llama), else ""."""
    bos = getattr(tok, "bos_token", None)
    if not bos:
        return ""
    key = (bos, tok.bos_token_id)
    seen = _BOS_TEXT.get(tok)
    if seen is None or seen[0] != key:  # first ask, or the tokenizer's BOS changed since
        ids = tok("a", add_special_tokens=True)["input_ids"]
        seen = _BOS_TEXT[tok] = (key, bos if ids and ids[0] == tok.bos_token_id else "")
    return seen[1]


def _special_strings(tok) -> list[str]:
    found = set(getattr(tok, "all_special_tokens", []) or [])
    for added in (getattr(tok, "added_tokens_decoder", {}) or {}).values():
        if getattr(added, "special", False):
            found.add(str(added.content))
    return sorted((s for s in found if s), key=len, reverse=True)  # longest match first


# ---------------------------------------------------------------------------------------------
# Chat template

def _apply(tok, messages: list[dict], gen: bool, src: str) -> str:
    try:
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    except Exception as e:  # jinja templates raise their own errors ("roles must alternate", ...)
        raise UserError(f"{src or 'example'}: the tokenizer's chat template rejected this conversation "
                        f"({type(e).__name__}: {e})") from None


_CUT_CACHE: dict[tuple, tuple[str, str] | None] = {}


def _system_cut(tok) -> tuple[str, str] | None:
    """How to remove a system turn: (preamble to keep, rendered sentinel system turn to drop).

    A template like SmolLM2's injects its default system prompt when the first message is not a
    system message. Rendering with a sentinel system message instead gives a text that starts with
    `head` = [preamble, e.g. BOS] + [the system turn]; the user's turn header (found by a second
    sentinel) tells where the system turn's header starts, so the preamble survives. None: the
    template has no separate system turn (nothing injected that could be removed).
    """
    key = (str(tok.chat_template), getattr(tok, "bos_token", None))  # str: some are dicts
    if key in _CUT_CACHE:
        return _CUT_CACHE[key]
    sys_msg = {"role": "system", "content": _SYS_SENTINEL}
    try:
        head = tok.apply_chat_template([sys_msg], tokenize=False)
        two = tok.apply_chat_template([sys_msg, {"role": "user", "content": _USER_SENTINEL}], tokenize=False)
    except Exception:  # a template that refuses a lone system message has no injectable one either
        head = two = ""
    cut = None
    if _SYS_SENTINEL in head and two.startswith(head) and _USER_SENTINEL in two[len(head):]:
        user_header = two[len(head):two.index(_USER_SENTINEL, len(head))]
        p = -1
        for user, system in (("user", "system"), ("User", "System"), ("USER", "SYSTEM")):
            if user in user_header:
                p = head.find(user_header.replace(user, system, 1))
                break
        if 0 <= p < head.index(_SYS_SENTINEL):
            preamble = head[:p]
        else:  # header not recognisable: keep only a leading BOS
            bos = getattr(tok, "bos_token", None) or ""
            preamble = bos if bos and head.startswith(bos) else ""
        cut = (preamble, head)
    _CUT_CACHE[key] = cut
    return cut


def _chat_text(tok, messages: list[dict], policy, gen: bool, src: str) -> str:
    kind, text = policy
    if (messages and messages[0]["role"] == "system") or kind == "default":
        return _apply(tok, messages, gen, src)  # the data's own system message always wins
    if kind == "text":
        return _apply(tok, [{"role": "system", "content": text}] + messages, gen, src)
    cut = _system_cut(tok)
    if cut is None:
        return _apply(tok, messages, gen, src)
    preamble, head = cut
    full = _apply(tok, [{"role": "system", "content": _SYS_SENTINEL}] + messages, gen, src)
    if not full.startswith(head):
        return _apply(tok, messages, gen, src)
    return preamble + full[len(head):]


def _chat_render(tok, messages: list[dict], policy, src: str) -> tuple[str, list[tuple[int, int]]]:
    full = _chat_text(tok, messages, policy, False, src)
    specials = _special_strings(tok)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        content, start = m["content"], -1
        if i > 0:
            # The conversation up to this turn with the generation prompt: when the template is
            # prefix-stable the reply starts exactly where that text ends.
            prefix = _chat_text(tok, messages[:i], policy, True, src)
            if full.startswith(prefix):
                cursor = max(cursor, len(prefix))
                if full.startswith(content, len(prefix)):
                    start = len(prefix)
        if start < 0:  # templates that re-render earlier turns or trim contents: search after cursor
            for needle in (content, content.strip()):
                start = full.find(needle, cursor)
                if start >= 0:
                    content = needle
                    break
        if start < 0:
            raise UserError(f"{src or 'example'}: cannot find assistant turn messages[{i}] in the chat "
                            f"template's output (the template rewrites it); try data.template=alpaca")
        end = start + len(content)
        j = end
        while j < len(full) and full[j] == " ":
            j += 1
        for s in specials:  # the end-of-turn token right after the reply
            if full.startswith(s, j):
                end = j + len(s)
                break
        spans.append((start, end))
        cursor = end
    eos = getattr(tok, "eos_token", None)
    if spans and eos and not any(full[:spans[-1][1]].endswith(s) for s in specials):
        # A template that closes the reply with no special token would teach the model never to
        # stop: the last reply ends with EOS, as alpaca and raw texts do.
        start, end = spans[-1]
        full, spans[-1] = full[:end] + eos + full[end:], (start, end + len(eos))
    return full, spans


_REPLY_SENTINEL = "loralab-sentinel-reply-5b2d"


def stop_token_ids(tok) -> list[int]:
    """The ids a reply learned here ends with: the tokenizer's EOS, and the special token its chat
    template closes an assistant turn with (<|im_end|>, <|eot_id|>, <end_of_turn>...) when that is
    another token. Generation stops on any of them; merged folders list them as eos_token_id."""
    ids = [] if getattr(tok, "eos_token_id", None) is None else [tok.eos_token_id]
    if getattr(tok, "chat_template", None):
        try:
            text, spans = _chat_render(tok, [{"role": "user", "content": "?"},
                                             {"role": "assistant", "content": _REPLY_SENTINEL}], ("none", None), "")
        except UserError:
            return ids
        start, end = spans[-1]
        closing = text[start + len(_REPLY_SENTINEL):end].strip()
        tid = tok.convert_tokens_to_ids(closing) if closing else None
        if isinstance(tid, int) and tid != getattr(tok, "unk_token_id", None) and tid not in ids:
            ids.append(tid)
    return ids


# ---------------------------------------------------------------------------------------------
# Alpaca and raw

def _alpaca_render(tok, messages: list[dict], policy) -> tuple[str, list[tuple[int, int]]]:
    kind, custom = policy
    rest = messages
    if messages and messages[0]["role"] == "system":
        system, rest = messages[0]["content"], messages[1:]
    else:
        system = {"default": ALPACA_PREAMBLE, "none": "", "text": custom}[kind]
    eos = getattr(tok, "eos_token", None) or ""
    text = _bos_text(tok) + (system.strip() + "\n\n" if system and system.strip() else "")
    spans: list[tuple[int, int]] = []
    after_user = False
    for k, m in enumerate(rest):
        if m["role"] == "user":
            text += f"### Instruction:\n{m['content']}\n\n### Response:\n"
        elif m["role"] == "system":
            text += m["content"] + "\n\n"
        else:
            if not after_user:
                text += "### Response:\n"
            start = len(text)
            text += m["content"] + eos
            spans.append((start, len(text)))
            if k + 1 < len(rest):
                text += "\n\n"
        after_user = m["role"] == "user"
    return text, spans


def render_example(example: Example, tokenizer, *, template: str = "auto",
                   system_prompt="default") -> tuple[str, list[tuple[int, int]]]:
    """The training text and the character spans that carry loss."""
    style = _style(example, tokenizer, template)
    if style == "raw":
        bos, eos = _bos_text(tokenizer), getattr(tokenizer, "eos_token", None) or ""
        text = bos + example.prompt + example.response + eos
        return text, [(len(bos) + len(example.prompt), len(text))]
    policy = _system_policy(system_prompt)
    messages = _as_messages(example)
    if style == "chat":
        return _chat_render(tokenizer, messages, policy, example.source)
    return _alpaca_render(tokenizer, messages, policy)


def render_prompt(example_or_text, tokenizer, template: str = "auto", system_prompt="default") -> str:
    """The text given to generate(): everything before the (last) response, with the generation
    prompt. A bare string is one user message (under template "raw", the text itself)."""
    if isinstance(example_or_text, str):
        if template == "raw":
            return _bos_text(tokenizer) + example_or_text
        ex = Example(messages=[{"role": "user", "content": example_or_text}])
    else:
        ex = example_or_text
    style = _style(ex, tokenizer, template)
    if style == "raw":
        return _bos_text(tokenizer) + ex.prompt
    messages = _as_messages(ex)
    if messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    policy = _system_policy(system_prompt)
    if style == "chat":
        return _chat_text(tokenizer, messages, policy, True, ex.source)
    text, _ = _alpaca_render(tokenizer, messages, policy)
    return text if messages and messages[-1]["role"] == "user" else text + "### Response:\n"


# ---------------------------------------------------------------------------------------------
# Tokens

def _tokenize(tokenizer, texts: list[str]) -> dict:
    """Token ids and character offsets of each text, in one call (a fast tokenizer batches it)."""
    try:
        return tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise UserError("the model's tokenizer has no character offsets (a slow tokenizer); "
                        "loss masks need a fast tokenizer (tokenizer.json)") from None


def _labelled(ids: list[int], offsets, spans, max_seq_len: int | None) -> Encoded:
    """Labels are the tokens that overlap a reply span, the rest IGNORE_INDEX; cut at max_seq_len."""
    ids = list(ids)
    labels = [IGNORE_INDEX] * len(ids)
    for k, (a, b) in enumerate(offsets):
        # Overlap, not containment: a token merged across a boundary still carries the reply.
        if b > a and any(a < e and b > s for s, e in spans):
            labels[k] = ids[k]
    truncated = max_seq_len is not None and len(ids) > max_seq_len
    if truncated:
        ids, labels = ids[:max_seq_len], labels[:max_seq_len]  # right: keep the prompt's start
    return Encoded(input_ids=ids, labels=labels, truncated=truncated)


def _encode_many(examples: list[Example], tokenizer, *, template: str = "auto", system_prompt="default",
                 max_seq_len: int | None = None) -> list[Encoded]:
    if max_seq_len is not None and max_seq_len <= 0:
        raise UserError(f"config key 'data.max_seq_len' must be > 0, got {max_seq_len}")
    rendered = [render_example(ex, tokenizer, template=template, system_prompt=system_prompt) for ex in examples]
    if not rendered:
        return []
    enc = _tokenize(tokenizer, [text for text, _ in rendered])
    return [_labelled(ids, offsets, spans, max_seq_len)
            for ids, offsets, (_, spans) in zip(enc["input_ids"], enc["offset_mapping"], rendered)]


def encode(example: Example, tokenizer, **kw) -> Encoded:
    """One example's token ids and labels (keywords: template, system_prompt, max_seq_len)."""
    return _encode_many([example], tokenizer, **kw)[0]


def encode_all(examples: list[Example], tokenizer, **kw) -> tuple[list[Encoded], dict]:
    """Encode every example; drop (and count) those left with no usable label.

    stats: n (examples in), n_kept, n_truncated (cut by max_seq_len, kept or not), n_dropped,
    n_tokens and n_label_tokens (of the kept ones), first_dropped (source of one, for messages),
    n_end_with_stop (kept ones whose last learned token is a stop token: EOS / end of turn).
    """
    out: list[Encoded] = []
    stats = {"n": len(examples), "n_kept": 0, "n_truncated": 0, "n_dropped": 0,
             "n_tokens": 0, "n_label_tokens": 0, "first_dropped": None, "n_end_with_stop": 0}
    stops = set(stop_token_ids(tokenizer))
    for ex, e in zip(examples, _encode_many(examples, tokenizer, **kw)):
        stats["n_truncated"] += e.truncated
        n_labels = e.n_labels
        if n_labels == 0:
            stats["n_dropped"] += 1
            stats["first_dropped"] = stats["first_dropped"] or ex.source or None
            continue
        out.append(e)
        stats["n_tokens"] += len(e.input_ids)
        stats["n_label_tokens"] += n_labels
        learned = [t for t in e.labels if t != IGNORE_INDEX]
        stats["n_end_with_stop"] += bool(learned) and learned[-1] in stops  # it learns where to stop
    stats["n_kept"] = len(out)
    if examples and not out:
        raise UserError(f"every response is empty or truncated away "
                        f"(data.max_seq_len={kw.get('max_seq_len')}; e.g. {stats['first_dropped']})")
    return out, stats

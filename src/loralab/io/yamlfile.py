"""Strict YAML for configs, `key=value` overrides and study files: yaml.safe_load, plus three refusals.

- Duplicate keys. PyYAML keeps the last of two equal keys, so a file with two `lora:` sections
  silently loses the first; here it is an error naming the line (`config.yaml:7: duplicate key
  'lora' (first at line 3)`). Keys a `<<: *base` merge brings in may still be overridden.
- Alias bombs. Anchors and aliases make a small file describe an exponentially large value (the
  "billion laughs" pattern): PyYAML builds it with shared references in no time, and the first
  thing that walks it (validation, a deep copy, writing config.yaml) never ends. The size a value
  would have with every alias expanded is counted on the event stream, before anything is built,
  and capped.
- Deep nesting. PyYAML builds nodes recursively, so thousands of nested `[` end in RecursionError;
  nesting is capped on the event stream too (configs are a few levels deep).
Syntax errors stay yaml.YAMLError (callers say "invalid YAML" with the line, or, for an override,
read the text as a plain string); the refusals are UserErrors.
"""
from __future__ import annotations

import yaml

from ..errors import UserError

MAX_DEPTH = 32          # nested mappings / lists; a config is 3 deep, a study a few more
MAX_NODES = 100_000     # values with every alias expanded; a study preset has a few hundred
_MERGE_TAG = "tag:yaml.org,2002:merge"


def _where(name: str, mark) -> str:
    # a file is named with the line; an override (one line of text, named by its key) is not
    return f"{name}:{mark.line + 1}" if mark is not None and not name.startswith("override ") else name


def _check_events(text: str, name: str) -> None:
    """Depth and expanded size, from the parser's events (the parser is not recursive)."""
    depth, total = 0, 0
    sizes: dict[str, int] = {}       # anchor -> its value's expanded size
    open_nodes: list[tuple[str | None, int]] = []  # per open collection: (anchor, total at its start)
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent) and any(a == event.anchor for a, _ in open_nodes):
            # a value that contains itself: anything that walks it (validation, writing config.yaml) never ends
            raise UserError(f"{_where(name, event.start_mark)}: YAML alias *{event.anchor} refers to a value that "
                            "contains it; write the values out")
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise UserError(f"{_where(name, event.start_mark)}: YAML nested more than {MAX_DEPTH} levels deep")
            open_nodes.append((event.anchor, total))
            total += 1
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
            anchor, start = open_nodes.pop()
            if anchor is not None:
                sizes[anchor] = total - start
        elif isinstance(event, yaml.ScalarEvent):
            total += 1
            if event.anchor is not None:
                sizes[event.anchor] = 1
        elif isinstance(event, yaml.AliasEvent):
            total += sizes.get(event.anchor, 1)  # an unknown anchor: the composer says so below
        else:
            continue
        if total > MAX_NODES:
            raise UserError(f"{_where(name, event.start_mark)}: YAML aliases expand to more than {MAX_NODES:,} "
                            f"values (an alias bomb?); write the values out")


class _StrictLoader(yaml.SafeLoader):
    source_name = "<yaml>"

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == _MERGE_TAG:
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    seen = first.get(key)
                except TypeError:  # an unhashable key: SafeLoader's own error says so below
                    continue
                if seen is not None:
                    raise UserError(f"{_where(self.source_name, key_node.start_mark)}: duplicate key {key!r} "
                                    f"(first at line {seen.line + 1}); a second one would replace the first")
                first[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def load(text: str, name: str):
    """The one YAML document in `text` (None when empty); `name` is the file, or "override 'KEY'"
    for a command line override. Raises UserError for a duplicate key, an
    alias bomb or deep nesting, yaml.YAMLError for invalid YAML (a bad value such as the date
    2024-13-01 included)."""
    _check_events(text, name)
    loader = _StrictLoader(text)
    loader.source_name = name
    try:
        return loader.get_single_data()
    except (ValueError, TypeError, OverflowError, AttributeError, KeyError, IndexError) as e:
        # a value PyYAML's resolver or a tag matched but its constructor cannot build (2024-13-01,
        # `!!timestamp x`): PyYAML raises these rather than a YAMLError
        raise yaml.constructor.ConstructorError(None, None, f"bad value ({type(e).__name__}: {e})", None) from None
    finally:
        loader.dispose()


def error_text(e: yaml.YAMLError) -> tuple[str, str]:
    """(":line" or "", the problem) of a YAML error, for a one-line message."""
    mark = getattr(e, "problem_mark", None)
    return (f":{mark.line + 1}" if mark else ""), str(getattr(e, "problem", None) or e)

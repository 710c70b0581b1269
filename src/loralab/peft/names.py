"""PEFT's rules for module names, in pure Python (no torch), shared by targets.py, adapters, the
config's per-module settings and the memory estimate: list entries match a dotted-name suffix,
rank_pattern / alpha_pattern keys match the end of a name, layers_to_transform reads a layer index."""
from __future__ import annotations

import re

from ..errors import UserError


def suffix_match(name: str, entry: str) -> bool:
    # PEFT's list semantics: the full name, or a tail of it starting at a dot boundary.
    return name == entry or name.endswith("." + entry)


def pattern_regex(key: str) -> str:
    """The regex PEFT matches a rank_pattern / alpha_pattern key as: the key must compile inside it
    (a key such as `(?i)q_proj` compiles alone, not there), so validation compiles this."""
    return rf"(.*\.)?({key})$"


def pattern_value(pattern: dict, name: str, default):
    """PEFT's rank_pattern / alpha_pattern rule: the first key (a regex) that matches the end of the
    full module name at a dot boundary gives the value; no key matching gives the default."""
    for key, value in pattern.items():
        if re.match(pattern_regex(key), name):
            return value
    return default


def layer_index(name: str, layers_pattern: str | list | None = None) -> int | None:
    """The decoder layer a module belongs to, by PEFT's layers_to_transform rule: the first
    numbered segment of its name ("model.layers.3.mlp.up_proj" -> 3), or the number after one of
    `layers_pattern` ("layers" -> "...layers.<n>."). None: the module sits in no numbered layer."""
    if not layers_pattern:
        found = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        found = None
        for p in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            found = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name)
            if found:
                break
    return int(found["idx"]) if found else None


def filter_layers(names: list[str], layers, layers_pattern=None, key: str = "lora.layers") -> list[str]:
    """Only the modules in the given decoder layers (an int or a list of ints), as PEFT's
    layers_to_transform; `key` names the setting in errors."""
    wanted = {layers} if isinstance(layers, int) else set(layers)
    found = {n: layer_index(n, layers_pattern) for n in names}
    present = sorted({i for i in found.values() if i is not None})
    missing = sorted(wanted - set(present))
    if missing:
        have = f"{present[0]}..{present[-1]}" if present else "none"
        raise UserError(f"config key '{key}': the targets have no layer {missing[0]} (their layers: {have})")
    return [n for n in names if found[n] in wanted]

"""The config checks that look across keys (variants, converters, expert targets), apart from config.py's
per-key validation so that file stays a reader's size; config.validate calls them."""
from __future__ import annotations

import difflib

from .errors import UserError
from .peft.names import pattern_regex
from .peft.presets import check_init, mutates_base


def validate_converters(value) -> None:
    from .model.convert import NAMES

    if value in ("auto", "off"):
        return
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UserError(f"config key 'model.converters' must be auto, off or a list of names ({', '.join(NAMES)}), "
                        f"got {value!r}")
    for name in value:
        if name not in NAMES:
            close = difflib.get_close_matches(name, NAMES, n=1)
            hint = f" (did you mean {close[0]}?)" if close else f" (known: {', '.join(NAMES)})"
            raise UserError(f"config key 'model.converters': unknown converter {name!r}{hint}")


def _validate_pattern(key: str, pattern: dict, value_ok, what: str) -> None:
    import re

    for k, v in pattern.items():
        if not isinstance(k, str) or not k:
            raise UserError(f"config key '{key}' maps module names or regexes to values, got key {k!r}")
        try:
            re.compile(pattern_regex(k))
        except (re.error, OverflowError, RecursionError) as e:  # a{99999999999}, thousands of nested groups
            raise UserError(f"config key '{key}': {k!r} is not a valid regular expression ({e})") from None
        if isinstance(v, bool) or not value_ok(v):
            raise UserError(f"config key '{key}': {k!r} must map to {what}, got {v!r}")


def validate_variants(cfg) -> None:
    """The LoRA variants' keys: lora.init, rank/alpha patterns, lora.layers, train.loraplus_lr_ratio."""
    check_init(cfg.lora.init)
    _validate_pattern("lora.rank_pattern", cfg.lora.rank_pattern, lambda v: isinstance(v, int) and v > 0,
                      "a positive integer rank")
    _validate_pattern("lora.alpha_pattern", cfg.lora.alpha_pattern, lambda v: isinstance(v, (int, float)) and v > 0,
                      "an alpha > 0")
    layers = cfg.lora.layers
    as_list = [layers] if isinstance(layers, int) else layers
    if layers is not None and (not isinstance(as_list, list) or not as_list or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in as_list)):
        raise UserError(f"config key 'lora.layers' must be a layer index or a non-empty list of them, got {layers!r}")
    ratio = cfg.train.loraplus_lr_ratio
    if ratio is not None and not ratio > 0:
        raise UserError(f"config key 'train.loraplus_lr_ratio' must be > 0, got {ratio!r}")
    if ratio is not None and cfg.train.method != "lora":
        raise UserError("config key 'train.loraplus_lr_ratio' applies to LoRA only (train.method is full)")
    validate_target_parameters(cfg)


def validate_target_parameters(cfg) -> None:
    """lora.target_parameters: names only here (the model checks what they match, peft/experts.py),
    and the settings PEFT's ParamWrapper refuses, named before any weight loads."""
    tp, lo = cfg.lora.target_parameters, cfg.lora
    if not all(isinstance(t, str) and t.strip() for t in tp):
        raise UserError(f"config key 'lora.target_parameters' must be a list of parameter names, got {tp!r}")
    if not tp:
        return
    refused = [
        (cfg.train.method == "full", "train.method is full"),
        (bool(lo.dropout), f"lora.dropout={lo.dropout:g}: expert LoRA has no dropout, as PEFT's; set lora.dropout=0"),
        (lo.use_dora, "lora.use_dora: DoRA does not apply to fused expert weights"),
        (lo.init not in ("kaiming", "gaussian"), f"lora.init={lo.init} does not apply to fused expert weights "
                                                 "(kaiming or gaussian)"),
        (lo.layers is not None, "lora.layers does not select parameters in PEFT's format; name the layers' "
                                "parameters in full (model.layers.0.mlp.experts.gate_up_proj)"),
    ]
    for bad, why in refused:
        if bad:
            raise UserError(f"config key 'lora.target_parameters' cannot be used here: {why}")


def validate_preference(cfg) -> None:
    """train.objective and its knobs: DPO's reference is the base with LoRA switched off, so it needs LoRA
    over an untouched base (no full fine-tuning, no init that rewrites the base weights)."""
    t = cfg.train
    checks = [
        ("train.beta", t.beta > 0, "must be > 0"),
        ("train.label_smoothing", 0 <= t.label_smoothing < 0.5, "must be in [0, 0.5)"),
        ("train.orpo_lambda", t.orpo_lambda >= 0, "must be >= 0"),
    ]
    for key, ok, why in checks:
        if not ok:
            raise UserError(f"config key '{key}' {why}, got {getattr(t, key.split('.')[1])!r}")
    if t.label_smoothing and t.dpo_loss not in ("sigmoid", "robust"):
        raise UserError(f"config key 'train.label_smoothing' applies to train.dpo_loss sigmoid or robust, "
                        f"not {t.dpo_loss}")
    if t.objective != "dpo":
        return
    if t.method != "lora":
        raise UserError("config key 'train.objective': dpo needs train.method=lora (its reference model is the "
                        "base with LoRA switched off, not a second copy of the weights)")
    if mutates_base(cfg.lora.init):
        raise UserError(f"config key 'train.objective': dpo cannot use lora.init={cfg.lora.init}, which rewrites "
                        "the base weights (the reference would no longer be the base model)")

"""Findings: each claim's check, its verdict rule in words, and the verdict on the cells' statistics.

A finding in a preset names a check and its parameters (the cells, the metric, a threshold); those
are the rule, fixed before any run: `validate_findings` checks them when the study loads,
`rule_text` says them in words (study.json keeps the words; the report prints them before the
results), and `judge` applies them. Every check that can come out unclear carries `if_unclear`:
what would decide it (more seeds, more steps, a larger model) and the flag or override that does.

Intervals are 95% t intervals (stats.py); a difference's is the paired t interval of the per-seed
differences when both cells ran the same seeds, Welch's otherwise (the measurement names which).
With one seed on a side there is no interval and the means alone decide (deterministic metrics:
parameter counts, estimates). Under `--until-decided` every interval is at the per-look level
(sequential.py) instead of 5%. An unclear verdict's measurement ends with the minimum detectable
effect: the smallest true difference (or distance from the threshold) the runs so far would have
found with 80% power, from their observed spread and n.
"""
from __future__ import annotations

import math

from ..errors import UserError
from .stats import Diff, Stat, difference, fmt

# check -> the keys it needs (besides claim and metric)
CHECKS = {"lower": ("a", "b"), "higher": ("a", "b"), "similar": ("a", "b"), "ratio": ("a", "b", "expect"),
          "consistent": ("cell",), "best": ("cell", "cells"), "ordered": ("cells",), "above": ("cell", "value"),
          "below": ("cell", "value"), "none": ()}
NUMBERS = ("expect", "tol", "rel_tol", "max_cv", "value")  # parameters the rule computes with
CAN_BE_UNCLEAR = {"lower", "higher", "similar", "consistent", "best", "above", "below"}
FINDING_KEYS = {"claim", "check", "metric", "metric_b", "unit", "a", "b", "cell", "cells", "expect", "tol", "rel_tol",
                "max_cv", "direction", "value", "if_unclear", "scale", "scale_cpu", "scale_gpu", "measured"}


def validate_findings(findings, cell_names, where: str) -> list[dict]:
    """The findings of a study, checked: known check, its keys, cells that exist, an if_unclear."""
    if not isinstance(findings, list):
        raise UserError(f"{where}: findings must be a list, got {type(findings).__name__}")
    known = set(cell_names)
    for i, f in enumerate(findings):
        here = f"{where}: findings[{i}]"
        if not isinstance(f, dict):
            raise UserError(f"{here} must be a mapping, got {f!r}")
        if unknown := set(f) - FINDING_KEYS:
            raise UserError(f"{here}: unknown key(s) {', '.join(sorted(map(str, unknown)))}")  # YAML keys: any type
        check = f.get("check", "none")
        if not isinstance(check, str) or check not in CHECKS:
            raise UserError(f"{here}: check must be one of {', '.join(CHECKS)}, got {check!r}")
        if missing := [k for k in CHECKS[check] if k not in f]:
            raise UserError(f"{here}: check {check} needs {', '.join(missing)}")
        if check != "none" and not isinstance(f.get("metric"), str):
            raise UserError(f"{here}: metric must name what is compared (e.g. final_val_loss)")
        if check == "similar" and "tol" not in f and "rel_tol" not in f:
            raise UserError(f"{here}: check similar needs tol (absolute) or rel_tol (relative to b)")
        if not isinstance(f.get("cells") or [], list):
            raise UserError(f"{here}: cells must be a list of cell names, got {f['cells']!r}")
        if bad := [k for k in NUMBERS if k in f and (isinstance(f[k], bool) or not isinstance(f[k], (int, float)))]:
            raise UserError(f"{here}: {bad[0]} must be a number, got {f[bad[0]]!r}")  # rule_text computes with it
        named = [f[k] for k in ("a", "b", "cell") if k in f] + list(f.get("cells") or [])
        if bad := [c for c in named if not isinstance(c, str) or c not in known]:
            raise UserError(f"{here}: names cell(s) {', '.join(map(str, bad))}, not in this study "
                            f"(cells: {', '.join(sorted(known))})")
        if check in CAN_BE_UNCLEAR and not str(f.get("if_unclear", "")).strip():
            raise UserError(f"{here}: check {check} can come out unclear: say what would decide it (if_unclear)")
    return findings


def _tol(spec: dict) -> str:
    if "tol" in spec:
        return f"{float(spec['tol']):g}"
    return f"{100 * float(spec['rel_tol']):g}% of mean {spec.get('metric_b', spec['metric'])}({spec['b']})"


PAIRED_CHECKS = ("lower", "higher", "similar", "best")  # judged on a difference between cells


def test_for(spec: dict, cell_seeds: dict) -> str | None:
    """The test a finding's differences use, from the cells' seeds: paired when the cells it
    compares share two or more seeds (judged on those), Welch otherwise, `means` with one seed on a side;
    None for a check with no difference."""
    if spec.get("check") not in PAIRED_CHECKS:
        return None
    names = [spec[k] for k in ("a", "b", "cell") if k in spec] + list(spec.get("cells") or [])
    seeds = [frozenset(cell_seeds.get(n, ())) for n in names]
    if min(map(len, seeds)) < 2:
        return "means"
    return "paired" if len(frozenset.intersection(*seeds)) >= 2 else "Welch"


def _test_words(spec: dict) -> str:
    test = spec.get("test")
    if test == "paired":
        return " (a paired t interval over the per-seed differences of the seeds both sides ran)"
    if test == "means":
        return " (one seed on a side: no interval; the means alone decide)"
    return " (Welch's interval: the sides ran different seeds)" if test == "Welch" else ""


def rule_text(spec: dict) -> str:
    """The verdict rule of one finding in words (from its check and parameters alone)."""
    check, m = spec.get("check", "none"), spec.get("metric", "")
    a, b = spec.get("a"), spec.get("b")
    diff = f"the 95% interval{_test_words(spec)} of {m}({a}) - {spec.get('metric_b', m)}({b})"
    if check in ("lower", "higher"):
        side, other = ("below", "above") if check == "lower" else ("above", "below")
        return f"agree if {diff} lies {side} 0; disagree if it lies {other} 0; else unclear"
    if check == "similar":
        return (f"agree if {diff} lies within ±{_tol(spec)}; disagree if it lies entirely outside; else unclear")
    if check == "ratio":
        return (f"agree if mean({a}) / mean({b}) of {m} is within {float(spec.get('tol', 0.1)):g} of "
                f"{float(spec['expect']):g}; else disagree")
    if check == "consistent":
        return (f"agree if {m}'s coefficient of variation over the seeds of {spec['cell']} is at most "
                f"{100 * float(spec.get('max_cv', 0.05)):g}%; else disagree (unclear below two seeds)")
    if check == "best":
        how = "highest" if spec.get("direction", "min") == "max" else "lowest"
        return (f"agree if {spec['cell']} has the {how} {m} of {', '.join(spec['cells'])} and the 95% interval"
                f"{_test_words(spec)} of its difference to each other cell excludes 0; disagree if another cell is "
                f"better by such an interval; else unclear")
    if check == "ordered":
        how = "increases" if spec.get("direction", "increasing") in ("increasing", "max") else "decreases"
        return f"agree if the mean {m} {how} strictly along {', '.join(spec['cells'])}; else disagree"
    if check in ("above", "below"):
        other = "at or below" if check == "above" else "at or above"
        return (f"agree if the 95% interval of {m}({spec['cell']}) lies {check} {float(spec['value']):g}; disagree "
                f"if it lies {other} it; else unclear")
    return "not judged (reported for context)"


def _pm(s: Stat, unit: str = "") -> str:
    return f"{fmt(s.mean)}{unit}" if s.n < 2 else f"{fmt(s.mean)} ± {fmt(s.std)}{unit}"


def _interval(diff: Diff, unit: str) -> str:
    d, hw = diff.d, diff.hw
    text = f"{fmt(d)}{unit}" if not hw else f"{fmt(d)} [{fmt(d - hw)}, {fmt(d + hw)}]{unit}"
    return text + (f" ({diff.test}, n={diff.n})" if diff.test != "none" else "")


def _mde(value: float, unit: str) -> str:
    return f"; detectable effect {fmt(value)}{unit} (80% power)" if math.isfinite(value) else ""


def judge(spec: dict, stats: dict, alpha: float = 0.05) -> tuple[str, str]:
    """(our measurement, verdict) for one finding. Verdicts: agree, disagree, unclear (the rule's
    interval straddles its threshold), not measured (a cell failed or the metric is missing).
    alpha: the two-sided level of every interval (0.05; a per-look level under --until-decided)."""
    text, verdict = _judge(spec, stats, alpha)
    if verdict == "unclear" and (mde := unclear_mde(spec, stats, alpha)) is not None:
        text += _mde(mde, spec.get("unit", ""))
    return text, verdict


def unclear_mde(spec: dict, stats: dict, alpha: float = 0.05) -> float | None:
    """The minimum detectable effect of a finding's comparison (None where it has none)."""
    check, metric = spec.get("check", "none"), spec.get("metric", "")
    try:
        if check in ("lower", "higher", "similar"):
            b = stats[spec["b"]][spec.get("metric_b", metric)]
            return difference(stats[spec["a"]][metric], b, alpha).mde(alpha)
        if check in ("above", "below"):
            return stats[spec["cell"]][metric].mde(alpha)
        if check == "best":
            cell = stats[spec["cell"]][metric]
            mdes = [difference(cell, stats[c][metric], alpha).mde(alpha) for c in spec["cells"]
                    if c != spec["cell"] and metric in stats.get(c, {})]
            return max(mdes) if mdes else None
    except KeyError:
        return None
    return None


def _judge(spec: dict, stats: dict, alpha: float) -> tuple[str, str]:
    check, metric, unit = spec.get("check", "none"), spec.get("metric", ""), spec.get("unit", "")
    metric_b = spec.get("metric_b", metric)  # b may be another metric of the same cell (ours vs the article's)
    needs = [(spec[k], metric_b if k == "b" else metric) for k in ("cell", "a", "b") if k in spec]
    missing = [f"{m} of {c}" for c, m in needs if m not in stats.get(c, {})]
    if check == "none":
        return spec.get("measured", "-"), "not measured"
    if missing:
        return f"no {', '.join(missing)} (failed or not run)", "not measured"
    get = lambda c, m=metric: stats[c][m]
    if check == "consistent":
        s = get(spec["cell"])
        if s.n < 2:
            return _pm(s, unit), "unclear"
        cv = abs(s.std / s.mean) if s.mean else math.inf
        limit = float(spec.get("max_cv", 0.05))
        return f"{_pm(s, unit)} over {s.n} seeds (CV {100 * cv:.1f}%)", "agree" if cv <= limit else "disagree"
    if check in ("above", "below"):
        s = get(spec["cell"])
        hw = s.half_width_at(alpha) if s.n >= 2 else 0.0
        lo, hi = s.mean - hw, s.mean + hw
        text = f"{spec['cell']} {_pm(s, unit)}" + (f" [{fmt(lo)}, {fmt(hi)}]" if s.n >= 2 else "")
        value = float(spec["value"])
        if check == "above":  # all of the interval beyond the value agrees; all of it at or before disagrees
            agree, disagree = lo > value, hi <= value
        else:
            agree, disagree = hi < value, lo >= value
        return text, "agree" if agree else ("disagree" if disagree else "unclear")
    if check in ("lower", "higher", "similar", "ratio"):
        a, b = get(spec["a"]), get(spec["b"], metric_b)
        diff = difference(a, b, alpha)
        d, hw = diff
        ratio = f", {a.mean / b.mean:.2f}x" if b.mean else ""
        b_name = spec["b"] if metric_b == metric else f"{spec['b']} {metric_b}"  # another metric: say which
        text = f"{spec['a']} {_pm(a, unit)} vs {b_name} {_pm(b, unit)}{ratio}"
        if check == "ratio":  # the size of an effect: mean(a) / mean(b) near the article's ratio
            ok = b.mean and abs(a.mean / b.mean - float(spec["expect"])) <= float(spec.get("tol", 0.1))
            return f"{text} (article {float(spec['expect']):.2f}x)", "agree" if ok else "disagree"
        text += f"; difference {_interval(diff, unit)}"
        if check == "similar":  # equivalence: the whole interval inside the tolerance
            tol = float(spec["tol"]) if "tol" in spec else abs(b.mean) * float(spec["rel_tol"])
            if abs(d) + hw <= tol:
                return text, "agree"
            return text, "disagree" if abs(d) - hw > tol else "unclear"
        sign = -1 if check == "lower" else 1
        if sign * d > hw:
            return text, "agree"
        return text, "disagree" if sign * d < -hw else "unclear"
    if check in ("best", "ordered"):
        cells = list(spec.get("cells") or [c for c in stats if metric in stats[c]])
        present = [c for c in cells if metric in stats.get(c, {})]
        if not present:
            return f"no {metric} in any cell", "not measured"
        want_max = spec.get("direction", "min") in ("max", "increasing")
        text = ", ".join(f"{c} {_pm(get(c), unit)}" for c in present)
        if check == "ordered":
            means = [get(c).mean for c in present]
            steps = [(y - x) * (1 if want_max else -1) for x, y in zip(means, means[1:])]
            return text, "agree" if all(s > 0 for s in steps) else "disagree"
        sign = 1 if want_max else -1  # > 0: the first cell is better than the second
        best = (max if want_max else min)(present, key=lambda c: get(c).mean)
        cell = spec["cell"]
        if cell not in present:
            return text, "not measured"
        diffs = [difference(get(cell), get(c), alpha) for c in present if c != cell]
        gaps = [(sign * d, hw) for d, hw in diffs]
        text += f"; {diffs[0].test} intervals, n={diffs[0].n}" if diffs and diffs[0].test != "none" else ""
        if best == cell and all(g > hw for g, hw in gaps):
            return f"best: {best} ({text})", "agree"
        beaten = any(g < -hw for g, hw in gaps)
        return f"best: {best} ({text})", "disagree" if beaten else "unclear"
    return f"unknown check {check!r}", "not measured"

"""Study reports: the Findings verdicts, results.csv, report.md / report.html, plots.

results.py reads a study folder (its plan and each run's summary.json) into per-cell `Stat`s
(stats.py); this module turns those into files and knows nothing of how runs are launched. The
PNGs come from plots.py. A report can be regenerated at any time without running anything.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from ..io.fileio import atomic_write_text
from .stats import Stat, difference


def write_results_csv(path: Path, stats: dict) -> Path:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["cell", "metric", "n", "mean", "std", "ci95_low", "ci95_high"])
    num = lambda x: "" if x is None or not math.isfinite(x) else repr(round(x, 10))
    for cell, metrics in stats.items():
        for name in sorted(metrics):
            s = metrics[name]
            lo, hi = s.ci
            w.writerow([cell, name, s.n, num(s.mean), num(s.std), num(lo), num(hi)])
    return atomic_write_text(path, buf.getvalue())


# ---------------------------------------------------------------------------------------------
# Findings: each spec in the study YAML names a check on the cells' statistics.

def _pm(s: Stat, unit: str = "") -> str:
    return f"{fmt(s.mean)}{unit}" if s.n < 2 else f"{fmt(s.mean)} ± {fmt(s.std)}{unit}"


def judge(spec: dict, stats: dict) -> tuple[str, str]:
    """(our measurement, verdict) for one finding. Verdicts: agree, disagree, unclear (inside the
    noise of our seeds), not measured (a cell failed or the metric is missing)."""
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
        text = f"{_pm(s, unit)} over {s.n} seeds (CV {100 * cv:.1f}%; agree below {100 * limit:g}%)"
        return text, "agree" if cv <= limit else "disagree"
    if check in ("lower", "higher", "similar", "ratio"):
        a, b = get(spec["a"]), get(spec["b"], metric_b)
        d, hw = difference(a, b)
        ratio = f", {a.mean / b.mean:.2f}x" if b.mean else ""
        b_name = spec["b"] if metric_b == metric else f"{metric_b}"
        text = f"{spec['a']} {_pm(a, unit)} vs {b_name} {_pm(b, unit)}{ratio}"
        if check == "ratio":  # the size of an effect: mean(a) / mean(b) near the article's ratio
            ok = b.mean and abs(a.mean / b.mean - float(spec["expect"])) <= float(spec.get("tol", 0.1))
            return f"{text} (article {float(spec['expect']):.2f}x)", "agree" if ok else "disagree"
        if check == "similar":
            tol = float(spec.get("tol", 0.0)) if "tol" in spec else abs(b.mean) * float(spec.get("rel_tol", 0.05))
            if abs(d) <= tol:
                return text, "agree"
            return text, "unclear" if abs(d) - hw <= tol else "disagree"
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
        best = (max if want_max else min)(present, key=lambda c: get(c).mean)
        if best == spec["cell"]:
            return f"best: {best} ({text})", "agree"
        d, hw = difference(get(best), get(spec["cell"]))
        return f"best: {best} ({text})", "unclear" if abs(d) <= hw else "disagree"
    return f"unknown check {check!r}", "not measured"


def findings_rows(plan: dict, stats: dict) -> list[list[str]]:
    """[claim, measurement, verdict, scale note]; a spec may carry a note per scale (scale_gpu: ...)."""
    scale = plan.get("scale", "cpu")
    return [[spec.get("claim", ""), *judge(spec, stats), spec.get(f"scale_{scale}") or spec.get("scale") or ""]
            for spec in plan.get("findings", [])]


# ---------------------------------------------------------------------------------------------
# Rendering: a report is a list of sections, rendered to Markdown and to plain HTML alike.

def fmt(x) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if isinstance(x, str):
        return x
    if abs(x) >= 1e5 and float(x).is_integer():
        return f"{int(x):,}"
    return f"{x:.4g}" if abs(x) < 1e4 else f"{x:,.0f}"


def _cell_text(s: Stat) -> str:
    if s.n < 2:
        return f"{fmt(s.mean)} (n=1)"
    lo, hi = s.ci
    return f"{fmt(s.mean)} ± {fmt(s.std)} [{fmt(lo)}, {fmt(hi)}] (n={s.n})"


def render_markdown(sections: list) -> str:
    out = []
    for kind, *rest in sections:
        if kind in ("h1", "h2"):
            out.append(("# " if kind == "h1" else "## ") + rest[0])
        elif kind == "p" and rest[0]:
            out.append(rest[0])
        elif kind == "table":
            head, rows = rest
            esc = lambda v: str(v).replace("|", "\\|").replace("\n", " ")
            out.append("\n".join(["| " + " | ".join(map(esc, head)) + " |", "|" + "---|" * len(head)]
                                 + ["| " + " | ".join(map(esc, r)) + " |" for r in rows]))
        elif kind == "img":
            out.append(f"![{rest[1]}]({rest[0]})")
    return "\n\n".join(out) + "\n"


def render_html(sections: list, title: str) -> str:
    import html
    import re

    # The Markdown `code` marks are the only inline markup the sections use.
    inline = lambda t: re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(str(t)))
    body = []
    for kind, *rest in sections:
        if kind in ("h1", "h2"):
            body.append(f"<{kind}>{inline(rest[0])}</{kind}>")
        elif kind == "p" and rest[0]:
            body.append(f"<p>{inline(rest[0]).replace('**', '')}</p>")
        elif kind == "table":
            head, rows = rest
            cls = lambda v: f' class="{v}"' if v in ("agree", "disagree", "unclear", "failed") else ""
            body.append("<table><tr>" + "".join(f"<th>{inline(h)}</th>" for h in head) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td{cls(v)}>{inline(v)}</td>" for v in r) + "</tr>"
                                  for r in rows) + "</table>")
        elif kind == "img":
            body.append(f'<figure><img src="{html.escape(rest[0])}" alt="{html.escape(rest[1])}">'
                        f"<figcaption>{inline(rest[1])}</figcaption></figure>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:4px 8px;"
             "text-align:left;vertical-align:top}th{background:#eee}img{max-width:100%}"
             ".agree{background:#dfd}.disagree{background:#fdd}.unclear{background:#ffd}.failed{background:#fdd}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


# ---------------------------------------------------------------------------------------------
# The report

KEY_METRICS = ("final_val_loss", "best_val_loss", "final_train_loss", "acc_mean", "runtime_s", "step_s", "wall_s",
               "peak_memory_mb", "tokens_per_s", "trainable_params")
SCALE_NOTE = {"cpu": "Scale: SmolLM2-135M on a 2-core CPU, short runs of synthetic arithmetic; the article "
                     "used Llama-2-7B on an A100 with Alpaca-sized data, so effects can differ in size and sign.",
              "gpu": "Scale: the article's settings (7B-class model on one GPU); data and evaluation are ours.",
              "estimate": "Scale: an analytic estimate for Llama-2-7B on one GPU, the article's own setting; "
                          "nothing was measured on this machine."}


def make_report(study_dir: str | Path, plan: dict, stats: dict, runs: list) -> dict:
    """Write results.csv, report.md, report.html and plots/*.png into the study folder.

    plan: the study.json dict; stats: {cell: {metric: Stat}}; runs: one dict per (cell, seed) with
    cell, seed, dir, status, wall_s, error, warnings (results.collect builds both from the folder).
    """
    study_dir = Path(study_dir)
    estimate = plan.get("kind") == "estimate"
    write_results_csv(study_dir / "results.csv", stats)
    from .plots import make_plots  # matplotlib loads only when a report is written

    plots = make_plots(study_dir, stats, runs)
    sec = [("h1", f"Study: {plan['name']}" + ("" if estimate else f" (scale {plan.get('scale', 'cpu')})")),
           ("p", " ".join(plan.get("description", "").split()))]
    if plan.get("overrides"):
        sec.append(("p", "Common overrides: " + " ".join(f"`{o}`" for o in plan["overrides"])))
    if estimate:
        sec.append(("h2", "Estimated peak memory vs the article"))
        if plan.get("estimator_error"):
            sec.append(("p", f"Estimator missing: {plan['estimator_error']}"))
        sec.append(("table", ["configuration", "settings", "estimate (GB)", "article (GB)", "difference"],
                    [[r["name"], r.get("settings", ""), fmt(r.get("peak_gb")) if r.get("peak_gb") is not None
                      else r.get("error", "-"), fmt(r.get("article_gb")),
                      f"{100 * (r['peak_gb'] / r['article_gb'] - 1):+.0f}%"
                      if r.get("peak_gb") and r.get("article_gb") else "-"] for r in plan.get("estimates", [])]))
    else:
        sec += [("h2", "Cells"), ("table", ["cell", "overrides", "seeds"],
                                  [[c["name"], " ".join(f"`{o}`" for o in c["overrides"]) or "-",
                                    ", ".join(map(str, c["seeds"]))] for c in plan["cells"]])]
        failed = [r for r in runs if r["status"] != "ok"]
        wall = sum(r["wall_s"] or 0 for r in runs)
        sec += [("h2", "Runs"), ("p", f"{len(runs) - len(failed)} of {len(runs)} runs finished; "
                                      f"{wall / 60:.1f} min of run time in all (each run's own process)."),
                ("table", ["cell", "seed", "status", "wall time (s)", "error"],
                 [[r["cell"], r["seed"], r["status"], fmt(r["wall_s"]), r["error"] or ""] for r in runs])]
        metrics = [m for m in KEY_METRICS if any(m in s for s in stats.values())]
        metrics += sorted({m for s in stats.values() for m in s if m.startswith("acc_") and m != "acc_mean"})
        sec += [("h2", "Results: mean ± std [95% interval] (n seeds)"),
                ("table", ["metric"] + list(stats),
                 [[m] + [_cell_text(stats[c][m]) if m in stats[c] else "-" for c in stats] for m in metrics])]
        warnings = sorted({w for r in runs for w in r["warnings"]})
        if warnings:
            sec += [("h2", "Warnings from the runs")] + [("p", w) for w in warnings]
    if plots:
        sec += [("h2", "Plots")] + [("img", str(p.relative_to(study_dir)), cap) for p, cap in plots]
    sec += [("h2", "Findings"), ("p", SCALE_NOTE.get("estimate" if estimate else plan.get("scale", "cpu"), "")),
            ("table", ["the article's claim", "our measurement (mean ± std)", "verdict", "scale"],
             findings_rows(plan, stats))]
    md = atomic_write_text(study_dir / "report.md", render_markdown(sec))
    html = atomic_write_text(study_dir / "report.html", render_html(sec, f"loralab study {plan['name']}"))
    return {"results_csv": study_dir / "results.csv", "report_md": md, "report_html": html,
            "plots": [p for p, _ in plots], "stats": stats, "runs": runs}

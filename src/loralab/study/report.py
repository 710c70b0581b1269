"""Study reports: results.csv, report.md / report.html (verdict rules, sweeps, validation curves,
Findings), findings.json (the Findings as data), plots.

results.py reads a study folder (its plan and each run's summary.json) into per-cell `Stat`s
(stats.py); verdicts.py judges the findings; this module turns both into files and knows nothing
of how runs are launched. The PNGs come from plots.py. A report can be regenerated at any time
without running anything.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from ..io.fileio import atomic_write_text, write_json
from .results import StudyResults
from .stats import Stat, fmt
from .verdicts import judge, rule_text


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


FINDINGS_KEYS = ("id", "claim", "measurement", "verdict", "if_unclear", "scale")  # findings.json's, per row


def findings_rows(plan: dict, stats: dict) -> list[list[str]]:
    """[#, claim, measurement, verdict, what would decide it (unclear only), scale note]; a spec may
    carry a note per scale (scale_gpu: ...)."""
    scale = plan.get("scale", "cpu")
    rows = []
    alpha = (plan.get("sequential") or {}).get("look_alpha", 0.05)  # --until-decided: the per-look level
    for i, spec in enumerate(plan.get("findings", []), 1):
        measured, verdict = judge(spec, stats, alpha)
        rows.append([f"F{i}", spec.get("claim", ""), measured, verdict,
                     spec.get("if_unclear", "") if verdict == "unclear" else "",
                     spec.get(f"scale_{scale}") or spec.get("scale") or ""])
    return rows


def rules_rows(plan: dict) -> list[list[str]]:
    """[#, claim, the verdict rule, what would decide an unclear one], as fixed before the run."""
    return [[f"F{i}", spec.get("claim", ""), spec.get("rule") or rule_text(spec), spec.get("if_unclear", "")]
            for i, spec in enumerate(plan.get("findings", []), 1)]


# ---------------------------------------------------------------------------------------------
# Rendering: a report is a list of sections, rendered to Markdown and to plain HTML alike.

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

KEY_METRICS = ("final_val_loss", "best_val_loss", "val_loss_rise", "best_val_step", "heldout_loss", "forgetting",
               "test_loss", "test_loss_seen_tasks",
               "test_loss_unseen_tasks", "acc_mean", "acc_seen_tasks", "acc_unseen_tasks", "final_train_loss",
               "runtime_s", "step_s", "wall_s", "peak_memory_mb", "tokens_per_s", "trainable_params", "steps")
SCALE_NOTE = {"cpu": "Scale: SmolLM2-135M on a 2-core CPU, short runs on the instruction suite (or arithmetic); "
                     "the article used Llama-2-7B on an A100 with Alpaca, so effects can differ in size and sign.",
              "gpu": "Scale: the article's settings (7B-class model on one GPU); data and evaluation are ours.",
              "estimate": "Scale: an analytic estimate for Llama-2-7B on one GPU, the article's own setting; "
                          "nothing was measured on this machine."}
SWEEP_METRICS = ("acc_mean", "acc_unseen_tasks", "test_loss")  # shown beside the choice, for context only
MAX_CURVE_ROWS = 24


def _sweep_sections(plan: dict, sweeps: dict) -> list:
    if not sweeps:
        return []
    select = plan.get("select", "final_val_loss")
    sec = [("h2", "Sweeps: each cell at its own best settings"),
           ("p", f"Each swept cell ran every point on its sweep seed(s), validating only; the point with the lowest "
                 f"mean {select} (the validation set) is the cell: its sweep runs there were then evaluated and its "
                 "other seeds ran there. The held-out test never chose; its numbers (the chosen point's only) are "
                 "context, the Findings compare chosen against chosen.")]
    for cell, choice in sweeps.items():
        seeds = ", ".join(map(str, choice["seeds"]))
        rows = []
        for row in choice["rows"]:
            st = row["stats"]
            rows.append([row["point"] + (" (chosen)" if row["point"] == choice["point"] else ""),
                         " ".join(f"`{o}`" for o in row["overrides"])]
                        + [_cell_text(st[m]) if m in st else "-" for m in (select, *SWEEP_METRICS)])
        edge = (" It is at the end of the grid: a better value may lie beyond it (a wider sweep would tell)."
                if choice.get("edge") else "")
        sec += [("p", f"Cell **{cell}** (seed {seeds}): chose {choice['point'] or 'nothing (no point finished)'}."
                      + edge),
                ("table", ["point", "overrides", select, *SWEEP_METRICS], rows)]
    return sec


def _curve_sections(curves: dict) -> list:
    """The validation loss at each evaluation, mean over seeds, when the runs validated along the way."""
    curves = {c: steps for c, steps in curves.items() if len(steps) >= 3}
    if not curves:
        return []
    steps = sorted({s for by_step in curves.values() for s in by_step})
    if len(steps) > MAX_CURVE_ROWS:  # every k-th evaluation, and always the last
        k = -(-len(steps) // MAX_CURVE_ROWS)
        steps = sorted(set(steps[::k]) | {steps[-1]})
    return [("h2", "Validation loss along training (mean over seeds)"),
            ("p", "val_loss_rise (Results) is each run's last validation loss minus its best; best_val_step is "
                  "where the curve turned up (the last step: it never did)."),
            ("table", ["step"] + list(curves),
             [[str(s)] + [fmt(curves[c][s].mean) if s in curves[c] else "" for c in curves] for s in steps])]


def _level(plan: dict) -> str:
    """The intervals' level: 95%, or the per-look level of an --until-decided study."""
    alpha = (plan.get("sequential") or {}).get("look_alpha", 0.05)
    return f"{100 * (1 - alpha):.4g}%"


def make_report(study_dir: str | Path, plan: dict, results: StudyResults) -> dict:
    """Write results.csv, report.md, report.html and plots/*.png into the study folder.

    plan: the study.json dict; results: what results.collect read back from the folder (per-cell
    statistics, one record per run, the sweeps' choices and the validation curves).
    """
    study_dir = Path(study_dir)
    stats, runs = results.stats, results.runs
    estimate = plan.get("kind") == "estimate"
    write_results_csv(study_dir / "results.csv", stats)
    findings = findings_rows(plan, stats)  # also as data: docs/gen_study_results.py counts the verdicts
    write_json(study_dir / "findings.json", [dict(zip(FINDINGS_KEYS, row)) for row in findings])
    from .plots import make_plots  # matplotlib loads only when a report is written

    plots = make_plots(study_dir, stats, runs, results.curves)
    sec = [("h1", f"Study: {plan['name']}" + ("" if estimate else f" (scale {plan.get('scale', 'cpu')})")),
           ("p", " ".join(plan.get("description", "").split()))]
    if plan.get("overrides"):
        sec.append(("p", "Common overrides: " + " ".join(f"`{o}`" for o in plan["overrides"])))
    if plan.get("findings"):
        sec += [("h2", "Verdict rules (fixed in the preset before the run)"),
                ("p", "Intervals are 95% t intervals over the seeds. A difference between two cells that ran the "
                      "same seeds is judged on its per-seed differences (a paired t interval: a seed gives both "
                      "cells the same data order, evaluation items and, where shapes agree, starting LoRA "
                      "factors); otherwise Welch's. With one seed on a side the means alone decide. Each rule "
                      "names its test; each measurement, the test and n it used."),
                ("table", ["#", "the article's claim", "verdict rule", "if unclear, what would decide it"],
                 rules_rows(plan))]
        if seq := plan.get("sequential"):
            sec.append(("p", f"Run with --until-decided: seeds were added, a round at a time, to the cells behind "
                             f"unclear claims (up to {seq['max_seeds']} a cell). So that stopping when a claim is "
                             f"decided stays valid, every interval above and in the Findings is a "
                             f"{100 * (1 - seq['look_alpha']):.2f}% interval, not 95%: 5% spent equally over the "
                             f"{seq['looks']} possible looks (docs/studies.md)."))
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
        chosen = {c: f" (sweep chose {s['point']})" if s["point"] else " (sweep: no point finished)"
                  for c, s in results.sweeps.items()}
        sec += [("h2", "Cells"), ("table", ["cell", "overrides", "seeds"],
                                  [[c["name"] + chosen.get(c["name"], ""),
                                    " ".join(f"`{o}`" for o in c["overrides"]) or "-",
                                    ", ".join(map(str, c["seeds"]))] for c in plan["cells"]])]
        sec += _sweep_sections(plan, results.sweeps)
        failed = [r for r in runs if r["status"] != "ok"]
        wall = sum(r["wall_s"] or 0 for r in runs)
        taken = sum(bool(r.get("reused_from")) for r in runs)
        sec += [("h2", "Runs"), ("p", f"{len(runs) - len(failed)} of {len(runs)} runs finished; "
                                      f"{wall / 60:.1f} min of run time in all (each run's own process)"
                                      + (f"; {taken} trained in a study beside this one and copied (--no-reuse "
                                         "trains them here)." if taken else ".")),
                ("table", ["cell", "seed", "status", "wall time (s)", "note"],
                 [[r["cell"] + (f" @ {r['point']}" if r.get("point") else ""), r["seed"], r["status"],
                   fmt(r["wall_s"]), r["error"] or (f"trained in {r['reused_from']}" if r.get("reused_from") else "")]
                  for r in runs])]
        metrics = [m for m in KEY_METRICS if any(m in s for s in stats.values())]
        metrics += sorted({m for s in stats.values() for m in s if m.startswith("acc_") and m not in KEY_METRICS})
        sec += [("h2", "Results: mean ± std [95% interval] (n seeds)"),
                ("table", ["metric"] + list(stats),
                 [[m] + [_cell_text(stats[c][m]) if m in stats[c] else "-" for c in stats] for m in metrics])]
        sec += _curve_sections(results.curves)
        warnings = sorted({w for r in runs for w in r["warnings"]})
        if warnings:
            sec += [("h2", "Warnings from the runs")] + [("p", w) for w in warnings]
    if plots:
        sec += [("h2", "Plots")] + [("img", str(p.relative_to(study_dir)), cap) for p, cap in plots]
    sec += [("h2", "Findings"), ("p", SCALE_NOTE.get("estimate" if estimate else plan.get("scale", "cpu"), "")),
            ("table", ["#", "the article's claim",
                       f"our measurement (mean ± std; difference [{_level(plan)} interval])", "verdict",
                       "what would decide it", "scale"], findings)]
    md = atomic_write_text(study_dir / "report.md", render_markdown(sec))
    html = atomic_write_text(study_dir / "report.html", render_html(sec, f"loralab study {plan['name']}"))
    return {"results_csv": study_dir / "results.csv", "report_md": md, "report_html": html,
            "plots": [p for p, _ in plots], "stats": stats, "runs": runs, "sweeps": results.sweeps}

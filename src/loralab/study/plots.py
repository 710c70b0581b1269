"""Study plots (PNG, matplotlib): loss curves per cell, the mean validation curve (where it turned
up), held-out accuracy with 95% intervals, and peak memory against training time. Per-run curves
come from each run's metrics.jsonl; matplotlib is imported only here, so `loralab --help` and the
studies' dry runs stay fast."""
from __future__ import annotations

import io
import json
from pathlib import Path

from ..errors import UserError
from ..io.fileio import atomic_write_bytes


def _read_metrics(run_dir: Path) -> tuple[list, list]:
    train, val = [], []
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return train, val
    for line in lines:
        try:
            r = json.loads(line)
        except ValueError:
            continue  # a run killed mid-line leaves a partial last line
        if "val_loss" in r:
            val.append((r["step"], r["val_loss"]))
        elif "loss" in r:
            train.append((r["step"], r["loss"]))
    return train, val


MAX_TASK_BARS = 6  # more tasks than this (the instruction suite): bars for the aggregates instead


def make_plots(study_dir: Path, stats: dict, runs: list, val_curves: dict | None = None) -> list[tuple[Path, str]]:
    try:
        import matplotlib
    except ImportError:
        raise UserError("study plots need matplotlib: pip install matplotlib") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out, plots = study_dir / "plots", []
    out.mkdir(exist_ok=True)
    colors = {c: f"C{i % 10}" for i, c in enumerate(stats)}

    def save(fig, name, caption):
        path, buf = out / name, io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        atomic_write_bytes(path, buf.getvalue())  # a reader never sees half a PNG
        plots.append((path, caption))

    curves = [(r, *_read_metrics(r["dir"])) for r in runs if r["status"] == "ok"]
    if any(t for _, t, _ in curves):
        fig, (ax_t, ax_v) = plt.subplots(1, 2, figsize=(11, 4))
        seen, cells = set(), list(stats)
        curve = max(len(v) for _, _, v in curves) > 1  # else: validation only at the end of each run
        for r, train, val in curves:
            label = None if r["cell"] in seen else r["cell"]
            seen.add(r["cell"])
            if train:  # a running mean over 5 steps: single-step losses are too noisy to compare
                xs, ys = zip(*train)
                smooth = [sum(ys[max(0, i - 4):i + 1]) / len(ys[max(0, i - 4):i + 1]) for i in range(len(ys))]
                ax_t.plot(xs, smooth, color=colors[r["cell"]], alpha=0.8, lw=1, label=label)
            if val and curve:
                ax_v.plot(*zip(*val), "o-", color=colors[r["cell"]], alpha=0.8, ms=3, lw=1, label=label)
            elif val:
                ax_v.plot([cells.index(r["cell"])], [val[-1][1]], "o", color=colors[r["cell"]], label=label)
        ax_t.set(title="training loss (5-step running mean)", xlabel="step", ylabel="loss")
        if curve:
            ax_v.set(title="validation loss", xlabel="step", ylabel="loss")
        else:
            ax_v.set(title="final validation loss, one point per seed", ylabel="loss")
            ax_v.set_xticks(range(len(cells)), cells, rotation=20, fontsize=8)
        for ax in (ax_t, ax_v):
            ax.legend(fontsize=7)
        save(fig, "loss_curves.png", "Training and validation loss per cell (one line per seed)")
    accs = sorted({m for s in stats.values() for m in s if m.startswith("acc_") and m != "acc_mean"})
    groups = ("acc_seen_tasks", "acc_unseen_tasks")
    if len(accs) > MAX_TASK_BARS:
        accs = [m for m in ("acc_mean", *groups) if any(m in s for s in stats.values())]
    else:
        accs = [m for m in accs if m not in groups]
    cells = [c for c in stats if any(m in stats[c] for m in accs)]
    if accs and cells:
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(cells) * len(accs)), 4))
        width = 0.8 / len(accs)
        for j, m in enumerate(accs):
            xs = [i + j * width for i, c in enumerate(cells)]
            means = [stats[c][m].mean if m in stats[c] else 0 for c in cells]
            errs = [stats[c][m].half_width if m in stats[c] and stats[c][m].n > 1 else 0 for c in cells]
            ax.bar(xs, means, width, yerr=errs, capsize=3, label=m[4:])
        ax.set_xticks([i + width * (len(accs) - 1) / 2 for i in range(len(cells))], cells, rotation=20, fontsize=8)
        ax.set(ylabel="exact match (%)", title="held-out accuracy after training (error bars: 95% interval)")
        ax.legend()
        save(fig, "eval_scores.png", "Held-out exact match per cell and task, mean with 95% interval")
    val_curves = {c: by_step for c, by_step in (val_curves or {}).items() if len(by_step) >= 3}
    if val_curves:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for c, by_step in val_curves.items():
            steps = sorted(by_step)
            means = [by_step[s].mean for s in steps]
            ax.plot(steps, means, "o-", ms=3, lw=1.2, color=colors.get(c, "k"), label=c)
            turn = min(range(len(means)), key=means.__getitem__)  # the best: where the curve turns up
            ax.plot([steps[turn]], [means[turn]], "v", ms=8, color=colors.get(c, "k"))
        ax.set(xlabel="step", ylabel="validation loss", title="validation loss, mean over seeds (v: its best)")
        ax.legend(fontsize=7)
        save(fig, "val_curves.png", "Validation loss at each evaluation, mean over seeds; the marker is its best, "
                                    "after which it rose")
    if any("peak_memory_mb" in s and "runtime_s" in s for s in stats.values()):
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for c, s in stats.items():
            if "peak_memory_mb" in s and "runtime_s" in s:
                ax.scatter(s["runtime_s"].values, s["peak_memory_mb"].values, color=colors[c], label=c)
        ax.set(xlabel="training time (s)", ylabel="peak memory (MB)", title="memory vs time, one point per run")
        ax.legend(fontsize=7)
        save(fig, "memory_vs_time.png", "Peak training memory against training time, one point per run")
    return plots

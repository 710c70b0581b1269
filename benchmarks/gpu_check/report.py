"""The GPU check's report: one JSON file and a Markdown table (what docs/gpu.md shows)."""
from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path


def environment(device) -> dict:
    import torch
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "cuda": torch.version.cuda}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["gpus"] = torch.cuda.device_count()
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            env["driver"] = None
    else:
        try:
            have = set(Path("/proc/cpuinfo").read_text().split())
        except OSError:
            have = set()
        env["cpu_flags"] = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in have]
    return env


def _num(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


NUMBERS = ("max_abs_error", "tolerance", "measured_gb", "estimate_gb", "article_gb", "error_pct", "step_s",
           "tokens_per_s", "mfu", "epoch_h", "article_h")


def markdown(result: dict) -> str:
    env = result["environment"]
    head = ", ".join(f"{k} {v}" for k, v in env.items() if v not in (None, []))
    lines = [f"GPU check on {result['device']}{' (--tiny)' if result['tiny'] else ''}: {head}; "
             f"{result['total_wall_s']:.1f} s in all", "",
             "| part | check | status | " + " | ".join(NUMBERS) + " | note |",
             "|---|---|---|" + "---|" * len(NUMBERS) + "---|"]
    for r in result["rows"]:
        cells = [r["part"], r["check"], r["status"], *(_num(r.get(k)) for k in NUMBERS), r.get("note", "")]
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    lines += ["", "| part | wall s |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in result["part_wall_s"].items()]
    return "\n".join(lines) + "\n"


def write(result: dict, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    j, m = out / "gpu_check.json", out / "gpu_check.md"
    j.write_text(json.dumps(result, indent=1, default=str))
    m.write_text(markdown(result))
    return j, m

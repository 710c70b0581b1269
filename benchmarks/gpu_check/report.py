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


# the numbers a row may carry, as the table names them (unit after the value)
NUMBERS = (("measured_gb", "measured", " GB"), ("estimate_gb", "estimate", " GB"),
           ("cli_estimate_gb", "`loralab estimate`", " GB"), ("article_gb", "article", " GB"),
           ("error_pct", "error", "%"), ("step_s", "step", " s"), ("tokens_per_s", "tokens/s", ""),
           ("mfu", "MFU", ""), ("epoch_h", "epoch", " h"), ("article_h", "article", " h"))


def _numbers(r: dict) -> str:
    return ", ".join(f"{label} {_num(r[k])}{unit}" for k, label, unit in NUMBERS if r.get(k) is not None)


def _error(r: dict) -> str:
    if r.get("max_abs_error") is None:
        return ""
    return f"{_num(r['max_abs_error'])} (≤ {_num(r.get('tolerance'))})"


def markdown(result: dict) -> str:
    env = result["environment"]
    head = ", ".join(f"{k} {v}" for k, v in env.items() if v not in (None, []))
    lines = [f"GPU check on {result['device']}{' (--tiny)' if result['tiny'] else ''}: {head}; "
             f"{result['total_wall_s']:.1f} s in all", "",
             "| part | check | status | error (tolerance) | numbers | note |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        cells = [r["part"], r["check"], r["status"], _error(r), _numbers(r), r.get("note", "")]
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

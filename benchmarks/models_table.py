"""docs/models.md from the architecture matrix's results (tests/model/test_matrix.py).

    .venv/bin/python benchmarks/models_table.py [runs/models.json] [docs/models.md]

`make models` runs the matrix with LORALAB_MATRIX_JSON=runs/models.json and then this script. Each JSON row is
one architecture (see the test: trains, PEFT-equal with the measured difference, PEFT loads, merge, GGUF, the
weights no LoRA module covers, the run's rewrites once summary.json reports them, the known failure's reason).
Writes nothing but the page; a row missing from the JSON (the matrix was run with -k) still gets a line, so the
page lists every family of tests/archs.py.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

COMMAND = "make models"
RAW = ("LORALAB_MATRIX_JSON=runs/models.json .venv/bin/python -m pytest tests/model/test_matrix.py -q "
       "-k test_architecture; .venv/bin/python benchmarks/models_table.py runs/models.json docs/models.md")
INTRO = f"""# Models

Which decoder-only families loralab fine-tunes correctly, checked on tiny random models of each (hidden 64,
2 layers, 4 heads / 2 KV heads) built offline from the family's own transformers config class, with the features
that set the family apart switched on: sliding windows of 8 tokens (layer 0 sliding, layer 1 full where the
family mixes them), soft-capping, attention sinks, q/k norms, experts, biases. The training examples (~100 tokens,
chat template) are far longer than the windows.

Produced by `{COMMAND}`, which runs

    {RAW}

The matrix (`tests/model/test_matrix.py`) is part of `make test`; a family that fails today is listed in its
`KNOWN_FAILURES` (strict xfail, the reason below), and `test_models_doc_lists_every_architecture` fails when a
family is added without regenerating this page.

Columns:
- **trains**: `loralab train` runs one step on it (LoRA on all linear layers, the default path).
- **PEFT-equal**: one SGD step (lr 1, B from 0, fp32) leaves in every LoRA module the B that PEFT on the model's
  own eager forward computes (-grad(B) of the step's mean token loss, each example on its own), within 1e-5
  relative; the number is the largest max|diff| / max|B| over the modules.
- **PEFT loads**: `PeftModel.from_pretrained` loads the adapter with loralab's own logits (1e-5 relative);
  **merge**: `loralab merge` writes a folder transformers loads with those logits.
- **GGUF**: `loralab export --gguf` writes a LoRA GGUF the `gguf` package reads, or refuses in one line.
- **rewrites**: the converters (loralab's rewrites of attention, norms, MLP, packing, the loss's head) the run
  applied, then those it declined for this model, from summary.json's `converters`.
- **not covered**: weight matrices no LoRA module wraps (fused MoE experts, convolutions).
"""

HEADER = ("| architecture | features | trains | rewrites | PEFT-equal | PEFT loads | merge | GGUF | not covered "
          "| known failure |")
RULE = "|" + "---|" * HEADER.count(" | ") + "---|"


def _mark(ok) -> str:
    return "" if ok is None else ("yes" if ok else "**no**")


def _num(x) -> str:
    return "" if x is None else f"{x:.2g}"


def _cell(text) -> str:
    return str(text or "").replace("|", "\\|").replace("\n", " ")


def _rewrites(found: dict | None) -> str:
    """summary.json's converters: the applied ones by name, the declined ones by name (their reasons are in the
    JSON; a table cell has no room for them)."""
    conv = (found or {}).get("converters")
    if isinstance(conv, dict):
        applied, declined = conv.get("applied") or [], conv.get("declined") or {}
        return "; ".join(filter(None, [", ".join(applied), "declined: " + ", ".join(declined) if declined else ""]))
    return json.dumps(found) if found else ""


def row_line(name: str, features: str, r: dict | None) -> str:
    if r is None:
        return f"| `{name}` | {_cell(features)} | not run |  |  |  |  |  |  |  |"
    equal = r.get("peft_max_diff")
    equal_cell = "" if equal is None else f"{_mark(equal <= 1e-5)} ({_num(equal)})"
    loads = r.get("peft_loads")
    loads_cell = "" if loads is None else f"{_mark(loads and (r.get('peft_logits_diff') or 0) <= 1e-5)}" + (
        f" ({_num(r.get('peft_logits_diff'))})" if r.get("peft_logits_diff") is not None else "")
    gguf = r.get("gguf") or ""
    if gguf == "refused":
        reason = r.get("gguf_reason", "").removeprefix("loralab: error: ")
        gguf = f"refused: {reason}" if "supports" not in reason else "refused (family not supported)"
    elif gguf == "written":
        gguf = f"written ({r.get('gguf_reason', '')})"
    rewrites = _rewrites(r.get("rewrites"))
    error = r.get("error") or ""
    trains = _mark(r.get("trains")) + (f": {error[:140]}{'...' if len(error) > 140 else ''}" if error else "")
    return "| " + " | ".join(_cell(c) for c in (
        f"`{name}`", features, trains, rewrites, equal_cell, loads_cell,
        _mark(r.get("merge_ok")), gguf, ", ".join(r.get("left_out") or []), r.get("known_failure"))) + " |"


def render(rows: list[dict]) -> str:
    from archs import ARCHS

    by_name = {r["arch"]: r for r in rows}
    ran = [r for r in rows if r.get("trains")]
    equal = [r for r in ran if (r.get("peft_max_diff") is not None and r["peft_max_diff"] <= 1e-5)]
    summary = (f"\n{len(ARCHS)} families; {len(ran)} train, {len(equal)} of them PEFT-equal; "
               f"{sum(1 for r in rows if r.get('gguf') == 'written')} export a GGUF.\n\n")
    lines = [row_line(name, arch.features, by_name.get(name)) for name, arch in ARCHS.items()]
    return INTRO + summary + "\n".join([HEADER, RULE, *lines]) + "\n" + converters_section()


def converters_section() -> str:
    """The converters, from model/convert.py itself: what each changes and the private names it relies on."""
    from loralab.model.convert import CONVERTERS

    rows = [f"| `{c.name}` | {c.does} | {', '.join(c.after) or '-'} | "
            f"{', '.join(f'`{n.replace(chr(58), chr(46))}`' for n in c.needs) or '-'} |" for c in CONVERTERS]
    return ("\n## The rewrites\n\nEach applies where its check (the model's structure) passes and a probe on a "
            "tiny twin of the model\n(its own config class, 2 layers) gives the untouched twin's loss and gradients "
            "on every layout it touches;\nelse it declines, and the run's `model rewrites:` line says why. "
            "`model.converters=off` trains the model as\ntransformers computes it.\n\n"
            "| converter | what it changes | builds on | private names it needs |\n|---|---|---|---|\n"
            + "\n".join(rows) + "\n")


def main(argv: list[str]) -> int:
    src = Path(argv[0]) if argv else ROOT / "runs" / "models.json"
    dst = Path(argv[1]) if len(argv) > 1 else ROOT / "docs" / "models.md"
    dst.write_text(render(json.loads(src.read_text())))
    print(f"wrote {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

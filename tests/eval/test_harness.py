"""lm-evaluation-harness: loralab's tasks as lm-eval task files, lm-eval run in-process on our model,
and its exact_match equal to loralab's own exact match on the same items."""
import json
import subprocess
import sys

import pytest
import torch

from loralab.cli import main
from loralab.data.formats import Example
from loralab.data.tasks import TASKS, answer_matches, make_task
from loralab.eval.harness import run_harness
from loralab.eval.harness_tasks import TASKS_DIR, exact_match_task, write_task_files
from loralab.eval.metrics import exact_match, generate_answers
from loralab.peft.inject import inject
from loralab.peft.lora import LoraSpec
from tiny_tokenizer import make_tiny_tokenizer
from tinymodels import tiny_llama


def test_the_shipped_task_files_are_what_the_generator_writes(tmp_path):
    write_task_files(tmp_path)
    shipped = {p.name: p.read_text() for p in TASKS_DIR.iterdir() if p.is_file()}
    fresh = {p.name: p.read_text() for p in tmp_path.iterdir()}
    assert shipped == fresh and len(shipped) == 2 * len(TASKS) + 1
    rows = [json.loads(l) for l in (TASKS_DIR / "loralab_2ds.jsonl").read_text().splitlines()]
    test = make_task("2ds", 1, 100, 1234)[1]  # the held-out questions `loralab eval` scores
    assert rows == [{"prompt": ex.prompt, "answer": ex.response.strip()} for ex in test]


@pytest.fixture(scope="module")
def rigged(tmp_path_factory):
    """A tiny model with a random adapter, and 24 items whose answers are its own greedy first lines
    for even items and wrong for odd ones: loralab scores exactly half of them right."""
    tok = make_tiny_tokenizer()
    model = tiny_llama(3, vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    inject(model, "all-linear", LoraSpec(r=4, alpha=8))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.3)
    prompts = [ex.prompt for ex in make_task("2da", 0, 24, 7)[1]]
    outputs = generate_answers(model, tok, prompts, max_new_tokens=8)
    firsts = [o.lstrip().split("\n")[0].strip() for o in outputs]
    assert sum(bool(f) for f in firsts) >= 12  # mostly non-empty: the check below is not about empty answers
    items = [Example(prompt=p, response=" " + (f if i % 2 == 0 else f + "x")) for i, (p, f) in
             enumerate(zip(prompts, firsts))]
    folder = tmp_path_factory.mktemp("rigged-task")
    write_task_files(folder, exact_match_task("rigged", items))
    return model, tok, items, folder


def test_lm_evals_exact_match_equals_loralabs_on_the_same_items(rigged):
    model, tok, items, folder = rigged
    ours = exact_match(model, tok, items, max_new_tokens=8)
    per_item = [answer_matches(o, ex.response) for o, ex in
                zip(generate_answers(model, tok, [ex.prompt for ex in items], max_new_tokens=8), items)]
    theirs = run_harness(model, tok, ["rigged"], include_path=[str(folder)], batch_size=8)
    assert ours["accuracy"] == 0.5 and theirs["results"]["rigged"]["exact_match"] == ours["accuracy"]
    by_doc = {s["doc_id"]: s["exact_match"] == 1.0 for s in theirs["samples"]["rigged"]}
    assert [by_doc[i] for i in range(len(items))] == per_item  # item by item, not only on average


def test_eval_harness_cli_prints_before_and_after(tiny_folder, tmp_path, capsys):
    from loralab.config import load_config
    from loralab.pipeline import run_training

    out = tmp_path / "run"
    run_training(load_config(None, [f"model.name={tiny_folder}", "data.tasks=[2da]", "data.n_train=16", "eval.n=2",
                                    "eval.before=false", "train.max_steps=1", "train.batch_size=4",
                                    "train.progress=false", f"output_dir={out}"]), quiet=True)
    assert main(["eval", "--harness", "loralab_2da,loralab_2ds", "--adapter", str(out / "adapter"),
                 "--limit", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["task", "metric", "before", "after", "change", "(lm-eval)"]
    assert [l.split()[:2] for l in lines[1:]] == [["loralab_2da", "exact_match"], ["loralab_2ds", "exact_match"]]
    assert all(l.split()[2].endswith("%") and l.split()[3].endswith("%") for l in lines[1:])


def test_an_unknown_harness_task_is_one_line(tiny_folder, capsys):
    assert main(["eval", "--model", str(tiny_folder), "--harness", "loralab_2dx"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("loralab: error: --harness: unknown lm-eval task 'loralab_2dx' (did you mean loralab_2d")
    assert "--include-path" in err


def test_lm_eval_alone_runs_the_shipped_tasks_without_loralab(tiny_folder, tmp_path):
    code = ("import sys; sys.modules['loralab'] = None\n"  # any `import loralab` would fail
            "from lm_eval.__main__ import cli_evaluate; cli_evaluate()")
    proc = subprocess.run([sys.executable, "-c", code, "--model", "hf", "--model_args",
                           f"pretrained={tiny_folder}", "--device", "cpu", "--include_path", str(TASKS_DIR),
                           "--tasks", "loralab_2da", "--limit", "3", "--output_path", str(tmp_path / "res")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={"PATH": "/usr/bin:/bin", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
                               "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "loralab_2da" in proc.stdout and "exact_match" in proc.stdout

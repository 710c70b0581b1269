"""Using an adapter after training: `loralab merge` keeps the base's dtype unless told otherwise, and writes a
folder others can read."""
import json

import pytest
import torch
from safetensors import safe_open

from loralab.cli import main
from loralab.config import load_config
from loralab.pipeline import run_training
from tinymodels import save_tiny_folder


def _stored(folder) -> set:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys()}


@pytest.fixture(scope="module")
def trained(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("merge-run")
    run_training(load_config(None, [f"model.name={tiny_folder}", "data.tasks=[2da]", "data.n_train=16",
                                    "eval.n=2", "eval.before=false", "train.max_steps=3", "train.batch_size=4",
                                    "train.progress=false", "train.lr=5e-2", "train.precision=fp32",
                                    "lora.dropout=0", f"output_dir={out}"]), quiet=True)
    return out / "adapter"


def test_merge_defaults_to_the_bases_own_dtype_fp32(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    from loralab.inference import load_with_adapter

    assert main(["merge", str(trained), str(tmp_path / "merged")]) == 0  # no --dtype
    assert _stored(tmp_path / "merged") == {"F32"}
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ours, _ = load_with_adapter(None, str(trained))
    ids = torch.randint(3, 60, (2, 9))
    with torch.no_grad():  # fp32 all the way: the merged model computes what base + adapter did
        torch.testing.assert_close(merged(ids).logits, ours(ids).logits, atol=1e-5, rtol=1e-5)


def test_merge_defaults_to_bf16_for_a_bf16_base_and_obeys_dtype(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    base16 = tmp_path / "base-bf16"
    save_tiny_folder(base16)
    model = AutoModelForCausalLM.from_pretrained(base16, dtype=torch.bfloat16)
    model.save_pretrained(base16)  # the same weights, stored in bf16
    assert _stored(base16) == {"BF16"}
    assert main(["merge", str(trained), str(tmp_path / "m16"), "--model", str(base16)]) == 0
    assert _stored(tmp_path / "m16") == {"BF16"}
    assert main(["merge", str(trained), str(tmp_path / "m32"), "--model", str(base16), "--dtype", "fp32"]) == 0
    assert _stored(tmp_path / "m32") == {"F32"}
    assert json.loads((tmp_path / "m32" / "config.json").read_text())["dtype"] == "float32"


def test_the_merged_folders_generation_config_stops_on_the_tokenizers_eos(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    from tiny_tokenizer import make_tiny_tokenizer

    base = tmp_path / "base"
    save_tiny_folder(base, eos_token_id=0)  # converted from elsewhere: the config names <|endoftext|>
    model = AutoModelForCausalLM.from_pretrained(base)
    assert model.generation_config.eos_token_id == 0
    assert main(["merge", str(trained), str(tmp_path / "m"), "--model", str(base)]) == 0
    gen = json.loads((tmp_path / "m" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2 and gen["pad_token_id"] == 2  # <|im_end|>: what training taught

    tok = make_tiny_tokenizer()
    tok.eos_token = "<|endoftext|>"  # EOS and end of turn differ: both stop generation
    tok.save_pretrained(base)
    assert main(["merge", str(trained), str(tmp_path / "m2"), "--model", str(base)]) == 0
    assert json.loads((tmp_path / "m2" / "generation_config.json").read_text())["eos_token_id"] == [0, 2]


def test_eval_scores_the_suites_groups_family_by_family(tiny_folder):
    from loralab.data.families import HELD_OUT
    from loralab.inference import evaluate_model

    result = evaluate_model(str(tiny_folder), None, tasks=["suite-held-out", "2da"], n=2)
    assert list(result["eval"]) == [*HELD_OUT, "2da"] and all(r["n"] == 2 for r in result["eval"].values())


def test_merge_writes_a_folder_with_plain_permissions(trained, tmp_path):
    """Not mkdtemp's 0700 / 0600: the merged folder is read by whoever serves it."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        assert main(["merge", str(trained), str(tmp_path / "merged")]) == 0
    finally:
        os.umask(old)
    out = tmp_path / "merged"
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [out, *out.rglob("*")]}
    assert modes["merged"] == 0o755 and modes["model.safetensors"] == 0o644
    assert {m for n, m in modes.items() if (out / n).is_file()} == {0o644}


def test_merge_export_and_check_name_the_adapter_with_adapter(trained, tmp_path, capsys):
    """--adapter DIR, as eval, generate and combine take it; the older positional still works."""
    assert main(["merge", "--adapter", str(trained), str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "model.safetensors").is_file()
    assert main(["export", "--adapter", str(trained), "--gguf", str(tmp_path / "lora.gguf")]) == 0
    assert (tmp_path / "lora.gguf").stat().st_size > 0
    capsys.readouterr()
    assert main(["check", "--adapter", str(trained), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)  # the runtime table, for this adapter
    assert main(["check", str(trained), "--json"]) == 0  # the older form
    assert json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("argv, says", [
    (["merge", "--adapter", "A", "B", "C"], "merge: unexpected folder(s) C (--adapter A names the adapter)"),
    (["merge", "OUT"], "merge needs an adapter and a new folder: loralab merge --adapter DIR OUT_DIR"),
    (["check"], "check needs an adapter: loralab check --adapter DIR"),
    (["export", "--adapter", "A", "B", "--gguf", "x.gguf"], "export: unexpected folder(s) B"),
])
def test_an_adapter_named_wrongly_is_one_line(argv, says, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"loralab: error: {says}") and err.count("\n") == 1


def test_eval_shows_the_base_beside_the_adapter(trained, tiny_folder, capsys):
    from loralab.inference import evaluate_model

    assert main(["eval", "--adapter", str(trained), "--tasks", "2da", "--n", "4", "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert captured.err == ""  # trained on 2da: no warning
    base_alone = evaluate_model(str(tiny_folder), None, tasks=["2da"], n=4)["eval"]
    with_adapter = evaluate_model(None, str(trained), tasks=["2da"], n=4)
    assert result["base"] == base_alone == with_adapter["base"]  # one load: the base, then base + adapter
    assert result["eval"] == with_adapter["eval"]
    assert main(["eval", "--adapter", str(trained), "--tasks", "2da", "--n", "4"]) == 0
    header, row = capsys.readouterr().out.strip().splitlines()
    assert header.split()[:3] == ["task", "base", "adapter"]
    b, a = result["base"]["2da"], result["eval"]["2da"]
    assert row.split()[0] == "2da" and f"({b['correct']}/4)" in row and f"({a['correct']}/4)" in row
    assert row.endswith(f"{100 * (a['accuracy'] - b['accuracy']):+.1f} pts")


def test_eval_warns_when_the_tasks_are_not_what_the_adapter_trained_on(trained, tmp_path, capsys):
    import shutil

    assert main(["eval", "--adapter", str(trained), "--tasks", "2da,2ds", "--n", "2"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"loralab: warning: {trained} was trained on 2da; 2ds is not among them (held out from its "
                   "training)"]
    run = tmp_path / "file-run"  # an adapter trained on a data file: its run's config.yaml says data.path
    shutil.copytree(trained, run / "adapter")
    (run / "config.yaml").write_text("data:\n  path: mine.jsonl\n  tasks: [2da]\n")
    assert main(["eval", "--adapter", str(run / "adapter"), "--tasks", "2da", "--n", "2"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"loralab: warning: {run / 'adapter'} was trained on data.path "
                                               "mine.jsonl (its run's config.yaml), not on 2da")
    shutil.rmtree(run)
    shutil.copytree(trained, run)  # an adapter folder alone: nothing says what it trained on, no warning
    assert main(["eval", "--adapter", str(run), "--tasks", "2ds", "--n", "2"]) == 0
    assert capsys.readouterr().err == ""

"""`loralab train demo`: the shipped config, found from any folder (loralab/shipped.py)."""
from pathlib import Path

import pytest

import loralab.api
from loralab.cli import main
from loralab.errors import UserError
from loralab.shipped import SHIPPED_DIR, resolve_config

ROOT = Path(__file__).resolve().parents[1]


def test_the_repositorys_demo_config_is_the_shipped_one():
    assert (ROOT / "configs" / "demo.yaml").read_bytes() == (SHIPPED_DIR / "demo.yaml").read_bytes()


def _loaded(monkeypatch):
    """The API's run (what `loralab train` calls) replaced by a stand-in that reports which config reached
    it, as a UserError line."""
    def fake(cfg, **_):
        raise UserError(f"reached with lora.r={cfg.lora.r} model={cfg.model.name}")
    monkeypatch.setattr(loralab.api, "run", fake)


@pytest.mark.parametrize("arg", ["demo", "demo.yaml"])
def test_train_demo_from_any_folder(arg, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no configs/ here
    _loaded(monkeypatch)
    assert main(["train", arg, "lora.r=4"]) == 2
    assert capsys.readouterr().err == "loralab: error: reached with lora.r=4 model=smollm2-135m\n"


def test_a_path_from_the_repository_root_still_works_and_a_local_file_wins(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    _loaded(monkeypatch)
    assert main(["train", "configs/demo.yaml"]) == 2
    assert capsys.readouterr().err == "loralab: error: reached with lora.r=16 model=smollm2-135m\n"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo.yaml").write_text("lora: {r: 2}\n")  # a file of that name here is the user's own
    assert main(["train", "demo.yaml"]) == 2
    assert "lora.r=2" in capsys.readouterr().err
    assert resolve_config("demo.yaml") == "demo.yaml"


def test_an_unknown_bare_name_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "dmeo"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "dmeo: no such config file here, and not a shipped config (shipped: demo" in err
    assert main(["train", "sub/missing.yaml"]) == 2  # a path is not a name: the reader's own message
    assert "sub/missing.yaml: config file does not exist" in capsys.readouterr().err

"""Staged runs (model.adapter): the earlier adapter merged into the base is the model a run trains and
its DPO's reference; the run's adapter names that stage (loralab_stage.json) and loads on top of it;
the readers that would apply it to the plain base refuse or say so."""
import json

import pytest
import torch

from loralab.config import load_config
from loralab.errors import UserError
from loralab.model.load import load_weights
from loralab.peft.adapter_files import STAGE_NAME, earlier_stage, write_stage
from loralab.peft.adapters import load_adapter, save_adapter
from loralab.peft.check import runtime_support
from loralab.peft.combine import combine_adapters
from loralab.peft.lora import lora_disabled, lora_modules
from loralab.prepare import setup_model
from tinymodels import with_lora

IDS = torch.tensor([[3, 17, 42, 9, 5, 30, 11, 2]])


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _first_stage(tiny_folder, out):
    m = with_lora(load_weights(tiny_folder), seed=1).eval()
    save_adapter(m, out, base_model_name_or_path=str(tiny_folder))
    return _logits(m)


@pytest.fixture
def stages(tiny_folder, tmp_path):
    """A first adapter; a staged model on top of it, its LoRA given a non-zero update, saved as the second."""
    first, second = tmp_path / "first", tmp_path / "second"
    first_logits = _first_stage(tiny_folder, first)
    cfg = load_config(None, [f"model.name={tiny_folder}", f"model.adapter={first}", "train.precision=fp32",
                             "lora.r=4", "lora.dropout=0.0"])
    model, _, _, setup = setup_model(cfg, torch.device("cpu"))
    model.eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)
    save_adapter(model, second, base_model_name_or_path=str(tiny_folder))
    write_stage(second, first)
    return dict(first=first, second=second, first_logits=first_logits, model=model, setup=setup)


def test_the_reference_of_a_staged_run_is_the_earlier_stage(stages):
    with lora_disabled(stages["model"]):  # what DPO scores the reference with
        torch.testing.assert_close(_logits(stages["model"]), stages["first_logits"], atol=1e-5, rtol=1e-5)
    assert any("merged in (model.adapter" in n for n in stages["setup"].notes)


def test_a_staged_adapter_loads_on_top_of_its_earlier_stage(stages, tiny_folder):
    fresh = load_weights(tiny_folder)
    load_adapter(fresh, stages["second"])
    torch.testing.assert_close(_logits(fresh), _logits(stages["model"]), atol=1e-5, rtol=1e-5)
    (stages["second"] / STAGE_NAME).unlink()  # without the stage file: the plain base, another model
    plain = load_weights(tiny_folder)
    load_adapter(plain, stages["second"])
    assert (_logits(plain) - _logits(stages["model"])).abs().max() > 1e-3


def test_readers_of_the_plain_base_refuse_or_say_so(stages, tmp_path):
    rows = {r["runtime"]: r for r in runtime_support(stages["second"])}
    assert rows["loralab"]["loads"] and not rows["PEFT"]["loads"] and not rows["vLLM"]["loads"]
    assert "merged into the base (a staged run): merge that first" in rows["GGUF (llama.cpp)"]["why"]
    with pytest.raises(UserError, match="staged run's adapter"):
        combine_adapters([(stages["second"], 1.0), (stages["first"], 1.0)], tmp_path / "combined")
    from loralab.inference import export_gguf

    with pytest.raises(UserError, match="use --merged-gguf"):
        export_gguf(str(stages["second"]), lora_out=str(tmp_path / "a.gguf"))


def test_a_bad_or_missing_stage_is_one_line_naming_the_file(stages):
    (stages["second"] / STAGE_NAME).write_text("[1, 2")
    with pytest.raises(UserError, match=f"{STAGE_NAME}: not a stage file"):
        earlier_stage(stages["second"])
    (stages["second"] / STAGE_NAME).write_text(json.dumps({"merged_first": str(stages["first"] / "gone")}))
    with pytest.raises(UserError, match="earlier stage's adapter .* is gone"):
        earlier_stage(stages["second"])


def test_sft_then_dpo_end_to_end(tiny_folder, tmp_path):
    from loralab.pipeline import run_training

    run = [f"model.name={tiny_folder}", "data.tasks=[2da]", "data.template=raw", "data.val_fraction=0", "lora.r=4",
           "train.precision=fp32", "train.progress=false", "eval.before=false", "eval.tasks=[2da]", "eval.n=2",
           "eval.test_loss=false", "eval.forgetting=false", "data.n_train=8", "train.max_steps=2",
           "train.batch_size=4"]
    run_training(load_config(None, [*run, f"output_dir={tmp_path / 'sft'}"]), quiet=True)
    with pytest.raises(UserError, match="config key 'model.adapter': .* is not an adapter folder"):
        run_training(load_config(None, [*run, f"output_dir={tmp_path / 'bad'}", f"model.adapter={tmp_path}",
                                        "train.objective=dpo"]), quiet=True)
    assert not (tmp_path / "bad").exists()  # refused before the run's folder was made
    run_training(load_config(None, [*run, f"output_dir={tmp_path / 'dpo'}", "train.objective=dpo",
                                    f"model.adapter={tmp_path / 'sft' / 'adapter'}"]), quiet=True)
    assert earlier_stage(tmp_path / "dpo" / "adapter") == (tmp_path / "sft" / "adapter").resolve()

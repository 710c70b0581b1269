"""`loralab study list`: each preset with its one-line summary and expected time (study/spec.py)."""
import yaml

from loralab.cli import main
from loralab.study.spec import PRESET_DIR, list_presets, load_study


def test_every_preset_has_a_one_line_summary_and_a_time():
    for name in list_presets():
        spec = yaml.safe_load((PRESET_DIR / f"{name}.yaml").read_text())
        assert isinstance(spec.get("summary"), str) and 10 < len(spec["summary"]) <= 100, name
        assert "\n" not in spec["summary"] and spec.get("time"), name


def test_study_list_prints_name_time_and_summary(capsys):
    assert main(["study", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("preset") and "time" in lines[0]
    by_name = {line.split()[0]: line for line in lines[1:]}
    assert sorted(by_name) == sorted(list_presets())
    assert "~16 min" in by_name["rank"] and "rank 4 to 64 with alpha = 2r" in by_name["rank"]
    assert "seconds" in by_name["memory-7b"]


def test_a_preset_with_the_new_keys_still_loads():
    assert load_study("rank", scale="cpu").name == "rank"


def test_cells_read_only_for_memory_run_no_final_evaluation():
    """A cell whose every finding reads memory or parameter counts pays for no evaluation: at the cpu
    scale the 1,020 held-out items alone cost more than its few steps of training."""
    from loralab.study.sequential import findings_cells

    for name in list_presets():
        study = load_study(name)
        if study.kind != "train":
            continue
        read = {}
        for spec in study.findings:
            for cell in findings_cells(spec):
                read.setdefault(cell, set()).add(spec["metric"])
        for cell in study.cells:
            if read.get(cell.name) and read[cell.name] <= {"peak_memory_mb", "trainable_params"}:
                last = {o.split("=", 1)[0]: o.split("=", 1)[1] for o in study.overrides + cell.overrides}
                assert (last.get("eval.loss_items"), last.get("eval.tasks")) == ("0", "[]"), (name, cell.name)


"""The pre-flight checks (loralab.memory.preflight): what the device has, the memory verdict and its
fixes, the rank / context / data limits, and the disk a run's checkpoint needs (against real files)."""
import json
import re
import resource

import pytest

from loralab.config import load_config
from loralab.errors import UserError
from loralab.memory import estimate as E
from loralab.memory import preflight as P
from loralab.memory.arch import resolve_model_config
from loralab.memory.measure import current_rss_bytes
from tinymodels import random_encoded, tiny_llama

GiB = 2**30


# ---------------------------------------------------------------------------------------------
# What the device has: /proc/meminfo, cgroup v1 / v2 (fake trees), RLIMIT_AS

def _tree(tmp_path, cgroup_line: str, files: dict, meminfo_kb: int = 8 * 2**20):
    proc, root = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text(f"MemTotal: 99999999 kB\nMemFree: 1 kB\nMemAvailable: {meminfo_kb} kB\n")
    (proc / "self" / "cgroup").write_text(cgroup_line + "\n")
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return proc, root


def test_meminfo_alone(tmp_path):
    proc, root = _tree(tmp_path, "0::/", {}, meminfo_kb=3 * 2**20)
    assert P._meminfo_room(proc) == P.Room(3 * GiB, "MemAvailable")
    assert P._cgroup_rooms(proc, root) == []


def test_cgroup_v2_takes_the_tightest_level_up_the_hierarchy(tmp_path):
    proc, root = _tree(tmp_path, "0::/jobs/run1", {
        "cgroup.controllers": "memory",
        "jobs/run1/memory.max": "max\n",                 # no limit of its own
        "jobs/run1/memory.current": str(1 * GiB),
        "jobs/memory.max": str(4 * GiB),                # the parent's limit binds the child
        "jobs/memory.current": str(3 * GiB),
    })
    rooms = P._cgroup_rooms(proc, root)
    assert [r.bytes for r in rooms] == [1 * GiB] and "memory.max" in rooms[0].source
    room = P.cpu_room(proc, root)
    assert room.bytes == 1 * GiB and room.source.startswith("cgroup")  # tighter than MemAvailable's 8 GiB


def test_cgroup_v1_ignores_the_no_limit_value_and_reads_the_mount_top_in_a_container(tmp_path):
    proc, root = _tree(tmp_path, "4:memory:/outside/the/namespace", {
        "memory/memory.limit_in_bytes": "9223372036854771712",  # v1's "no limit"
        "memory/memory.usage_in_bytes": str(GiB),
    })
    assert P._cgroup_rooms(proc, root) == []
    (root / "memory" / "memory.limit_in_bytes").write_text(str(2 * GiB))
    assert [r.bytes for r in P._cgroup_rooms(proc, root)] == [GiB]


def test_rlimit_as_is_a_limit_less_what_is_mapped(monkeypatch, tmp_path):
    monkeypatch.setattr(P.resource, "getrlimit", lambda which: (6 * GiB, resource.RLIM_INFINITY))
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "status").write_text("Name: python\nVmSize:\t 1048576 kB\nVmRSS: 1 kB\n")
    room = P._address_space_room(proc)
    assert room.bytes == 5 * GiB and "ulimit -v" in room.source
    monkeypatch.setattr(P.resource, "getrlimit", lambda which: (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    assert P._address_space_room(proc) is None


def test_the_real_machine_gives_a_room():
    room = P.device_room("cpu")
    assert room is not None and room.bytes > 0


# ---------------------------------------------------------------------------------------------
# The memory verdict

SMOL = resolve_model_config("smollm2-135m")


def test_a_run_that_fits_says_so_with_its_estimate():
    cfg = load_config(None, ["train.precision=bf16"])
    v = P.check_memory(cfg, SMOL, "cpu", 64, P.Room(64 * GiB, "MemAvailable"))
    assert v.fits is True and "estimated peak" in v.line and "MemAvailable" in v.line


def test_a_run_that_does_not_fit_names_overrides_that_do():
    cfg = load_config(None, ["train.precision=bf16", "train.batch_size=256"])
    room = P.Room(2 * GiB, "MemAvailable")
    v = P.check_memory(cfg, SMOL, "cpu", 512, room)
    assert v.fits is False
    peak = E.estimate_for_run(cfg, SMOL, "cpu", seq=512)["peak_bytes"]
    assert peak > room.bytes + current_rss_bytes()
    suggested = re.findall(r"(?:\bfits with |\| )([^(|]+?) \(", v.line)
    assert suggested and "train.batch_size=" in suggested[0] and "train.preflight=warn" in v.line
    budget = room.bytes + min(current_rss_bytes(), E.CPU_RUNTIME_BYTES)
    for overrides in suggested:  # each suggestion, applied as the user would, really fits
        fixed = load_config(None, ["train.precision=bf16", "train.batch_size=256", *overrides.split()])
        seq = min(512, fixed.data.max_seq_len)
        assert E.estimate_for_run(fixed, SMOL, "cpu", seq=seq)["peak_bytes"] <= budget, overrides


def test_a_huge_rank_gets_a_lower_rank_as_the_fix():
    cfg = load_config(None, ["train.precision=bf16", "lora.r=576", "train.batch_size=1"])
    v = P.check_memory(cfg, SMOL, "cpu", 16, P.Room(1 * GiB, "MemAvailable"))
    assert v.fits is False and "lora.r=" in v.line


def test_an_unmodelled_architecture_is_never_refused():
    cfg = load_config(None, [])
    v = P.check_memory(cfg, {"model_type": "gpt2", "n_embd": 768}, "cpu", 64, P.Room(1, "MemAvailable"))
    assert v.fits is None and "no memory estimate" in v.line


def test_fixes_loralab_cannot_apply_are_left_out():
    assert P._as_overrides({"optimizer": "adamw8bit"}) is None
    assert P._as_overrides({"batch": 2, "grad_accum": 8}) == "train.batch_size=2 train.grad_accum=8"
    assert P._as_overrides({"grad_checkpointing": True}) == "train.gradient_checkpointing=true"
    assert P._as_overrides({"method": "qlora"}) == "model.quant=nf4"


# ---------------------------------------------------------------------------------------------
# Limits

WIDTHS = {"q_proj": (576, 576), "k_proj": (576, 192), "down_proj": (1536, 576)}


def test_rank_above_every_targeted_layer_is_an_error_naming_the_key():
    with pytest.raises(UserError, match=r"'lora.r' is 577.*576 for the widest \(q_proj 576 x 576\)"):
        P.check_rank(577, WIDTHS)


def test_rank_above_some_layers_is_a_warning_naming_them():
    assert P.check_rank(192, WIDTHS) == []  # min(in, out) itself is usable
    (line,) = P.check_rank(193, WIDTHS)
    assert line.startswith("lora.r=193") and "k_proj" in line and "q_proj" not in line


def test_module_widths_read_the_real_layers():
    from loralab.peft.targets import resolve_targets

    model = tiny_llama()  # hidden 32, 2 of 4 heads for k/v: k_proj and v_proj are 32 -> 16
    modules = dict(model.named_modules())
    widths = P.module_widths({n: modules[n] for n in resolve_targets(model, "all-linear")})
    assert widths["k_proj"] == (32, 16) and widths["gate_proj"] == (32, 64)
    assert "k_proj" in P.check_rank(17, widths)[0]
    with pytest.raises(UserError, match="lora.r"):
        P.check_rank(33, widths)


def test_the_config_widths_match_the_model(tiny_folder):
    cfg = load_config(None, ["lora.targets=[q_proj,k_proj]"])
    got = P._config_widths(cfg, json.loads((tiny_folder / "config.json").read_text()))
    assert got == {"q_proj": (32, 32), "k_proj": (32, 16)}
    assert P._config_widths(load_config(None, ["lora.targets=.*_proj"]), SMOL) == {}  # a regex: after loading


def test_examples_beyond_the_context_are_refused_naming_max_seq_len(tiny_folder):
    cfg = load_config(None, ["data.max_seq_len=512", "train.preflight=off"])
    with pytest.raises(UserError, match=r"'data.max_seq_len' is 512.*200 tokens.*context of 128 "
                                        r"\(max_position_embeddings\); set data.max_seq_len=128"):
        P.check_before_loading(cfg, tiny_folder, "cpu", random_encoded([20, 200]))
    assert P.check_before_loading(cfg, tiny_folder, "cpu", random_encoded([20, 128])) == []


def test_no_training_example_left_is_refused(tiny_folder):
    with pytest.raises(UserError, match="no training examples left"):
        P.check_before_loading(load_config(None, []), tiny_folder, "cpu", [])


def test_nf4_without_torchao_is_refused_before_any_weight_loads(tiny_folder, monkeypatch):
    cfg = load_config(None, ["model.quant=nf4", "train.preflight=off"])
    enc = random_encoded([20])
    assert P.check_before_loading(cfg, tiny_folder, "cpu", enc) == []  # the test extras install it
    real = P.importlib.util.find_spec
    monkeypatch.setattr(P.importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    with pytest.raises(UserError, match=r"'model.quant' is nf4, which needs torchao: pip install 'loralab\[qlora\]'"):
        P.check_before_loading(cfg, tiny_folder, "cpu", enc)
    assert P.check_before_loading(load_config(None, ["train.preflight=off"]), tiny_folder, "cpu", enc) == []


def test_preflight_modes(tiny_folder, monkeypatch):
    monkeypatch.setattr(P, "device_room", lambda device: P.Room(0, "test room"))
    enc = random_encoded([20, 30])
    with pytest.raises(UserError, match="not enough memory.*test room"):
        P.check_before_loading(load_config(None, ["train.precision=fp32"]), tiny_folder, "cpu", enc)
    (line,) = P.check_before_loading(load_config(None, ["train.preflight=warn"]), tiny_folder, "cpu", enc)
    assert line.startswith("warning: not enough memory")
    assert P.check_before_loading(load_config(None, ["train.preflight=off"]), tiny_folder, "cpu", enc) == []


# ---------------------------------------------------------------------------------------------
# Disk: the predicted checkpoint size against the files a real run writes

def _size(folder) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_checkpoint_size_bounds_the_real_checkpoint(optimizer, tiny_folder, tmp_path):
    from loralab.pipeline import run_training
    from loralab.train import checkpoint

    out = tmp_path / "run"
    cfg = load_config(None, [f"model.name={tiny_folder}", "lora.r=8", "data.tasks=[2da]", "data.n_train=8",
                             "data.template=raw", "train.max_steps=1", "train.progress=false",
                             f"train.optimizer={optimizer}", "eval.n=0", "eval.before=false", f"output_dir={out}"])
    summary = run_training(cfg, quiet=True)
    trainable = summary["trainable_params"]
    written = _size(checkpoint.latest(out / "checkpoints"))
    tensors = trainable * (4 + (8 if optimizer == "adamw" else 4))  # fp32 weights and moment(s)
    assert tensors < written < tensors + 64 * 1024  # the rest is headers, RNG states, state.json
    assert written <= P.checkpoint_bytes(trainable, cfg) <= written + P.CHECKPOINT_EXTRA_BYTES
    assert _size(out / "checkpoints") + _size(out / "adapter") <= P.bytes_to_write(trainable, cfg)


def test_check_disk_refuses_or_warns(tmp_path, monkeypatch):
    cfg = load_config(None, [])
    monkeypatch.setattr(P, "free_disk_bytes", lambda folder: 10 * 2**20)
    assert P.check_disk(tmp_path, 100_000, cfg) == []  # 100k params: ~2.6 MB with AdamW and the adapter
    with pytest.raises(UserError, match=r"'output_dir'.*10.00 MiB free.*10,000,000 trainable"):
        P.check_disk(tmp_path, 10_000_000, cfg)
    assert P.check_disk(tmp_path, 10_000_000, load_config(None, ["train.preflight=warn"]))[0].startswith("warning:")
    assert P.check_disk(tmp_path, 10_000_000, load_config(None, ["train.preflight=off"])) == []

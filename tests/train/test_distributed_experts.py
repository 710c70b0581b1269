"""Expert LoRA (lora.target_parameters) under data parallel training: 2 gloo processes on the CPU make
the update one process makes with the same global batch. FSDP2 only, the mode that shards the 3-D
expert weights and their factors (each case costs half a minute of CPU; DDP, which replicates them,
passes the same test with mode "ddp")."""
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from loralab.config import load_config
from loralab.pipeline import run_training
from tinymodels import save_tiny_moe_folder

RUN = ["data.tasks=[2da]", "data.template=raw", "data.val_fraction=0", "lora.r=4", "lora.dropout=0.0",
       "train.precision=fp32", "train.progress=false", "train.lr=1e-2", "eval.before=false", "eval.tasks=[]",
       "lora.target_parameters=[experts.gate_up_proj,experts.down_proj]", "data.n_train=16", "train.max_steps=2"]


@pytest.fixture(scope="module")
def moe_folder(tmp_path_factory):
    return save_tiny_moe_folder(tmp_path_factory.mktemp("tiny-moe"), "mixtral")


@pytest.mark.parametrize("mode", ["fsdp"])
def test_two_processes_train_expert_lora_as_one_does(moe_folder, tmp_path, mode):
    one, two = tmp_path / "one", tmp_path / "two"
    run_training(load_config(None, [f"model.name={moe_folder}", f"output_dir={one}", *RUN, "train.batch_size=8"]),
                 quiet=True)
    cmd = [sys.executable, "-m", "loralab.cli", "train", f"model.name={moe_folder}", f"output_dir={two}", *RUN,
           "train.batch_size=4", f"train.distributed={mode}", "--nproc", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    x, y = (load_file(run / "adapter" / "adapter_model.safetensors") for run in (one, two))
    experts = [k for k in x if ".experts." in k]
    assert x.keys() == y.keys() and len(experts) == 2 * 2 * 2  # A and B, 2 weights, 2 layers
    assert all(float(x[k].abs().max()) > 0 for k in experts if "lora_B" in k)  # they trained
    assert max(float((x[k] - y[k]).abs().max()) for k in x) <= 1e-5

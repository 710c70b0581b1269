"""io/models.py: copy_out_of_file lets a loaded safetensors file's memory map close; loading keeps the lean forwards."""
import gc
from pathlib import Path

import pytest
import torch

from loralab.model.load import copy_out_of_file, load_weights
from tinymodels import load_converted

MAPS = Path("/proc/self/maps")


def _mapped_ranges(path: Path) -> list[tuple[int, int]]:
    out = []
    for line in MAPS.read_text().splitlines():
        if line.endswith(str(path)):
            lo, hi = line.split()[0].split("-")
            out.append((int(lo, 16), int(hi, 16)))
    return out


def _in_file(model, ranges) -> int:
    return sum(any(lo <= t.data_ptr() < hi for lo, hi in ranges) for t in model.parameters())


@pytest.mark.skipif(not MAPS.exists(), reason="needs /proc/self/maps (Linux)")
def test_copy_out_of_file_releases_the_weights_file_and_keeps_the_values(tiny_folder):
    weights = Path(tiny_folder).resolve() / "model.safetensors"
    model = load_weights(tiny_folder, torch.float32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert _in_file(model, _mapped_ranges(weights)) > 0  # the premise: weights are views of the map
    copy_out_of_file(model)
    gc.collect()
    assert _in_file(model, _mapped_ranges(weights)) == 0
    assert _mapped_ranges(weights) == []  # nothing else held the map: it closed
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert not any(p.requires_grad for p in model.parameters())  # still frozen parameters


def test_the_lean_norm_and_mlp_survive_train_and_eval(tiny_folder):
    # transformers re-kernelizes a loaded model on each train()/eval() when the `kernels` package is
    # installed, putting the class's forward back on every RMSNorm; load_weights must prevent that
    model = load_converted(tiny_folder, torch.float32)
    norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    mlps = [m for m in model.modules() if hasattr(m, "gate_proj")]
    assert norms and mlps
    for mode in (True, False, True):
        model.train(mode)
        assert all("forward" in vars(m) for m in norms + mlps)

"""Atomic writers and the streamed safetensors writer, against safetensors' own reader."""
import json

import pytest
import torch
from safetensors.torch import load_file

from loralab.io.fileio import atomic_save_safetensors, atomic_write_bytes, atomic_write_text, write_json


def test_atomic_writers_leave_only_the_final_files(tmp_path):
    write_json(tmp_path / "d/a.json", {"x": [1, 2]})
    atomic_write_text(tmp_path / "d/b.txt", "héllo")
    atomic_save_safetensors({"w": torch.arange(6.0).view(2, 3).t()}, tmp_path / "d/c.safetensors")
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["a.json", "b.txt", "c.safetensors"]
    assert json.loads((tmp_path / "d/a.json").read_text()) == {"x": [1, 2]}
    assert (tmp_path / "d/b.txt").read_text(encoding="utf-8") == "héllo"
    assert torch.equal(load_file(tmp_path / "d/c.safetensors")["w"], torch.arange(6.0).view(2, 3).t())
    write_json(tmp_path / "d/a.json", {"x": 3})  # replaces
    assert json.loads((tmp_path / "d/a.json").read_text()) == {"x": 3}
    with pytest.raises(TypeError):  # a failed write keeps the old file and leaves no temp file
        atomic_write_bytes(tmp_path / "d/a.json", "str, not bytes")
    assert json.loads((tmp_path / "d/a.json").read_text()) == {"x": 3}
    assert len(list((tmp_path / "d").iterdir())) == 3


def test_streamed_safetensors_read_back_by_the_library(tmp_path):
    """Our streamed writer against safetensors' own reader (and its bytes for the same tensors)."""
    from safetensors import safe_open
    from safetensors.torch import save

    g = torch.Generator().manual_seed(0)
    tensors = {"w.bf16": torch.randn(3, 5, generator=g).to(torch.bfloat16), "b.f32": torch.randn(7, generator=g),
               "mask": torch.rand(4, 4, generator=g) > 0.5, "step": torch.tensor(12, dtype=torch.int64),
               "empty": torch.zeros(0, 3), "u8": torch.arange(5, dtype=torch.uint8), "view": torch.randn(6, 4)[:, 1]}
    path = atomic_save_safetensors(tensors, tmp_path / "t.safetensors", metadata={"format": "pt", "k": "v"})
    got = load_file(path)
    assert sorted(got) == sorted(tensors)
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt", "k": "v"}
    # the library's reader needs nothing more than its own writer gives: same size of file
    lib = save({k: v.contiguous() for k, v in tensors.items()}, metadata={"format": "pt", "k": "v"})
    assert abs(path.stat().st_size - len(lib)) < 64

"""`loralab combine` against PEFT's add_weighted_adapter (the oracle) on the same adapter folders."""
import json

import pytest
import torch
from safetensors.torch import load_file

from loralab.cli import main
from loralab.errors import UserError
from loralab.peft.adapters import adapter_delta, load_adapter
from loralab.peft.combine import combine_adapters, parse_adapter_arg
from tinymodels import tiny_llama

IDS = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(13))
WEIGHTS = (0.7, -1.3)


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def _peft_adapter(folder, seed, **config):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    pm = get_peft_model(tiny_llama(0), LoraConfig(lora_dropout=0.0, init_lora_weights=False, **config))
    pm.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two adapters over partly different modules, with different alphas (one rsLoRA)."""
    root = tmp_path_factory.mktemp("combine")
    a = _peft_adapter(root / "a", 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    b = _peft_adapter(root / "b", 2, r=4, lora_alpha=16, target_modules=["q_proj", "k_proj"], use_rslora=True)
    return a, b


def _peft_combined(folders, weights, method, **kw):
    from peft import PeftModel

    pm = PeftModel.from_pretrained(tiny_llama(0), folders[0], adapter_name="a0")
    for i, f in enumerate(folders[1:], 1):
        pm.load_adapter(f, adapter_name=f"a{i}")
    pm.add_weighted_adapter([f"a{i}" for i in range(len(folders))], list(weights), "m", combination_type=method, **kw)
    pm.set_adapter("m")
    return pm.eval()


def _peft_factors(pm):
    from peft.tuners.lora import LoraLayer

    return {n: (m.lora_A["m"].weight.detach(), m.lora_B["m"].weight.detach())
            for n, m in pm.base_model.model.named_modules() if isinstance(m, LoraLayer) and "m" in m.lora_A}


def _ours(folder):
    w = load_file(folder / "adapter_model.safetensors")
    names = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in w}
    return {n: (w[f"base_model.model.{n}.lora_A.weight"], w[f"base_model.model.{n}.lora_B.weight"]) for n in names}


@pytest.mark.parametrize("method, kw", [("linear", {}), ("cat", {}), ("svd", {}), ("svd", {"svd_rank": 3}),
                                        ("ties", {"density": 0.5}), ("magnitude_prune", {"density": 0.3})])
def test_each_method_equals_add_weighted_adapter(pair, method, kw, tmp_path):
    pm = _peft_combined(pair, WEIGHTS, method, **kw)
    out = combine_adapters(list(zip(pair, WEIGHTS)), tmp_path / "out", method=method, **kw)
    theirs, mine = _peft_factors(pm), _ours(out)
    assert set(mine) == set(theirs) and len(mine) == 6  # q (both), v (a only), k (b only) x 2 layers
    for name, (a, b) in mine.items():
        pa, pb = theirs[name]
        r = a.shape[0]
        if method == "cat":  # PEFT pads every module to the summed rank; the padding is zero
            assert torch.count_nonzero(pa[r:]) == 0 and torch.count_nonzero(pb[:, r:]) == 0
            pa, pb = pa[:r], pb[:, :r]
        if method == "svd":  # a singular vector's sign is arbitrary: compare the update
            torch.testing.assert_close(b @ a, pb @ pa, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(a, pa) and torch.equal(b, pb), name
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is False and cfg["r"] == cfg["lora_alpha"]
    ours = tiny_llama(0)
    load_adapter(ours, out)
    assert (logits(ours.eval()) - logits(pm)).abs().max() <= 1e-5


def test_cat_is_the_exact_weighted_sum_of_the_updates(pair, tmp_path):
    out = combine_adapters(list(zip(pair, WEIGHTS)), tmp_path / "out", method="cat")
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"):
        want = sum(w * adapter_delta(f, name) for f, w in zip(pair, WEIGHTS) if name in _ours(f))
        torch.testing.assert_close(adapter_delta(out, name), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_with_matched_randomness_equals_peft(method, tmp_path, monkeypatch):
    """One module each, and PEFT's global RNG seeded where its masks are drawn: the same masks."""
    from peft.tuners.lora.model import LoraModel

    folders = [_peft_adapter(tmp_path / f"s{i}", i, r=4, lora_alpha=8, target_modules=["q_proj"],
                             layers_to_transform=[0]) for i in range(2)]
    inner = LoraModel._generalized_task_arithmetic_weighted_adapter

    def seeded(self, *args, **kwargs):
        torch.manual_seed(17)
        return inner(self, *args, **kwargs)

    monkeypatch.setattr(LoraModel, "_generalized_task_arithmetic_weighted_adapter", seeded)
    pm = _peft_combined(folders, (1.0, 0.5), method, density=0.4)
    out = combine_adapters(list(zip(folders, (1.0, 0.5))), tmp_path / "out", method=method, density=0.4, seed=17)
    (name, (a, b)), = _ours(out).items()
    pa, pb = _peft_factors(pm)[name]
    assert torch.equal(a, pa) and torch.equal(b, pb)
    assert 0.3 < float((a != 0).float().mean()) < 0.95  # pruned, not all kept
    other = combine_adapters(list(zip(folders, (1.0, 0.5))), tmp_path / "other", method=method, density=0.4, seed=18)
    assert not torch.equal(_ours(other)[name][0], a)  # the seed matters


def test_bad_combinations_are_one_line_errors(pair, tmp_path):
    dora = _peft_adapter(tmp_path / "dora", 3, r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(UserError, match="DoRA"):
        combine_adapters([(pair[0], 1), (dora, 1)], tmp_path / "o1", method="cat")
    r8 = _peft_adapter(tmp_path / "r8", 4, r=8, lora_alpha=8, target_modules=["q_proj"])
    with pytest.raises(UserError, match="equal ranks.*cat or svd"):
        combine_adapters([(pair[0], 1), (r8, 1)], tmp_path / "o2", method="linear")
    combine_adapters([(pair[0], 1), (r8, 1)], tmp_path / "o3", method="cat")  # cat takes any ranks
    with pytest.raises(UserError, match="--density"):
        combine_adapters([(pair[0], 1), (pair[1], 1)], tmp_path / "o4", method="ties")
    with pytest.raises(UserError, match="not an empty folder"):
        combine_adapters([(pair[0], 1), (pair[1], 1)], tmp_path / "o3", method="cat")
    assert (tmp_path / "o3/adapter_config.json").exists()  # the earlier result is untouched
    assert parse_adapter_arg("runs/a/adapter:0.5") == ("runs/a/adapter", 0.5)
    assert parse_adapter_arg("runs/a/adapter") == ("runs/a/adapter", 1.0)


def test_cli_combine_writes_an_adapter_and_errors_are_one_line(pair, tmp_path, capsys):
    assert main(["combine", str(tmp_path / "c"), "--adapter", f"{pair[0]}:0.5", "--adapter", str(pair[1]),
                 "--method", "svd", "--svd-rank", "2"]) == 0
    assert json.loads((tmp_path / "c/adapter_config.json").read_text())["r"] == 2
    capsys.readouterr()
    assert main(["combine", str(tmp_path / "d"), "--adapter", str(pair[0]), "--method", "ties"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("loralab: error: ") and err.count("\n") == 1 and "--density" in err


@pytest.mark.parametrize("shapes, rank", [([(4, 96, 80), (6, 96, 80)], 6), ([(3, 40, 200), (5, 40, 200)], 8),
                                          ([(2, 8, 6), (3, 8, 6)], 7)])  # rank above out x in's: zero padding
def test_svd_on_the_factors_equals_the_dense_svd(shapes, rank, monkeypatch):
    """The SVD of the small core from QR of the stacked factors is the dense update's SVD, and no
    out x in matrix is ever decomposed."""
    from loralab.peft.combine import _low_rank_svd

    gen = torch.Generator().manual_seed(0)
    parts = [(torch.randn(r, n_in, generator=gen), torch.randn(n_out, r, generator=gen), s, w)
             for (r, n_out, n_in), s, w in zip(shapes, (0.5, 2.0), (0.7, -1.3))]
    delta = sum(w * s * b @ a for a, b, s, w in parts)
    u, sv, vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, sv.numel())
    dense = (u[:, :k] * sv[:k]) @ vh[:k]
    seen = []
    real_svd = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda m, **kw: seen.append(tuple(m.shape)) or real_svd(m, **kw))
    a, b = _low_rank_svd(parts, rank)
    total_r = sum(s[0] for s in shapes)
    assert seen and all(max(s) <= total_r for s in seen)  # only the R x R core
    assert a.shape == (k, shapes[0][2]) and b.shape == (shapes[0][1], k)  # the rank the dense SVD gave
    torch.testing.assert_close(b @ a, dense, rtol=1e-4, atol=1e-4)
    # the rank-k truncation's singular values are the dense ones (b's columns carry them, a is orthonormal)
    top = min(k, total_r)
    torch.testing.assert_close(b[:, :top].norm(dim=0), sv[:top], rtol=1e-4, atol=1e-4)


def test_cli_combine_honours_threads_and_shows_progress(pair, tmp_path, capsys, monkeypatch):
    calls = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(n) or real(n))
    before = torch.get_num_threads()
    assert main(["combine", str(tmp_path / "c"), "--adapter", str(pair[0]), "--adapter", str(pair[1]),
                 "--threads", "1"]) == 0
    assert calls[0] == 1 and torch.get_num_threads() == before  # set for the work, then restored
    assert "combine" in capsys.readouterr().err  # the multi-module bar, on stderr
    assert main(["combine", str(tmp_path / "d"), "--adapter", str(pair[0]), "--threads", "0"]) == 2
    assert capsys.readouterr().err.startswith("loralab: error: --threads must be a positive integer")

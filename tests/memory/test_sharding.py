"""Per-GPU memory over N GPUs (DDP replicated, FSDP2 sharded): closed forms, a real layer's bytes, the CLI."""
import io
import json
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch

from loralab.cli import main
from loralab.errors import UserError
from loralab.memory import arch as A
from loralab.memory import estimate as E
from loralab.memory import fixes as F
from loralab.memory.sharding import PREFETCH_LAYERS, estimate_per_gpu
from tinymodels import tiny_llama, tiny_llama_config

GiB = 2**30
# A 70B QLoRA run: NF4 on every linear, r=8 on all of them, 2,048 tokens, checkpointing (docs/distributed.md).
QLORA_70B = dict(method="qlora", r=8, targets="all-linear", seq=2048, batch=1, grad_checkpointing=True,
                 device="cuda")


@pytest.fixture(scope="module")
def llama70b():
    return A.resolve_model_config("llama-2-70b")


@pytest.mark.parametrize("settings", [dict(method="lora"), dict(method="qlora", seq=1024),
                                      dict(method="full", device="cpu", grad_accum=4)])
@pytest.mark.parametrize("fsdp", [False, True])
def test_one_gpu_is_the_single_device_estimate(settings, fsdp):
    cfg = A.resolve_model_config("smollm2-135m")
    assert estimate_per_gpu(cfg, gpus=1, fsdp=fsdp, **settings) == E.estimate(cfg, **settings)


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
@pytest.mark.parametrize("n", [2, 4, 8])
def test_fsdp_shards_weights_gradients_and_state_by_n(method, n):
    cfg = A.resolve_model_config("llama-2-7b")
    kw = dict(method=method, seq=2048, batch=2, grad_accum=4)
    one, got = E.estimate(cfg, **kw), estimate_per_gpu(cfg, gpus=n, fsdp=True, **kw)
    p, b = one["parts"], got["breakdown"]
    assert got["phase"] == "start of backward" and one["phase"] == "start of backward"
    # NF4 weights are NF4Linear buffers, which FSDP2 leaves whole on every rank; the rest shards
    assert b["frozen_weights"] == pytest.approx(p["frozen_nf4"] + (p["frozen"] - p["frozen_nf4"]) / n, abs=1)
    assert (p["frozen_nf4"] > 0) == (method == "qlora")
    # autocast's bf16 copies of full fine-tuning's weights are made from the gathered units: whole
    assert b["trainable_weights"] == pytest.approx(p["masters"] / n + p["casts"], abs=1)
    assert b["optimizer_state"] == pytest.approx(p["state"] / n, abs=1)
    # accumulated gradients are reduce-scattered (1/N); those outside the layers are whole until backward ends
    assert b["gradients"] == pytest.approx(p["grads_outside"] + p["grads_step"] / n, abs=2)
    assert b["activations"] == one["breakdown"]["activations"]  # each rank its own micro batch
    assert b["other"] == one["breakdown"]["other"]
    assert b["communication"] == got["units"]["outside_bytes"] + PREFETCH_LAYERS * got["units"]["layer_bytes"]
    assert got["peak_bytes"] == sum(b.values()) and got["sharding"]["single_gpu_peak_bytes"] == one["peak_bytes"]


def test_fsdp_optimizer_step_holds_only_shards():
    cfg = A.resolve_model_config("smollm2-135m")
    total = A.count_params(cfg)["total"]
    # full fine-tuning at 8 tokens: the optimizer step sets the peak (20 bytes per parameter on one GPU)
    got = estimate_per_gpu(cfg, gpus=2, fsdp=True, method="full", seq=8, device="cuda")
    assert got["phase"] == "optimizer step" and got["breakdown"]["communication"] == 0
    assert got["peak_bytes"] == pytest.approx(20 * total / 2 + E.CUDA_OTHER_BYTES, abs=8)


@pytest.mark.parametrize("method,n", [("lora", 2), ("full", 8), ("qlora", 4)])
def test_ddp_replicates_and_adds_one_copy_of_the_gradients(method, n):
    cfg = A.resolve_model_config("smollm2-135m")
    kw = dict(method=method, seq=256, batch=4, device="cuda")
    one, ddp = E.estimate(cfg, **kw), estimate_per_gpu(cfg, gpus=n, **kw)
    trainable = one["params"]["trainable"]
    assert ddp["breakdown"]["communication"] == 4 * trainable == ddp["sharding"]["bucket_bytes"]
    assert ddp["peak_bytes"] == one["peak_bytes"] + 4 * trainable  # the same at any N: nothing is shared
    assert {k: v for k, v in ddp["breakdown"].items() if k != "communication"} == one["breakdown"]


@pytest.mark.parametrize("method,precision", [("lora", "bf16"), ("full", "bf16"), ("full", "fp32")])
def test_gathered_units_are_a_real_layers_bytes(method, precision):
    model = tiny_llama(0).to(torch.bfloat16 if precision == "bf16" else torch.float32)
    size = lambda module: sum(p.numel() * p.element_size() for p in module.parameters())  # noqa: E731
    units = E.estimate(model.config.to_dict(), method=method, targets="qv", r=4, precision=precision)["units"]
    lora = 4 * 4 * ((32 + 32) + (32 + 16))  # fp32 r=4 factors on q (32 -> 32) and v (32 -> 16)
    assert units["layer_bytes"] == size(model.model.layers[0]) + (lora if method == "lora" else 0)
    outside = size(model.model.embed_tokens) + size(model.lm_head) + size(model.model.norm)
    assert units["outside_bytes"] == outside


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_units_add_up_to_the_stored_weights(method):
    cfg = tiny_llama_config().to_dict()
    r = E.estimate(cfg, method=method, targets="all-linear+head", r=4)
    layers = cfg["num_hidden_layers"]
    assert r["units"]["layer_bytes"] * layers + r["units"]["outside_bytes"] == pytest.approx(
        r["parts"]["frozen"] + r["parts"]["masters"], abs=2)


LORA_70B = dict(QLORA_70B, method="lora")  # the same on a bf16 base


def test_per_gpu_peak_falls_with_more_gpus_to_a_floor(llama70b):
    peaks = [estimate_per_gpu(llama70b, gpus=n, fsdp=True, **LORA_70B) for n in (2, 4, 8, 16, 64)]
    assert all(a["peak_bytes"] > b["peak_bytes"] for a, b in zip(peaks, peaks[1:]))
    last = peaks[-1]["breakdown"]  # what never shards: activations, runtime, the gathered units
    floor = last["activations"] + last["other"] + last["communication"]
    above = [p["peak_bytes"] - floor for p in peaks]  # what shards: weights, gradients, state
    assert above[-1] > 0 and above[-1] == pytest.approx(above[2] * 8 / 64, rel=0.05)  # 1/N from 8 to 64 GPUs


def test_70b_lora_fits_40_gib_gpus_only_sharded_over_8_and_qlora_keeps_its_nf4_base_whole(llama70b):
    p = A.count_params(llama70b)
    assert p["total"] == 68_976_648_192
    one = E.estimate(llama70b, **LORA_70B)
    fsdp = {n: estimate_per_gpu(llama70b, gpus=n, fsdp=True, **LORA_70B)["peak_bytes"] for n in (4, 8)}
    assert one["peak_bytes"] > 40 * GiB and estimate_per_gpu(llama70b, gpus=8, **LORA_70B)["peak_bytes"] > 40 * GiB
    assert fsdp[4] > 40 * GiB > fsdp[8]  # 41.5 and 25.3 GiB
    q_one = E.estimate(llama70b, **QLORA_70B)
    nf4 = p["layer_linears"] * E.NF4_BITS / 8 + (p["embedding"] + p["lm_head"] + p["norms"]) * 2
    assert q_one["breakdown"]["frozen_weights"] == pytest.approx(nf4, abs=1)  # 33.87 GiB of NF4 + 16-bit embeddings
    q8 = estimate_per_gpu(llama70b, gpus=8, fsdp=True, **QLORA_70B)
    assert q8["breakdown"]["frozen_weights"] > 33 * GiB  # the NF4 base is whole on every rank
    assert q8["peak_bytes"] > 24 * GiB and q_one["peak_bytes"] < 48 * GiB  # one 48 GB card per rank, sharded or not


def test_fixes_offer_sharding_and_the_fewest_gpus_that_fit(llama70b):
    kw = dict(LORA_70B, gpus=1, fsdp=False)
    fixes = F.suggest_fixes(llama70b, 40, estimator=estimate_per_gpu, **kw)
    more = [f for f in fixes if "gpus" in f["settings"]]
    assert len(more) == 1 and more[0]["fits"]
    n = more[0]["settings"]["gpus"]
    assert estimate_per_gpu(llama70b, **{**kw, "gpus": n - 1, "fsdp": True})["peak_bytes"] > 40 * GiB  # the fewest
    for f in fixes:
        assert estimate_per_gpu(llama70b, **{**kw, **f["settings"]})["peak_bytes"] == f["peak_bytes"]
    # DDP over 8 GPUs that do not fit: sharding the same 8 is offered, and no more GPUs are needed
    fixes = F.suggest_fixes(llama70b, 40, estimator=estimate_per_gpu, **{**kw, "gpus": 8})
    assert fixes[0]["settings"] == {"fsdp": True} and fixes[0]["fits"]
    assert not any("gpus" in f["settings"] for f in fixes)
    assert F.suggest_fixes(llama70b, 40, estimator=estimate_per_gpu, **{**kw, "gpus": 8, "fsdp": True}) == []


def test_bad_gpu_counts_are_user_errors():
    cfg = A.resolve_model_config("smollm2-135m")
    for gpus in (0, -2, 1.5, True):
        with pytest.raises(UserError, match="gpus must be a positive integer"):
            estimate_per_gpu(cfg, gpus=gpus)


def _cli(args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main(args)
    return rc, out.getvalue(), err.getvalue()


def test_cli_json_per_gpu(llama70b):
    rc, out, _ = _cli(["estimate", "--model", "llama-2-70b", "--method", "lora", "--seq", "2048",
                       "--grad-checkpointing", "--gpus", "8", "--fsdp", "--gpu-gb", "40", "--json"])
    assert rc == 0
    obj = json.loads(out)
    assert obj["peak_bytes"] == estimate_per_gpu(llama70b, gpus=8, fsdp=True, **LORA_70B)["peak_bytes"]
    assert obj["peak_bytes"] == sum(obj["breakdown"].values()) and obj["fixes"] == []  # it fits
    assert obj["sharding"]["strategy"] == "fsdp" and obj["settings"]["gpus"] == 8


def test_cli_table_names_the_strategy_and_the_fix():
    rc, out, _ = _cli(["estimate", "--model", "llama-2-70b", "--method", "lora", "--seq", "2048",
                       "--grad-checkpointing", "--gpus", "8", "--gpu-gb", "40"])
    assert rc == 0
    assert "per GPU of 8 (DDP" in out and "communication" in out and "on one GPU" in out
    assert "fits in 40 GiB: no" in out and "FSDP over the same 8 GPUs" in out


@pytest.mark.parametrize("args,message", [(["--fsdp"], "--gpus 2 or more"),
                                          (["--gpus", "0"], "gpus must be a positive integer")])
def test_cli_bad_sharding_is_one_line(args, message):
    rc, out, err = _cli(["estimate", *args])
    assert rc == 2 and out == "" and message in err and err.count("\n") == 1


DOC_ROWS = {  # docs/distributed.md, "What FSDP saves per GPU": row -> its settings
    "Llama-2-70B QLoRA": ("llama-2-70b", dict(method="qlora", seq=2048, grad_checkpointing=True)),
    "Llama-2-70B LoRA": ("llama-2-70b", dict(method="lora", seq=2048, grad_checkpointing=True)),
    "Llama-2-7B full": ("llama-2-7b", dict(method="full", seq=2048, grad_checkpointing=True)),
    "Llama-2-7B LoRA": ("llama-2-7b", dict(method="lora", targets="qv", seq=1304, grad_accum=128)),
}


def test_the_docs_table_is_what_the_estimate_says():
    doc = (Path(__file__).parents[2] / "docs" / "distributed.md").read_text()
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:7] for line in doc.splitlines()
            if line.startswith("| Llama-2-")}
    assert len(rows) == len(DOC_ROWS)
    for prefix, (model, kw) in DOC_ROWS.items():
        (cells,) = [v for k, v in rows.items() if k.startswith(prefix)]
        cfg = A.resolve_model_config(model)
        got = [estimate_per_gpu(cfg, gpus=g, fsdp=f, **kw) for g, f in ((1, False), (8, False), (2, True), (4, True),
                                                                        (8, True))]
        assert cells[:5] == [f"{e['peak_bytes'] / GiB:.2f}" for e in got], prefix
        left = got[-1]["breakdown"]  # the last column names what is left at FSDP 8
        for name, part in (("activations", "activations"), ("gathered", "communication")):
            if name in cells[5]:
                assert f"{name} {left[part] / GiB:.2f}" in cells[5], prefix

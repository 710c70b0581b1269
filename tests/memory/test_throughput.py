"""The GPU time plan: FLOPs per token against the closed form, and the calibration on the article's run."""
import pytest

from loralab.memory import arch as A
from loralab.memory import throughput as T

LLAMA = A.resolve_model_config("llama-2-7b")
QV8 = A.count_params(LLAMA, "qv", 8)["lora"]


def test_full_fine_tuning_costs_six_flops_per_weight_without_attention():
    a = A.arch_from_config(LLAMA)
    matmul = A.count_params(LLAMA, "all-linear", 1)["layer_linears"] + a.vocab * a.hidden
    assert T.train_flops_per_token(LLAMA, method="full", trainable=0, context=0) == 6 * matmul
    lora = T.train_flops_per_token(LLAMA, method="lora", trainable=QV8, context=0)
    assert lora == 4 * matmul + 2 * QV8  # frozen weights get no gradient of their own
    with_attention = T.train_flops_per_token(LLAMA, method="lora", trainable=QV8, context=200)
    assert with_attention - lora == pytest.approx(3 * 4 * a.layers * a.q_dim * 100)
    checkpointed = T.train_flops_per_token(LLAMA, method="lora", trainable=QV8, context=0, grad_checkpointing=True)
    assert checkpointed == lora + 2 * matmul  # one more forward


def test_the_articles_lora_and_qlora_times_within_15_percent():
    # Alpaca: ~52k examples of ~200 tokens, one epoch on an A100 (6,686 s LoRA, 10,060 s QLoRA)
    kw = dict(trainable=QV8, train_tokens=52_000 * 200, context=200, gpu="A100")
    assert T.estimate_seconds(LLAMA, method="lora", **kw)["train_s"] == pytest.approx(6_686, rel=0.15)
    assert T.estimate_seconds(LLAMA, method="qlora", **kw)["train_s"] == pytest.approx(10_060, rel=0.15)


def test_gpu_names_and_evaluation_time():
    assert T.gpu_spec("NVIDIA H100 80GB HBM3")[0] == "H100"
    assert T.gpu_spec("Some Future GPU")[0] == "Some Future GPU (as an A100)"
    none = T.estimate_seconds(LLAMA, method="lora", trainable=QV8, train_tokens=0, context=100, gpu="A100")
    assert none == {"gpu": "A100", "train_s": 0.0, "eval_s": 0.0}
    one = T.estimate_seconds(LLAMA, method="lora", trainable=QV8, train_tokens=0, context=100, gpu="A100",
                             eval_prompts=64, eval_batch=64, new_tokens=10)["eval_s"]
    two = T.estimate_seconds(LLAMA, method="lora", trainable=QV8, train_tokens=0, context=100, gpu="A100",
                             eval_prompts=128, eval_batch=64, new_tokens=10)["eval_s"]
    assert 0 < one < two <= 2 * one + 1e-9  # decoding is per batch; two batches cost twice


def test_decoding_is_bound_by_its_reads_or_its_rows_whichever_is_slower():
    kw = dict(method="lora", trainable=QV8, train_tokens=0, context=100, new_tokens=10)
    slow = T.Device("a CPU", 1e9, 1e12)  # every step's rows cost more than reading the weights
    one = T.estimate_seconds(LLAMA, eval_prompts=1, eval_batch=100, device=slow, **kw)["eval_s"]
    hundred = T.estimate_seconds(LLAMA, eval_prompts=100, eval_batch=100, device=slow, **kw)["eval_s"]
    assert hundred == pytest.approx(100 * one)  # compute-bound: rows cost alike in one batch or many
    fast = T.Device("a GPU", 1e16, 1e9)  # reading the weights dominates every step
    one = T.estimate_seconds(LLAMA, eval_prompts=1, eval_batch=100, device=fast, **kw)["eval_s"]
    hundred = T.estimate_seconds(LLAMA, eval_prompts=100, eval_batch=100, device=fast, **kw)["eval_s"]
    assert hundred == pytest.approx(one, rel=0.01)  # memory-bound: a batch of 100 decodes as fast as one
    losses = T.estimate_seconds(LLAMA, forward_tokens=1e6, device=slow, **{**kw, "new_tokens": 0})["eval_s"]
    assert losses == pytest.approx(1e6 * T.forward_flops_per_token(LLAMA, 100) / 1e9 / T.UTILISATION)

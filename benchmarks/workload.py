"""The throughput benchmark's workload, shared by throughput.py, levers_ab.py and profile_step.py:
the model and LoRA settings, a deterministic mix of short arithmetic questions and long chat /
Alpaca-style instructions (a realistic spread of lengths), the model-FLOPs count of training on it,
and the bf16 matmul peak that MFU is measured against."""
from __future__ import annotations

import math
import random
import time
from pathlib import Path

MODEL = "smollm2-135m"
MAKEFILE = Path(__file__).resolve().parents[1] / "Makefile"
# An AVX2-only CPU reproduced on a newer one: oneDNN, ATen's own kernels and MKL held to AVX2, so bf16
# matmuls are emulated (0.2 GFLOP/s) and fp32 ones run AVX2 code (~70% of AVX-512's on a 2-core EPYC).
AVX2_ONLY_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
LORA = dict(r=16, alpha=32, dropout=0.05)
MAX_SEQ_LEN = 512
# How examples become tokens (loralab's `data.*` keys): both sides, and loralab's RunConfig, use these.
ENCODING = {"template": "auto", "system_prompt": "default", "max_seq_len": MAX_SEQ_LEN}



def worker_env(loralab_side: bool) -> dict:
    """A worker process's environment: a loralab side runs on the malloc the `loralab` command picks
    (loralab/allocator.py), the Hugging Face sides on the system's, as their users run them."""
    import os

    from loralab.runtime.allocator import preload_env

    env = dict(os.environ, PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
    return (preload_env(env) or env) if loralab_side else env


def demo_overrides() -> list[str]:
    """What `make demo` adds to configs/demo.yaml: the Makefile's DEMO_LAYERS (its one home)."""
    line = next(x for x in MAKEFILE.read_text().splitlines() if x.startswith("DEMO_LAYERS ="))
    return [f"lora.layers={line.split('=', 1)[1].strip()}"]


# ----------------------------------------------------------------------------------------------
# The data: arithmetic questions plus longer chat / Alpaca-style instructions, all deterministic

TOPICS = ["photosynthesis", "the water cycle", "compound interest", "binary search", "volcanoes",
          "the Roman Empire", "recycling", "black holes", "vaccines", "sleep", "bread baking", "electric cars",
          "ocean tides", "the immune system", "prime numbers", "solar panels", "honey bees", "the printing press",
          "earthquakes", "coffee roasting", "rainbows", "human memory", "suspension bridges", "chess openings",
          "the internet", "glaciers", "music theory", "plate tectonics", "fermentation", "lighthouses"]
ASKS = ["Explain {t} to a curious beginner.", "Write a short paragraph about {t}.",
        "What are the most important things to know about {t}?", "Give me a clear overview of {t}, with an example.",
        "Summarize how {t} works in plain language.", "Why does {t} matter in everyday life?"]
SENTENCES = [
    "{T} is often described as {adj}, but the details are more interesting than that.",
    "A useful way to think about {t} is to picture {noun} that slowly {verb} over time.",
    "Many people first meet {t} in school, where it is presented as a {adj} idea.",
    "In practice, {t} depends on {noun} and on how carefully we {verb2} it.",
    "One common mistake is to assume that {t} always {verb}; in fact it rarely does.",
    "For example, a small change in {noun} can {verb2} the whole picture.",
    "Researchers keep studying {t} because it connects to {noun} in {adj} ways.",
    "If you remember one thing, remember that {t} is mostly about {noun}.",
    "The history of {t} shows how ideas improve when people test them against {noun}.",
    "It also helps to compare {t} with {noun}, which behaves in a {adj} way.",
    "Step by step, the process {verb} until it reaches a stable state.",
    "Experts usually recommend that beginners {verb2} {noun} before anything else.",
]
WORDS = {
    "adj": ["simple", "surprising", "gradual", "delicate", "powerful", "predictable", "messy", "elegant"],
    "noun": ["a patient gardener", "the local weather", "a set of careful measurements", "a busy kitchen",
             "a river delta", "the energy budget", "a crowded train station", "a well-kept notebook"],
    "verb": ["changes", "grows", "balances itself", "speeds up", "settles down", "repeats"],
    "verb2": ["measure", "observe", "reshape", "explain", "question", "simplify"],
}
ALPACA_HEAD = ("Below is an instruction that describes a task. Write a response that appropriately "
               "completes the request.\n\n### Instruction:\n{q}\n\n### Response:\n")


def _response(rng: random.Random, topic: str, target_tokens: int) -> str:
    out, words = [], 0
    while words * 1.3 < target_tokens:  # ~1.3 tokens per English word with SmolLM2's tokenizer
        fill = {k: rng.choice(v) for k, v in WORDS.items()}
        s = rng.choice(SENTENCES).format(t=topic, T=topic[0].upper() + topic[1:], **fill)
        out.append(s)
        words += len(s.split())
    return " ".join(out)


def make_examples(n: int, seed: int):
    """n examples: half arithmetic (2da/2ds, ~15 tokens), a quarter chat, a quarter Alpaca-style
    prompt/response, responses of 50-250 tokens; shuffled. A pure function of (n, seed)."""
    from loralab.data.formats import Example
    from loralab.data.tasks import make_task

    rng = random.Random(f"throughput:{seed}")
    n_arith = n // 2
    arith = make_task("2da", n_arith - n_arith // 2, 0, seed)[0] + make_task("2ds", n_arith // 2, 0, seed)[0]
    long = []
    for k in range(n - n_arith):
        topic, ask = rng.choice(TOPICS), rng.choice(ASKS)
        q = ask.format(t=topic)
        a = _response(rng, topic, rng.randint(50, 250))
        if k % 2 == 0:
            long.append(Example(messages=[{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                source=f"chat #{k}"))
        else:
            long.append(Example(prompt=ALPACA_HEAD.format(q=q), response=a, source=f"alpaca #{k}"))
    examples = arith + long
    rng.shuffle(examples)
    return examples


def encoded_data(tok, n: int, seed: int):
    """(encoded examples, stats) as loralab's run_training encodes them with `ENCODING`."""
    from loralab.data.prompts import encode_all

    return encode_all(make_examples(n, seed), tok, **ENCODING)


# ----------------------------------------------------------------------------------------------
# Model FLOPs

def model_shape(model) -> dict:
    """What the FLOPs formula needs, from loralab.memory.arch: `model` is a bundled name, an HF
    folder or a config.json. n_body counts the decoder's linear layers (their biases too, where the
    architecture has them), n_lora the LoRA parameters of LORA's r on every decoder linear layer."""
    from loralab.memory.arch import arch_from_config, count_params, resolve_model_config

    config = resolve_model_config(str(model))
    arch = arch_from_config(config)
    counts = count_params(config, targets="all-linear", r=LORA["r"])
    return {"hidden": arch.hidden, "layers": arch.layers, "d_attn": arch.q_dim, "vocab": arch.vocab,
            "n_body": counts["layer_linears"], "n_lora": counts["lora"]}


FLOPS_FORMULA = ("model FLOPs = sum over examples of (4 N + 6 N_lora) T + 12 L d_attn S(S+1)/2 + 4 V d T_label; "
                 "T=S real tokens, N decoder linear weights, N_lora LoRA params, T_label labelled positions")


def model_flops(shape: dict, examples: list[tuple[int, int]]) -> float:
    """examples: (real tokens, labelled positions) of every example trained on."""
    s = shape
    total = 0.0
    for t, n_label in examples:
        total += (4 * s["n_body"] + 6 * s["n_lora"]) * t
        total += 12 * s["layers"] * s["d_attn"] * t * (t + 1) / 2
        total += 4 * s["vocab"] * s["hidden"] * n_label
    return total


# ----------------------------------------------------------------------------------------------
# The bf16 matmul peak MFU is measured against

def matmul_peak(reps: int = 8, precisions=("bf16", "fp32")) -> dict:
    """Best GFLOP/s of a 2048^3 GEMM per precision. Ask for bf16 only where the CPU has bf16
    matmuls: elsewhere torch emulates it, and the measurement alone takes many minutes."""
    import torch

    out = {"threads": torch.get_num_threads()}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        if name not in precisions:
            continue
        a = torch.randn(2048, 2048, dtype=dtype)
        b = torch.randn(2048, 2048, dtype=dtype)
        a @ b  # warm up
        best = math.inf
        for _ in range(reps):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        out[f"{name}_gflops"] = 2 * 2048 ** 3 / best / 1e9
    return out


# ----------------------------------------------------------------------------------------------
# Which examples a run trains on

def trained_batches(enc, batch_size: int, seed: int, n_micro: int, group_window: int = 0) -> list[list[int]]:
    """The first n_micro micro batches (example indices) of loralab's stream, as the loop draws them."""
    from itertools import islice

    from loralab.data.batching import micro_batch_indices

    return list(islice(micro_batch_indices(enc, batch_size, seed=seed, group_window=group_window), n_micro))


def examples_of(enc, batches: list[list[int]]) -> list[tuple[int, int]]:
    """(real tokens, labelled positions) of every example in `batches`."""
    return [(len(enc[i].input_ids), enc[i].n_labels) for idx in batches for i in idx]

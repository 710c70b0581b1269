"""What every part of the GPU check shares: where it runs (Ctx), one result row, comparisons against a
reference, tiny model shapes for `--tiny`, and a model built on the meta device then materialized."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

PASS, FAIL, SKIP = "pass", "fail", "skipped"
NEEDS_CUDA = "skipped: needs CUDA"


@dataclass
class Ctx:
    device: torch.device
    tiny: bool
    out: Path
    world: int = 1                     # processes of the DDP / FSDP2 runs: 2 where the machine has two GPUs
    steps: dict = field(default_factory=dict)  # fixed step counts of every part that trains: recorded in the JSON

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype the CUDA paths run in (bf16), on the CPU too: its reference is fp32."""
        return torch.bfloat16

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


def row(part: str, check: str, status: str, note: str = "", **numbers) -> dict:
    return {"part": part, "check": check, "status": status, "note": note, **numbers}


def skipped(part: str, check: str, why: str = "") -> dict:
    return row(part, check, SKIP, NEEDS_CUDA + (f" ({why})" if why else ""))


def max_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.detach().float().cpu() - ref.detach().float().cpu()).abs().max())


def compare(part: str, check: str, got: torch.Tensor, ref: torch.Tensor, tol: float, relative: bool = False,
            note: str = "") -> dict:
    """Max abs error of `got` against `ref` (relative: divided by max |ref|), pass when <= tol."""
    err = max_err(got, ref)
    scale = float(ref.detach().float().abs().max()) if relative else 1.0
    err = err / max(scale, 1e-30)
    return row(part, check, PASS if err <= tol else FAIL, note, max_abs_error=err, tolerance=tol,
               error_kind="relative to max |ref|" if relative else "absolute")


def timed(fn):
    """(fn(), seconds)."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------
# Model shapes

TINY = dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
            rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1, eos_token_id=2)
TINY_WIDE = dict(TINY, hidden_size=128, intermediate_size=256, num_hidden_layers=3)


def model_config(shape) -> dict:
    """A config dict: a bundled name (memory/arch's configs) or a dict as is."""
    if isinstance(shape, dict):
        return dict(shape)
    from loralab.memory.arch import resolve_model_config

    return resolve_model_config(shape)


def hf_config(cfg: dict):
    from transformers import AutoConfig

    cfg = dict(cfg)
    return AutoConfig.for_model(cfg.pop("model_type"), **{k: v for k, v in cfg.items() if not k.startswith("_")})


SMALL_PARAMS = 50_000_000


def random_model(shape, device: torch.device, dtype: torch.dtype, attn: str = "sdpa", seed: int = 0):
    """A causal LM of `shape` with random weights: built on the meta device (no host memory, no init cost),
    materialized on `device` in `dtype`, every weight drawn N(0, 0.02) there (norms 1): peak memory and step
    time do not depend on the values, but a NaN from uninitialised memory would skip the optimizer step."""
    from transformers import AutoModelForCausalLM

    config = hf_config(model_config(shape))
    config._attn_implementation = attn
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.to_empty(device=device)
    # a small model draws on the CPU, so it is the same on every device (its reference runs on the CPU); a
    # large one on its device (the CPU would take minutes and its size in host memory)
    small = sum(p.numel() for p in model.parameters()) < SMALL_PARAMS
    gen = torch.Generator(device="cpu" if small else device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif small:
                p.copy_(torch.empty(p.shape, dtype=torch.float32).normal_(0.0, 0.02, generator=gen))
            else:
                p.normal_(0.0, 0.02, generator=gen)
        for name, m in model.named_modules():  # non-persistent buffers (rotary tables) are rebuilt
            if type(m).__name__.endswith("RotaryEmbedding"):
                parent, _, child = name.rpartition(".")
                with torch.device(device):
                    fresh = type(m)(config=model.config)
                setattr(model.get_submodule(parent) if parent else model, child, fresh)
    return model


def random_batch(lengths: list[int], vocab: int, seed: int = 0) -> list:
    """Encoded examples of random tokens, every position labelled but the first third (a prompt)."""
    from loralab.data.prompts import IGNORE_INDEX, Encoded

    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=gen).tolist()
        out.append(Encoded(input_ids=ids, labels=[IGNORE_INDEX] * (n // 3) + ids[n // 3:]))
    return out

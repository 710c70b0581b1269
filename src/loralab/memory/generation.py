"""The evaluation's resource decisions, made before the weights load: the context its prompts and
eval.max_new_tokens need, and the memory greedy generation (eval.metrics.generate) takes at
eval.batch_size.

Generation's peak, one batch of `batch` prompts of up to `prompt` tokens and `new` new tokens,
b bytes per element (the CPU decodes in fp32: eval.metrics.fp32_decoding_on_cpu; CUDA in the
run's compute dtype):
  - KV cache: layers x 2 (keys, values) x batch x (prompt + new) x kv_heads x head_dim x b, plus one
    layer's cache again (the cache grows by concatenation: old and new live together for a moment)
  - logits: batch x vocab x 4 x 2 (the last position's fp32 logits and the processed scores)
  - the prefill's transients, one layer at a time: batch x prompt x (4 hidden + 3 intermediate) x b,
    and the 4-D attention mask, batch x prompt x (prompt + new) x 4
  - the weights as decoding holds them (estimate.py's frozen and trainable parts in that dtype)
  - the runtime (estimate.py's CPU runtime term, or the CUDA context)
The budget is the training pre-flight's (preflight.generation_budget): what the device has now plus
what this process already holds of the runtime. Evaluations inside training (train.eval_every with
eval.with_validation) also hold the optimizer state; that moment is not modelled here.
"""
from __future__ import annotations

from ..data.prompts import render_prompt
from ..errors import UserError
from . import preflight as P
from .arch import arch_from_config, resolve_model_config
from .estimate import CPU_RUNTIME_BYTES, CUDA_OTHER_BYTES, PRECISIONS, estimate, run_settings
from .fixes import largest_fitting
from .measure import fmt_bytes

LABELS = {"kv_cache": "KV cache", "logits": "logits", "prefill": "prefill", "weights": "weights"}
LONGEST_CANDIDATES = 32  # prompts rendered and tokenized to find the longest: those with the most text


def _text_length(ex) -> int:
    return len(ex.prompt) + sum(len(str(m.get("content", ""))) for m in ex.messages or [])


def eval_prompts(cfg, data) -> list:
    """The examples the run generates for (run_evals' tasks; else stop_check's validation share)."""
    flat = [ex for examples in data.tests.values() for ex in examples]
    if flat:
        return flat
    return data.val[:cfg.eval.n] if cfg.eval.stop_check and cfg.eval.n else []


def longest_prompt(examples: list, tok, cfg) -> int:
    """Tokens of the longest rendered prompt, among the examples with the most text."""
    top = sorted(examples, key=_text_length, reverse=True)[:LONGEST_CANDIDATES]
    return max(len(tok.encode(render_prompt(ex, tok, template=cfg.data.template,
                                            system_prompt=cfg.data.system_prompt), add_special_tokens=False))
               for ex in top)


def generation_bytes(model_config: dict, settings: dict, *, batch: int, prompt: int, new: int) -> dict:
    """Peak bytes of generating one batch (module docstring), by part."""
    a = arch_from_config(model_config)
    cpu = settings["device"] == "cpu"
    b = 4 if cpu else PRECISIONS[settings["precision"]]
    total = prompt + new
    kv = a.layers * 2 * batch * total * a.kv_dim * b
    held = estimate(model_config, **{**settings, "precision": "fp32" if cpu else settings["precision"],
                                     "seq": 1, "batch": 1})["parts"]
    parts = {"kv_cache": kv + kv // a.layers,
             "logits": batch * a.vocab * 4 * 2,
             "prefill": batch * prompt * (4 * a.hidden + 3 * a.inter) * b + batch * prompt * total * 4,
             "weights": held["frozen"] + held["masters"],
             "runtime": CPU_RUNTIME_BYTES if cpu else CUDA_OTHER_BYTES}
    return {"peak_bytes": int(sum(parts.values())), "parts": {k: int(v) for k, v in parts.items()}}


def check_context(cfg, model_config: dict, prompt: int) -> None:
    """A prompt plus eval.max_new_tokens beyond the model's positions is an error, like a training
    example longer than the context (preflight.check_before_loading)."""
    ctx = P.context_of(model_config)
    if not ctx:
        return
    key, size = ctx
    new = cfg.eval.max_new_tokens
    if prompt >= size:
        raise UserError(f"the longest evaluation prompt has {prompt} tokens, at or above the model's context of {size} "
                        f"({key}): nothing is left for eval.max_new_tokens; evaluate on shorter prompts "
                        "(eval.tasks, data.val_fraction)")
    if prompt + new > size:
        raise UserError(f"config key 'eval.max_new_tokens' is {new}: the longest evaluation prompt has {prompt} "
                        f"tokens, and {prompt} + {new} is above the model's context of {size} ({key}); set "
                        f"eval.max_new_tokens={size - prompt} or less")


def check_evaluation(cfg, folder, device, data, tok, world: int = 1, *, context: bool = True) -> list[str]:
    """The evaluation's limits and memory, before the weights load: raises UserError for an
    evaluation that cannot run (under train.preflight=error for memory), else lines to log.
    context=False: memory only (`loralab eval` scores any model as given, past its context too)."""
    examples = eval_prompts(cfg, data)
    if not examples or cfg.eval.max_new_tokens <= 0:
        return []
    model_config = resolve_model_config(str(folder))
    prompt = longest_prompt(examples, tok, cfg)
    if context and any(data.tests.values()):  # task prompts; a validation record's long prompt is the user's data (RoPE
        check_context(cfg, model_config, prompt)  # models generate past their context, degraded, as before)
    if cfg.train.preflight == "off":
        return []
    n = -(-len(examples) // world)  # each rank generates for its share
    batch = min(cfg.eval.batch_size, n)
    settings = run_settings(cfg, device, prompt)
    try:
        peak = lambda k: generation_bytes(model_config, settings, batch=k, prompt=prompt,  # noqa: E731
                                          new=cfg.eval.max_new_tokens)
        est = peak(batch)
    except UserError:  # an architecture the estimate does not model: the training check has warned
        return []
    room = P.device_room(device)
    if room is None:
        return []
    budget, where = P.budget_of(room, settings["device"])
    if est["peak_bytes"] <= budget:
        return []
    parts = ", ".join(f"{LABELS[k]} {fmt_bytes(v)}" for k, v in est["parts"].items() if k in LABELS)
    fits = largest_fitting(1, batch - 1, lambda k: peak(k)["peak_bytes"] <= budget) if batch > 1 else None
    fix = (f"eval.batch_size={fits} fits" if fits else
           "no eval.batch_size fits: lower eval.max_new_tokens or evaluate fewer tasks")
    line = (f"not enough memory for the evaluation: generating {batch:,} prompts at once (eval.batch_size="
            f"{cfg.eval.batch_size}; {n:,} prompts, up to {prompt} tokens + eval.max_new_tokens="
            f"{cfg.eval.max_new_tokens}) needs an estimated {fmt_bytes(est['peak_bytes'])} ({parts}) > {where}; {fix}; "
            "set train.preflight=warn to run anyway")
    if cfg.train.preflight == "error":
        raise UserError(line)
    return [f"warning: {line}"]

"""Analytic peak-memory model of a fine-tuning run, from a Hugging Face config.json alone (no weights).

    peak = frozen_weights + trainable_weights + gradients + optimizer_state + activations + other,
           each taken at the moment that sets the peak (the start of backward or the optimizer step)

The decoder's shape and parameter counts come from loralab.arch. Assumptions, in bytes:
  - frozen weights in the compute dtype (bf16: 2, fp32: 4). QLoRA: quantized linears at 4.127 bits
    per weight (NF4 in blocks of 64, double-quantized scales); embeddings, norms, lm_head stay 16-bit.
  - trainable weights fp32 (LoRA factors and full fine-tuning masters: 4 per parameter, plus a bf16
    autocast copy, 2, held by the graph during forward and backward of full fine-tuning in bf16);
    gradients fp32 (4); optimizer state AdamW 8 (two fp32 moments), SGD with momentum 4, 8-bit AdamW 2
    (+ an fp32 absmax per 256 per moment); the foreach optimizer step's temporary, 4.
  - activations saved for backward, per layer and token (b = 2 bf16 / 4 fp32):
      norms        2 x H x b   (each RMSNorm keeps its input, model/norm.py; the plain composition keeps
                               an fp32 copy: 2 x 4H)
      attention    SDPA/flash: q, k, v, output (2Q + 2K) x b + a logsumexp per head (fp32);
                   eager:      q, k, v per head (3Q x b) + scores heads x seq x (4 + 2 if bf16),
                               the fp32 softmax and its bf16 copy, i.e. quadratic in seq;
                   eager_recompute: as SDPA (q, k, v, output), plus one layer's eager scores
                               while backward recomputes them
      MLP          2I x b      (gate and up outputs, model/mlp.py; the plain composition also keeps the
                               SiLU's output: 3I x b; frozen linears keep no input; down_proj's input,
                               the product, is rebuilt from gate and up, so not kept: stock keeps it)
      LoRA         per distinct input (q/k/v share one, gate/up one) its width x b, kept once for
                   every reader, except a norm's output where gradient reaches the norm (rebuilt from
                   the norm's input in backward, model/rebuild.py: all but the first LoRA layer's first norm,
                   and none in a layer checkpointing recomputes); per target its dropout mask, a bit per
                   element (packed, peft/dropout.pack_mask), plus r x b
                   (stock_autograd, what plain autograd keeps (PEFT, Lit-GPT): per target a float
                   mask and the dropped input, 2 x width x b)
      QLoRA        bitsandbytes-style 4-bit matmuls also keep the input of every quantized linear
      full FT      inputs of every linear (2H + Q + I) x b and the normalised input of each norm
      MoE block    in place of the MLP: top_k x (the experts' intermediates + H) x b and the routing's
                   indices and weights; expert LoRA: each targeted matmul's input, and per layer the
                   updated weight W + B A (memory/activations.py, docs/memory.md)
      GPT-2        LayerNorm's input and statistics, gelu_new's four intermediates, GPT-2's dropouts
    With gradient checkpointing: each layer's input (H x b) plus one full layer being recomputed.
    Attention 'auto': as loralab picks it (model.attention): SDPA on CUDA and in fp32 on the CPU;
    in bf16 on the CPU eager_recompute up to model.attention.eager_max_row() tokens per row, SDPA beyond.
  - logits: rows x vocab x 12 (the saved fp32 log-softmax, its gradient, and the fp32 logits or their
    gradient: measured 12.0 on the CPU in bf16 and fp32), with rows = batch x seq (every position
    labelled, no chunking; loralab's own loss holds at most 1024 rows at once).
  - the two moments: at the start of backward every activation is alive but only the gradients of
    parameters outside the decoder layers exist (each layer's weight gradients appear as its
    activations are freed), unless gradient accumulation keeps earlier micro batches' gradients;
    at the optimizer step the activations are gone and every gradient plus the step's temporary is
    alive. The larger sets the peak (for LoRA the first at any realistic length; for full
    fine-tuning it depends).
  - other: CUDA: the CUDA context + cuBLAS workspace (0.5 GB, typical, not calibrated here: the
    article's numbers are torch.cuda.max_memory_allocated, which excludes it). CPU: the Python,
    torch, transformers and tokenizer runtime in the peak RSS, plus heap slack, the freed temporaries
    that stay resident as holes between live tensors, which depends on the malloc (`malloc`; the
    `loralab` command preloads tcmalloc or mimalloc, allocator.py): a share of the layers' saved
    bytes, and with checkpointing of the bytes the layers would have saved (the checkpointed forward
    frees them, as holes). Both fitted to benchmarks/memory_estimate.py's grid of real runs, per malloc.
    See docs/memory.md and benchmarks/memory_estimate.py. Per GPU of several (DDP, FSDP2):
    memory/sharding.py rearranges this estimate's `parts` and `units`.
"""
from __future__ import annotations

from ..errors import UserError
from ..model.attention import RECOMPUTE, cpu_choice
from ..peft.names import pattern_value
from ..peft.presets import OUTPUT_LAYER, WITH_HEAD, mutates_base
from ..runtime.allocator import active as active_allocator
from ..train.loss import CHUNK_ROWS, FROZEN_HEAD_ROWS
from ..train.precision import resolve_precision
from .activations import expert_weight_bytes, layer_bytes_per_token, rebuilt_inputs
from .arch import Arch, arch_from_config, count_params, expert_ranks, lora_layers, resolve_model_config, target_names

NF4_BITS = 4.127
CUDA_OTHER_BYTES = 0.5e9         # CUDA context + cuBLAS workspace (typical; no GPU here to calibrate)
CPU_RUNTIME_BYTES = 560 * 2**20  # RSS of the runtime besides the run's tensors (fitted: docs/memory.md)
# Heap slack per malloc: (x the layers' saved bytes, x what they would save under checkpointing). Fitted on
# memory_estimate.py's grid, 2026-12-04 (docs/memory.md). glibc ("system") keeps freed forward temporaries as
# holes; tcmalloc and mimalloc reuse them. A malloc not measured (jemalloc) is given glibc's, the larger.
CPU_HEAP_SLACK = {"system": (0.80, 0.45), "tcmalloc": (0.05, 0.05), "mimalloc": (0.40, 0.10)}
OPTIMIZER_TEMP_BYTES = 4.0       # foreach AdamW's sqrt(v) buffer (SGD's decayed gradient): fp32 per parameter

METHODS = ("lora", "qlora", "full")
OPTIMIZERS = {"adamw": 8.0, "sgd": 4.0, "adamw8bit": 2.0 + 2 * 4 / 256,  # state bytes per trainable param
              # lion: one momentum; adafactor: a row + a column vector per matrix, 4 (r + in) / (r in) bytes a
              # param, at most ~0.5 for LoRA's narrowest factors (r=8): that bound
              "lion": 4.0, "adafactor": 0.5}
PRECISIONS = {"bf16": 2, "fp32": 4}
DEVICES = ("cuda", "cpu")
GB = 1e9


# ---------------------------------------------------------------------------------------------
# The estimate

def _check(method, optimizer, precision, device, attention, r, seq, batch, grad_accum) -> None:
    for key, value, allowed in (("method", method, METHODS), ("optimizer", optimizer, tuple(OPTIMIZERS)),
                                ("precision", precision, tuple(PRECISIONS)), ("device", device, DEVICES),
                                ("attention", attention, ("auto", "eager", RECOMPUTE, "sdpa"))):
        if value not in allowed:
            raise UserError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")
    for key, value in (("r", r), ("seq", seq), ("batch", batch), ("grad_accum", grad_accum)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise UserError(f"{key} must be a positive integer, got {value!r}")


def _lora_ranks(a: Arch, wrapped: list[tuple[str, ...]], head: bool, r: int, rank_of) -> tuple[list[dict], int]:
    """([{module key: rank} per decoder layer], rank of lm_head or 0): `rank_of(layer, full module name)`
    gives a module's rank (0: not wrapped), for per-module rank (rank_pattern) and a subset of layers."""
    rank_of = rank_of or (lambda _layer, _name: r)
    layers = []
    for i, keys in enumerate(wrapped):
        paths = a.paths(i)
        layers.append({k: rank for k in keys if (rank := rank_of(i, paths[k]))})
    return layers, (rank_of(None, OUTPUT_LAYER) if head else 0)


def estimate(model_config: dict, *, method: str = "lora", r: int = 8, targets="all-linear", seq: int = 512,
             batch: int = 1, optimizer: str = "adamw", precision: str = "bf16", grad_checkpointing: bool = False,
             device: str = "cuda", attention: str = "auto", lora_dropout: float = 0.05, quantize: str = "all-linear",
             qlora_saves_inputs: bool = True, loss_rows: int | None = None, sgd_momentum: bool = True,
             grad_accum: int = 1, dora: bool = False, init_copies: bool = False, rank_of=None,
             stock_autograd: bool = False, malloc: str = "system", target_parameters=(),
             rank_pattern: dict | None = None) -> dict:
    """Predicted peak memory (bytes) of one training step, with its breakdown at that moment. Pure arithmetic.

    method lora | qlora (NF4 base) | full; targets a preset (qv, attn, mlp, all-linear, all-linear+head)
    or module names; attention auto (as loralab picks it) | eager | eager_recompute | sdpa; quantize which frozen
    linears QLoRA stores in NF4 (all-linear: every decoder linear, as QLoRA does; targets: only the
    LoRA-wrapped ones, loralab's default); qlora_saves_inputs: the 4-bit matmul keeps its input for
    backward (bitsandbytes does); loss_rows: logit rows alive at once (default batch x seq);
    stock_autograd: LoRA's dropout, SwiGLU and RMSNorm keep what plain autograd compositions keep (a float
    mask and the dropped input per target, SiLU's output, fp32 copies of the norms' inputs: PEFT, Lit-GPT, the
    article's runs)
    instead of what loralab's functions keep (peft/dropout.py, model/mlp.py, model/norm.py);
    grad_accum: micro batches per optimizer step (> 1: earlier micro batches' gradients are alive
    while the next one's activations are). Variants: dora (a trainable magnitude and a cached
    ||W||^2 per output row, and each wrapped layer's pre-scale output kept for backward),
    init_copies (PiSSA / OLoRA keep A0, B0 to save the adapter for the original base: one more
    fp32 copy of the factors), rank_of(layer, full module name) -> rank (0: not wrapped), for rank_pattern
    and a subset of layers (default: r everywhere). rsLoRA and LoRA+ cost nothing extra. malloc: the CPU
    run's (allocator.py's names; "system" is glibc's), which sets the heap slack. target_parameters:
    fused MoE expert weights with LoRA (PEFT's semantics, arch.expert_lora_params; rank_pattern by
    their full names): their factors count as trainable weights, gradients and optimizer state.
    """
    _check(method, optimizer, precision, device, attention, r, seq, batch, grad_accum)
    a = arch_from_config(model_config)
    L = range(a.layers)
    wrapped, head = ([()] * a.layers, False) if method == "full" else lora_layers(a, targets)
    names = () if method == "full" else target_names(targets, a)
    params = count_params(model_config, "all-linear", r)
    b = PRECISIONS[precision]
    if attention == "auto":
        attention = "sdpa" if device == "cuda" else cpu_choice(seq, precision == "bf16")
        # transformers runs attention sinks (gpt-oss) eager only, and loralab loads such a model so
        attention = "eager" if attention == "sdpa" and a.sinks else attention
    eager = attention == "eager"
    tokens = batch * seq
    lins = [a.linears(i) for i in L]
    # per layer, the linears QLoRA stores in NF4: every one it has, or only those LoRA wraps; fused experts
    # are not nn.Linear, so they stay in the compute dtype
    quantized = [set() for _ in L]
    if method == "qlora":
        quantized = [set(lins[i]) if quantize == "all-linear" else set(wrapped[i]) for i in L]
    q_weights = sum(lins[i][n][0] * lins[i][n][1] for i in L for n in quantized[i])
    experts = [{} for _ in L]
    if method != "full":  # (a config without num_hidden_layers, GPT-2's, has no experts: the padding's {})
        experts = [*expert_ranks(model_config, target_parameters, r, rank_pattern), *experts][:a.layers]
    shapes = {"gate_up_proj": (a.hidden, 2 * a.expert_inter), "down_proj": (a.expert_inter, a.hidden)}
    experts_per_layer = [sum(k * a.experts * sum(shapes[n]) for n, k in layer.items()) for layer in experts]

    # Weights. `outside`: trainable parameters outside the decoder layers, whose gradients exist
    # before the layers' activations start to be freed (the backward pass begins at the output layer).
    final_norm_weights = a.hidden * (2 if a.norm_bias else 1)
    outside_weights = params["embedding"] + params["lm_head"] + params["positions"] + final_norm_weights
    if method == "full":
        trainable = params["total"]
        frozen = 0.0
        masters = trainable * 4                                       # fp32 master weights
        casts = trainable * 2 if precision == "bf16" else 0.0         # autocast's bf16 copies, held by the graph
        outside = outside_weights                                     # + the final norm
        ranks = [{} for _ in L]
    else:
        ranks, head_r = _lora_ranks(a, wrapped, head, r, rank_of)
        factors = sum(k * (lins[i][n][0] + lins[i][n][1]) for i in L for n, k in ranks[i].items())
        factors += head_r * (a.hidden + a.vocab) + sum(experts_per_layer)
        rows = sum(lins[i][n][1] for i in L for n in ranks[i]) + (a.vocab if head_r else 0)
        trainable = factors + (rows if dora else 0)             # DoRA: a magnitude per output row
        frozen = (params["total"] - q_weights) * b + q_weights * NF4_BITS / 8
        frozen += 4 * (rows if dora else 0) + 4 * (factors if init_copies else 0)  # ||W||^2 cache; A0, B0
        masters, casts = trainable * 4, 0.0
        outside = (head_r * (a.hidden + a.vocab) + (a.vocab if dora else 0)) if head_r else 0
    state = trainable * (OPTIMIZERS[optimizer] if optimizer != "sgd" or sgd_momentum else 0.0)

    # Activations
    rebuilt = [frozenset()] * a.layers if stock_autograd else rebuilt_inputs(a, ranks, method, precision, experts)

    def layer_bytes(i: int, rebuilt_inputs: frozenset) -> float:
        return layer_bytes_per_token(a, i, b=b, seq=seq, eager=eager, method=method, lora=ranks[i],
                                     dropout=lora_dropout > 0, quantized=quantized[i],
                                     saves_quant_inputs=qlora_saves_inputs, dora=dora,
                                     stock_autograd=stock_autograd, rebuilt=rebuilt_inputs, expert_lora=experts[i],
                                     sdpa_cpu=device == "cpu" and attention == "sdpa")
    per_layer = [layer_bytes(i, rebuilt[i]) for i in L]
    per_token = sum(per_layer) / a.layers
    # expert LoRA's updated weights: kept per layer whatever the tokens (activations.expert_weight_bytes)
    fixed = [expert_weight_bytes(a, b, experts[i]) for i in L]
    heap_slack, ckpt_slack = CPU_HEAP_SLACK.get(malloc, CPU_HEAP_SLACK["system"])
    if grad_checkpointing:
        # the layer being recomputed keeps every input: nothing is rebuilt under checkpointing's hooks
        recomputed = max(tokens * layer_bytes(i, frozenset()) + fixed[i] for i in L)
        layers_bytes = tokens * a.layers * a.hidden * b + recomputed
        slack = ckpt_slack * (tokens * a.layers * per_token + sum(fixed))  # the discarded activations leave holes
    else:
        layers_bytes = tokens * a.layers * per_token + sum(fixed)
        slack = heap_slack * layers_bytes
    rows = tokens if loss_rows is None else min(loss_rows, tokens)
    logits = rows * a.vocab * 12
    final_norm = tokens * a.hidden * (4 if stock_autograd else b) + (tokens * 2 * b if a.norm_bias else 0)
    activations = layers_bytes + logits + final_norm  # + the final norm's input (LayerNorm: and its statistics)
    # expert LoRA: backward through a layer makes its updated weight's gradient, as large, while that layer's
    # saved tensors are still alive
    activations += max(fixed)
    if attention == RECOMPUTE:  # one layer's scores, softmax and their gradients while recomputed
        activations += tokens * a.heads * seq * (4 + 2 * (b == 2) + 4)
    runtime = CUDA_OTHER_BYTES if device == "cuda" else CPU_RUNTIME_BYTES
    slack = slack if device == "cpu" else 0.0  # the CPU's RSS keeps the heap's holes; CUDA's allocated bytes do not

    # Two moments can set the peak (see moments()); these are the parts they are made of.
    grads_alive = trainable if grad_accum > 1 else outside
    parts = {"frozen": frozen, "masters": masters, "casts": casts, "grads_backward": 4 * grads_alive,
             "grads_outside": 4 * outside, "grads_step": 4 * trainable, "state": state,
             "activations": activations, "runtime": runtime, "slack": slack,
             "step_temp": (0.0 if optimizer == "adamw8bit" else OPTIMIZER_TEMP_BYTES) * trainable,
             "frozen_nf4": q_weights * NF4_BITS / 8 if method != "full" else 0.0}  # within "frozen"
    phase, breakdown = peak_of(moments(parts))
    # One decoder layer's parameters and those outside the layers as stored (compute dtype, NF4 where
    # quantized, LoRA fp32; full fine-tuning in the compute dtype): the units FSDP all-gathers. The largest
    # layer: an MoE model's dense layers are smaller than its sparse ones.
    def stored(i: int) -> float:
        p = a.layer_params(i)
        nf4 = sum(lins[i][n][0] * lins[i][n][1] for n in quantized[i])
        lora_layer = 0 if method == "full" else \
            sum(k * (lins[i][n][0] + lins[i][n][1]) for n, k in ranks[i].items()) + experts_per_layer[i]
        return (sum(p.values()) - nf4) * b + nf4 * NF4_BITS / 8 + 4 * lora_layer
    units = {"layer_bytes": int(round(max(stored(i) for i in L))), "outside_bytes": int(round(
        outside_weights * b + (outside * 4 if method != "full" else 0)))}
    return {
        "peak_bytes": sum(breakdown.values()),
        "breakdown": breakdown,
        "phase": phase,
        "activation_detail": {"per_layer_per_token_bytes": int(round(per_token)), "layers_bytes": int(layers_bytes),
                              "logits_bytes": int(logits), "heap_slack_bytes": int(round(slack)),
                              "attention": attention},
        "params": {"total": params["total"], "trainable": trainable, "quantized": sum(map(len, quantized))},
        "parts": {k: int(round(v)) for k, v in parts.items()},
        "units": units,
        "settings": {"method": method, "r": r, "targets": targets if isinstance(targets, str) else list(names),
                     "seq": seq, "batch": batch, "grad_accum": grad_accum, "optimizer": optimizer,
                     "precision": precision, "grad_checkpointing": grad_checkpointing, "device": device,
                     "dora": dora, "malloc": malloc if device == "cpu" else None},
    }


def _run_rank_of(cfg):
    """rank_of(layer, full module name) for a run's lora.rank_pattern and lora.layers."""
    lo = cfg.lora
    if not lo.rank_pattern and lo.layers is None:
        return None
    wanted = None if lo.layers is None else set([lo.layers] if isinstance(lo.layers, int) else lo.layers)

    def rank_of(layer, name):
        if wanted is not None and layer is not None and layer not in wanted:
            return 0
        return pattern_value(lo.rank_pattern, name, lo.r)
    return rank_of


def moments(p: dict) -> dict:
    """The two moments that can set the peak, from a run's parts: the start of backward (every
    activation alive) and the optimizer step (activations freed; every gradient and the foreach
    optimizer's temporary buffer alive; bitsandbytes' 8-bit AdamW updates block by block, without one)."""
    other = p["runtime"] + p["slack"]  # the CPU's RSS keeps the heap's holes (slack 0 on CUDA)
    return {
        "start of backward": {"frozen_weights": p["frozen"], "trainable_weights": p["masters"] + p["casts"],
                              "gradients": p["grads_backward"], "optimizer_state": p["state"],
                              "activations": p["activations"], "other": other},
        "optimizer step": {"frozen_weights": p["frozen"], "trainable_weights": p["masters"],
                           "gradients": p["grads_step"], "optimizer_state": p["state"], "activations": 0.0,
                           "other": other + p["step_temp"]},
    }


def peak_of(moments_: dict) -> tuple[str, dict]:
    """The moment holding the most, and its breakdown in whole bytes (the parts' order kept)."""
    phase = max(moments_, key=lambda m: sum(moments_[m].values()))
    return phase, {k: int(round(v)) for k, v in moments_[phase].items()}


def run_settings(cfg, device, seq: int | None = None) -> dict:
    """`estimate`'s keyword arguments for a loralab RunConfig on `device`, shaped like loralab
    trains: its attention choice, its chunked loss, NF4 on the LoRA targets unless
    model.quant_all_linear, and an NF4 matmul that keeps only the packed weight for backward.
    seq: the longest sequence of the run (default data.max_seq_len)."""
    dev = "cuda" if str(device).startswith("cuda") else "cpu"
    method = "full" if cfg.train.method == "full" else ("qlora" if cfg.model.quant == "nf4" else "lora")
    # A frozen output layer's logits live one chunk at a time inside forward (train.loss._FrozenHeadCE).
    targets = cfg.lora.targets
    heads = targets == WITH_HEAD if isinstance(targets, str) else \
        any(str(t).rpartition(".")[2] == OUTPUT_LAYER for t in targets)  # any architecture's names: no lookup
    frozen_head = method != "full" and not heads
    # A preference objective (train/preference.py) trains two rows per pair and scores them per row with the
    # output layer's plain chunks; DPO's reference forward runs under no_grad: time, but no activation kept.
    rows = 2 if cfg.train.objective != "sft" else 1
    frozen_head = frozen_head and rows == 1
    return dict(method=method, r=cfg.lora.r, targets=cfg.lora.targets, seq=seq or cfg.data.max_seq_len,
                batch=cfg.train.batch_size * rows, optimizer=cfg.train.optimizer,
                precision=resolve_precision(cfg.train.precision, device),
                grad_checkpointing=cfg.train.gradient_checkpointing, device=dev,
                attention=cfg.model.attn_implementation, lora_dropout=cfg.lora.dropout,
                quantize="all-linear" if cfg.model.quant_all_linear else "targets",
                qlora_saves_inputs=False, loss_rows=FROZEN_HEAD_ROWS if frozen_head else CHUNK_ROWS,
                sgd_momentum=cfg.train.momentum > 0,
                grad_accum=cfg.train.grad_accum, dora=cfg.lora.use_dora, init_copies=mutates_base(cfg.lora.init),
                rank_of=_run_rank_of(cfg), malloc=active_allocator(),  # this process's: the run's
                target_parameters=cfg.lora.target_parameters, rank_pattern=cfg.lora.rank_pattern)


def estimate_for_run(cfg, model_config: dict, device, seq: int | None = None) -> dict:
    """The estimate for a loralab RunConfig on `device` (see run_settings)."""
    return estimate(model_config, **run_settings(cfg, device, seq))


def run_memory_breakdown(cfg, folder, device, seq: int | None = None) -> dict | None:
    """For a run's summary.json, beside the measured peak: the estimate for a micro batch of the
    run's longest example (`seq`; default data.max_seq_len), an upper bound of its peak, or None for
    an architecture this model does not cover (a run must never fail over its memory estimate)."""
    try:
        est = estimate_for_run(cfg, resolve_model_config(str(folder)), device, seq=seq)
    except UserError:
        return None
    return {"estimated_peak_bytes": est["peak_bytes"], **est["breakdown"]}

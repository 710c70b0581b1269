"""What one decoder layer keeps for backward, per token: estimate.py's activation model (its docstring and
docs/memory.md state the terms). Llama-family layers as loralab's converters leave them (model/norm.py,
model/mlp.py, model/rebuild.py) or as plain autograd keeps them (`stock_autograd`); GPT-2 layers as
transformers runs them (none of those converters apply to LayerNorm and GELU); mixture-of-experts blocks as
transformers 5's eager experts loop runs them (every routed token through top_k experts)."""
from __future__ import annotations

from .arch import MOE_FAMILIES, Arch

ATTN_KEYS = ("q_proj", "k_proj", "v_proj", "o_proj", "attn.c_attn", "attn.c_proj")


def input_groups(a: Arch, layer: int) -> dict[str, tuple[tuple[str, ...], int]]:
    """Layer `layer`'s distinct linear inputs: group -> (the linears reading it, its width). q/k/v share the
    first norm's output, the MLP's gate/up (and Qwen2-MoE's shared-expert gate) the second's."""
    H, lin = a.hidden, a.linears(layer)
    if a.family == "gpt2":
        return {"attn_in": (("attn.c_attn",), H), "o_in": (("attn.c_proj",), H), "mlp_in": (("mlp.c_fc",), H),
                "down_in": (("mlp.c_proj",), a.inter)}
    groups = {"attn_in": (("q_proj", "k_proj", "v_proj"), H), "o_in": (("o_proj",), a.q_dim)}
    if "gate_proj" in lin:  # a dense MLP, or an MoE block's shared expert
        groups["mlp_in"] = (tuple(k for k in ("gate_proj", "up_proj", "shared_expert_gate") if k in lin), H)
        groups["down_in"] = (("down_proj",), lin["down_proj"][0])
    return groups


def moe_block_bytes(a: Arch, b: int, stock_autograd: bool, expert_lora: dict, full: bool) -> float:
    """An MoE block's saved bytes per token, as transformers 5 runs it (its default grouped_mm experts;
    the eager loop keeps the same per routed token). Each token runs top_k experts: per routed token the
    gate_up output and the activation's intermediates (MOE_FAMILIES: 3 x I for SiLU x up, 6 x I for
    gpt-oss' clamped GLU) and the expert's output, kept by the routing weight's product; the routing
    bookkeeping: the router's fp32 softmax over the experts, then per routed token int64 indices (top-k,
    the sort's permutation, the gather's rows, the inverse permutation: 32) and fp32 weights (top-k
    values, normalised, and the ones applied: 8), plus a normaliser (4). A frozen expert's matmul keeps
    no input; one whose weight has a gradient (expert LoRA on it, or full fine-tuning) keeps its input:
    the gathered token (gate_up, H) or the product (down, I). Qwen2-MoE's shared expert is a SwiGLU MLP
    (model/mlp.py) whose sigmoid-gated output is kept too."""
    H, I, k = a.hidden, a.expert_inter, a.top_k
    total = k * (MOE_FAMILIES[a.model_type][2] * I + H) * b + a.experts * 4 + k * (4 * 8 + 2 * 4) + 4
    trains = {"gate_up_proj", "down_proj"} if full else set(expert_lora)
    total += k * ((H if "gate_up_proj" in trains else 0) + (I if "down_proj" in trains else 0)) * b
    total += H * b if full and not a.shared_inter else 0  # the router's input, when its weight trains
    if a.shared_inter:
        total += (3 if stock_autograd else 2) * a.shared_inter * b + (H + 1) * b
    return total


def expert_weight_bytes(a: Arch, b: int, expert_lora: dict) -> float:
    """Per MoE layer, what expert LoRA keeps whatever the tokens: the updated weight W + B A of each
    targeted parameter, materialised in W's dtype (peft/experts.py) and kept by the experts' matmuls for
    backward, and the factors' cast copies the update read."""
    shapes = {"gate_up_proj": (a.hidden, 2 * a.expert_inter), "down_proj": (a.expert_inter, a.hidden)}
    return sum(a.experts * (shapes[n][0] * shapes[n][1] + r * (shapes[n][0] + shapes[n][1])) * b
               for n, r in expert_lora.items())


def layer_bytes_per_token(a: Arch, layer: int, *, b: int, seq: int, eager: bool, method: str, lora: dict,
                          dropout: bool, quantized, saves_quant_inputs: bool, dora: bool = False,
                          stock_autograd: bool = False, rebuilt: frozenset = frozenset(),
                          expert_lora: dict | None = None, sdpa_cpu: bool = False) -> float:
    """Bytes decoder layer `layer` keeps for backward, per token (estimate.py's docstring). lora: its wrapped
    linears -> rank; rebuilt: the input groups backward rebuilds (rebuilt_inputs); expert_lora: its targeted
    fused expert weights -> rank; sdpa_cpu: the attention is SDPA on the CPU (with GPT-2's attention
    dropout it runs its math path; loralab's eager_recompute keeps q, k, v with dropout too)."""
    H, Q, K, I = a.hidden, a.q_dim, a.kv_dim, a.inter
    gpt2 = a.family == "gpt2"
    if gpt2:  # LayerNorm keeps its input and its mean and reciprocal deviation, in the input's dtype
        total = 2 * (H + 2) * b + (2 * H * b if a.resid_dropout else 0)  # dropout: a mask per residual branch
    else:     # RMSNorms: their inputs (model/norm.py; stock: fp32 copies), q/k norms included
        total = (2 * H + (Q + K if any(a.qk_norm) else 0)) * (4 if stock_autograd else b)
    if eager and gpt2:  # q, k, v and its softmax in the compute dtype (with dropout: its mask and output too)
        total += 3 * Q * b + a.heads * seq * b * (3 if a.attn_dropout else 1)
    elif eager and a.sinks:  # gpt-oss: its softmax in the compute dtype, over the keys and the sink
        total += 3 * Q * b + a.heads * (seq + 1) * b
    elif eager:
        total += 3 * Q * b + a.heads * seq * (4 + (2 if b == 2 else 0))
    elif gpt2 and a.attn_dropout and sdpa_cpu:  # SDPA with dropout on the CPU: its fp32 math path (q, k, v, scores)
        total += 3 * H * 4 + 3 * a.heads * seq * 4
    else:
        total += (2 * Q + 2 * K) * b + a.heads * 4
    if a.is_moe(layer):
        total += moe_block_bytes(a, b, stock_autograd, expert_lora or {}, method == "full")
    elif gpt2:  # gelu_new's composition keeps its input, tanh's output, 0.5 x and 1 + tanh
        total += 4 * I * b
    else:
        total += (3 if stock_autograd else 2) * I * b  # SwiGLU: gate, up (model/mlp.py; stock: + SiLU's output)
    lin = a.linears(layer)
    groups = input_groups(a, layer)
    if method == "full":
        return total + sum(width for g, (_, width) in groups.items() if g not in rebuilt) * b + 2 * H * 4
    plain = stock_autograd and dropout
    for group, (mods, width) in groups.items():
        wrapped = [m for m in mods if m in lora]
        # the input, one storage for every reader (peft/dropout.py); bitsandbytes-style 4-bit matmuls keep
        # theirs outside autograd's saves, where no rebuild reaches but down_proj's (model/mlp.py passes it h)
        by_quant = saves_quant_inputs and any(m in quantized for m in mods) \
            and not (group == "down_in" and group in rebuilt)
        if (wrapped and not plain and group not in rebuilt) or by_quant:
            total += width * b
        for m in wrapped:  # its dropout mask's bits (plain: a float mask and the dropped input), A's output;
            # DoRA: the pre-scale output W x + s·B A x
            total += (2 * width * b if plain else width / 8 if dropout else 0) + lora[m] * b
            total += lin[m][1] * b if dora else 0
    return total


def rebuilt_inputs(a: Arch, ranks: list[dict], method: str, precision: str,
                   experts: list[dict] | None = None) -> list[frozenset]:
    """Per decoder layer, the linear-input groups loralab's backward rebuilds instead of keeping: a norm's
    output where gradient flows into the norm (model/rebuild.py; the first LoRA layer's norm reads frozen
    activations), down_proj's input, the SwiGLU product, where it has a gradient (model/mlp.py). Full
    fine-tuning in bf16 runs its fp32 weights under autocast: its linears keep bf16 copies of the norms'
    outputs, not the outputs themselves, so only the product is rebuilt there. GPT-2: none (its LayerNorm
    and GELU MLP are not converted). experts: per layer, its fused expert weights with LoRA, through which
    gradient flows too."""
    if a.family == "gpt2":
        return [frozenset()] * len(ranks)
    flows, out = method == "full", []  # full fine-tuning: every norm's weight trains
    norms = {"attn_in", "mlp_in"} if method != "full" or precision == "fp32" else set()
    for i, lora in enumerate(ranks):
        groups = {"attn_in"} & norms if flows else set()
        flows = flows or any(m in lora for m in ATTN_KEYS)
        # an MoE block reads its norm's output outside the MLP the rebuild covers (router, experts, shared
        # gate): kept there
        groups |= ({"mlp_in"} & norms if not a.is_moe(i) else set()) | {"down_in"} if flows else set()
        flows = flows or any(m in lora for m in ("gate_proj", "up_proj", "down_proj", "shared_expert_gate")) \
            or bool(experts and experts[i])
        groups |= {"down_in"} if any(m in lora for m in ("gate_proj", "up_proj")) else set()
        out.append(frozenset(groups))
    return out

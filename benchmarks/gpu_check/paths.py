"""Every CUDA code path against its CPU / fp32 reference: NF4 dequantization and the QLoRA layer
(peft/quant.py), bf16 autocast (train/precision.py), attention on packed blocks (model/attention.py,
packing.py), dropout masks as bits (peft/dropout.py), the fused LoRA layer (peft/fused.py), torch.compile
(train/compile.py), the pre-flight's CUDA branch (memory/preflight.py). Each returns rows (common.row)."""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from common import FAIL, PASS, TINY, Ctx, compare, random_batch, random_model, row, skipped
from torch import nn

BF16_TOL = 3e-2   # relative to max |ref|: bf16 keeps 8 bits of mantissa, sums of ~100s of products
FP32_TOL = 1e-4   # relative: fp32 on another device / kernel, sums in another order


def _shape(ctx: Ctx) -> tuple[int, int, int]:
    """(rows, in, out) of one layer: Llama-2-7B's q_proj on CUDA, a tiny one on the CPU."""
    return (64, 128, 192) if ctx.tiny else (1304, 4096, 4096)


def nf4(ctx: Ctx) -> list[dict]:
    from loralab.peft.quant import _clone_nf4, dequantize_nf4, to_nf4

    _, d_in, d_out = _shape(ctx)
    w = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(0)) * 0.02
    t_cpu = to_nf4(w)
    ref = t_cpu.get_original_weight()  # torchao's own dequantization, fp32, on the CPU
    on_dev = _clone_nf4(t_cpu, ctx.device)
    rows = [compare("nf4", f"dequantize (torch kernel, fp32, {ctx.device.type}) vs torchao on the CPU",
                    dequantize_nf4(on_dev, torch.float32, "torch"), ref, 0.0)]
    rows.append(compare("nf4", f"dequantize into bf16 ({ctx.device.type}) vs torchao's fp32 rounded once",
                        dequantize_nf4(on_dev, torch.bfloat16), ref.to(torch.bfloat16), 0.0))
    t_dev = to_nf4(w.to(ctx.device))  # quantized on the device: codes may differ at bin edges only
    deq = dequantize_nf4(t_dev, torch.float32).cpu()
    err_dev, err_cpu = ((deq - w).norm() / w.norm()).item(), ((ref - w).norm() / w.norm()).item()
    rows.append(row("nf4", f"quantize on {ctx.device.type}: relative error vs the CPU's",
                    PASS if abs(err_dev - err_cpu) <= 1e-3 else FAIL, max_abs_error=abs(err_dev - err_cpu),
                    tolerance=1e-3, error_kind="|rel. Frobenius error - the CPU's|", rel_error=err_dev))
    return rows


def qlora_layer(ctx: Ctx) -> list[dict]:
    from loralab.peft.quant import NF4Linear, dequantize_nf4

    n, d_in, d_out = _shape(ctx)
    gen = torch.Generator().manual_seed(1)
    w, x, g = torch.randn(d_out, d_in, generator=gen) * 0.02, torch.randn(n, d_in, generator=gen), \
        torch.randn(n, d_out, generator=gen)
    layer = NF4Linear(w, compute_dtype=ctx.dtype).to(ctx.device)
    dense = dequantize_nf4(layer.weight, torch.float32).cpu()  # the reference: fp32 on the CPU
    xd = x.to(ctx.device, ctx.dtype).requires_grad_(True)
    y = layer(xd)
    y.backward(g.to(ctx.device, ctx.dtype))
    xr = x.clone().requires_grad_(True)
    yr = F.linear(xr, dense)
    yr.backward(g)
    what = f"NF4Linear bf16 on {ctx.device.type} vs fp32 dense on the CPU"
    return [compare("qlora_layer", f"{what}: forward", y, yr, BF16_TOL, relative=True),
            compare("qlora_layer", f"{what}: input gradient", xd.grad, xr.grad, BF16_TOL, relative=True)]


def _tiny_lora(ctx: Ctx, dtype: torch.dtype, device, seed: int = 0, dropout: float = 0.0):
    from loralab.peft.inject import inject
    from loralab.peft.lora import LoraSpec, lora_modules

    model = random_model(TINY, torch.device(device), dtype, seed=seed)
    inject(model, "all-linear", LoraSpec(r=4, alpha=8, dropout=dropout))
    torch.manual_seed(seed)
    for _, m in lora_modules(model):
        nn.init.normal_(m.lora_B.weight, std=0.02)  # a non-zero update: every factor gets a gradient
    return model.train()


def _loss_and_grads(model, batch: dict, autocast: bool = False):
    from loralab.train.loss import loss_sum

    dev = next(model.parameters()).device
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
        s, n = loss_sum(model, {k: v.to(dev) for k, v in batch.items()})
    (s / n).backward()
    grads = torch.cat([p.grad.float().flatten().cpu() for p in model.parameters() if p.requires_grad])
    model.zero_grad(set_to_none=True)
    return (s / n).detach().float().cpu(), grads


def _batch():
    from loralab.data.batching import collate

    return collate(random_batch([48, 31, 40], TINY["vocab_size"], seed=2), pad_id=0)


def autocast(ctx: Ctx) -> list[dict]:
    from loralab.train.precision import resolve_precision

    batch = _batch()  # full fine-tuning: what loralab runs under autocast (train.loop.uses_autocast)
    full = lambda dev: random_model(TINY, torch.device(dev), torch.float32, seed=5).train()  # noqa: E731
    ref_loss, ref_grads = _loss_and_grads(full("cpu"), batch)
    loss, grads = _loss_and_grads(full(ctx.device), batch, autocast=True)
    picked = resolve_precision("auto", ctx.device)
    want = ("bf16" if torch.cuda.is_bf16_supported() else "fp32") if ctx.cuda else picked
    what = f"bf16 autocast on {ctx.device.type} vs fp32 on the CPU"
    return [compare("autocast", f"{what}: loss", loss, ref_loss, BF16_TOL, relative=True),
            compare("autocast", f"{what}: gradients (full fine-tuning)", grads, ref_grads, 5e-2, relative=True),
            row("autocast", f"precision auto on {ctx.device.type} -> {picked}", PASS if picked == want else FAIL)]


def packed_attention(ctx: Ctx) -> list[dict]:
    """Three examples in one row (position ids restarting) vs each alone in fp32 on the CPU: transformers'
    SDPA with the block-diagonal mask it derives (CUDA 'auto'), and loralab's packed_blocks attention."""
    from loralab.model.attention import BLOCKS, forced_kind, register
    from loralab.model.packing import packed_inputs

    lengths = [9, 23, 14]
    ids = torch.randint(3, TINY["vocab_size"], (sum(lengths),), generator=torch.Generator().manual_seed(3))
    pos = torch.cat([torch.arange(n) for n in lengths])
    ref_model = random_model(TINY, torch.device("cpu"), torch.float32, seed=4).eval()
    with torch.no_grad():
        ref = torch.cat([ref_model(input_ids=part[None]).logits[0] for part in ids.split(lengths)])
    rows = []
    register()
    for dtype, tol in ((torch.float32, FP32_TOL), (ctx.dtype, BF16_TOL)):
        model = random_model(TINY, ctx.device, dtype, seed=4).eval()
        batch = {"input_ids": ids[None].to(ctx.device), "position_ids": pos[None].to(ctx.device)}
        name = str(dtype).replace("torch.", "")
        with torch.no_grad():
            sdpa = model(**packed_inputs(batch), use_cache=False).logits[0]  # as train.loss calls it
            model.set_attn_implementation(BLOCKS)
            blocks = {}
            for kind in ("sdpa", "eager_recompute"):
                with forced_kind(kind):
                    blocks[kind] = model(**packed_inputs(batch), use_cache=False).logits[0]
        rows.append(compare("packed_attention", f"SDPA on a packed row, {name} on {ctx.device.type}", sdpa, ref,
                            tol, relative=True))
        rows += [compare("packed_attention", f"packed_blocks ({kind}), {name} on {ctx.device.type}", out, ref,
                         tol, relative=True) for kind, out in blocks.items()]
    return rows


def dropout(ctx: Ctx) -> list[dict]:
    from loralab.peft.dropout import keep_mask, low_rank, pack_mask, unpack_mask

    n, d_in, _ = _shape(ctx)
    p = 0.05
    x = torch.randn(n, d_in, device=ctx.device)
    keep = keep_mask(x, p)
    rate, sigma = float(keep.float().mean()), (p * (1 - p) / keep.numel()) ** 0.5
    bits = pack_mask(keep)
    ref_bits = torch.from_numpy(np.packbits(keep.cpu().numpy().reshape(-1)))
    wrong_bits = int((bits.cpu() != ref_bits).sum())
    wrong_back = int((unpack_mask(bits, keep.shape).cpu() != keep.cpu()).sum())
    rows = [row("dropout", f"keep rate on {ctx.device.type} (1 - p = {1 - p})", PASS if abs(rate - (1 - p)) <= 6 * sigma
                else FAIL, max_abs_error=abs(rate - (1 - p)), tolerance=6 * sigma, error_kind="6 sigma"),
            row("dropout", f"pack_mask on {ctx.device.type} vs numpy's packbits on the CPU", PASS if not wrong_bits
                else FAIL, max_abs_error=wrong_bits, tolerance=0, error_kind="bytes that differ"),
            row("dropout", f"unpack_mask(pack_mask(m)) == m on {ctx.device.type}", PASS if not wrong_back else FAIL,
                max_abs_error=wrong_back, tolerance=0, error_kind="elements that differ")]
    # the bits-keeping function vs the plain composition, the same mask (the same RNG state), same device
    gen = torch.Generator().manual_seed(5)
    a = (torch.randn(8, d_in, generator=gen) * 0.1).to(ctx.device)
    b = torch.randn(16, 8, generator=gen).to(ctx.device)
    drop = nn.Dropout(p).train()
    outs = []
    for fn in ("bits", "composition"):
        xa, aa, ba = (t.clone().requires_grad_(True) for t in (x, a, b))
        torch.manual_seed(7)
        if fn == "bits":
            y = low_rank(drop, xa, aa, ba)
        else:
            m = keep_mask(xa, p)
            y = F.linear(F.linear(xa * m.to(xa.dtype) / (1 - p), aa), ba)
        y.square().sum().backward()
        outs.append(torch.cat([y.flatten(), xa.grad.flatten(), aa.grad.flatten(), ba.grad.flatten()]))
    rows.append(compare("dropout", f"LoRA product keeping the mask as bits vs the composition, {ctx.device.type}",
                        outs[0], outs[1], 1e-5, relative=True))
    return rows


def fused(ctx: Ctx) -> list[dict]:
    """The fused function vs the composition (peft.fused.ENABLED off) on the device, and vs fp32 on the CPU."""
    import loralab.peft.fused as fused_mod
    from loralab.peft.lora import LoRALinear, LoraSpec
    from loralab.peft.quant import NF4Linear

    n, d_in, d_out = _shape(ctx)
    gen = torch.Generator().manual_seed(6)
    w, x, g = torch.randn(d_out, d_in, generator=gen) * 0.02, torch.randn(n, d_in, generator=gen), \
        torch.randn(n, d_out, generator=gen)
    rows = []
    for base_kind in ("linear", "nf4"):
        for p in (0.0, 0.1):
            base = NF4Linear(w, compute_dtype=ctx.dtype) if base_kind == "nf4" else \
                nn.Linear(d_in, d_out, bias=False).requires_grad_(False)
            if base_kind == "linear":
                base.weight.copy_(w)
            torch.manual_seed(8)
            layer = LoRALinear(base, LoraSpec(r=8, alpha=16, dropout=p)).to(ctx.device)
            layer.base.to(ctx.dtype)
            nn.init.normal_(layer.lora_B.weight, std=0.02)
            results = []
            for enabled in (True, False):
                fused_mod.ENABLED = enabled
                try:
                    lay = copy.deepcopy(layer).train()
                    xd = x.to(ctx.device, ctx.dtype).requires_grad_(True)
                    torch.manual_seed(9)
                    y = lay(xd)
                    y.backward(g.to(ctx.device, ctx.dtype))
                    results.append(torch.cat([y.float().flatten(), xd.grad.float().flatten(),
                                              lay.lora_A.weight.grad.flatten(), lay.lora_B.weight.grad.flatten()]))
                finally:
                    fused_mod.ENABLED = True
            rows.append(compare("fused", f"fused vs composition, {base_kind} base, bf16, dropout {p}, "
                                f"{ctx.device.type}", results[0], results[1], BF16_TOL, relative=True))
    return rows


def compile_check(ctx: Ctx) -> list[dict]:
    """train.compile's blocks vs eager: loss and LoRA gradients. inductor on CUDA; on the CPU dynamo's 'eager'
    backend (the same graph capture, no code generation: inductor's first CPU compile takes minutes on 2 cores,
    as tests/train/test_compile.py does)."""
    from loralab.train.compile import compile_blocks

    batch = _batch()
    eager = _tiny_lora(ctx, torch.float32, ctx.device, seed=3)
    compiled = copy.deepcopy(eager)
    backend = "inductor" if ctx.cuda else "eager"
    n_blocks = compile_blocks(compiled, backend=backend)
    ref_loss, ref_grads = _loss_and_grads(eager, batch)
    loss, grads = _loss_and_grads(compiled, batch)
    what = f"compiled blocks ({backend}, {n_blocks} blocks) vs eager, fp32 on {ctx.device.type}"
    return [compare("compile", f"{what}: loss", loss, ref_loss, FP32_TOL, relative=True),
            compare("compile", f"{what}: LoRA gradients", grads, ref_grads, 1e-3, relative=True)]


def preflight(ctx: Ctx) -> list[dict]:
    from loralab.memory.preflight import cpu_room, device_room

    cpu = cpu_room()
    rows = [row("preflight", "cpu_room (the CPU branch, the reference path)", PASS if cpu and cpu.bytes > 0 else FAIL,
                bytes=cpu.bytes if cpu else None, source=cpu.source if cpu else None)]
    if not ctx.cuda:
        return rows + [skipped("preflight", "device_room on CUDA: torch.cuda.mem_get_info")]
    room = device_room(ctx.device)
    free, total = torch.cuda.mem_get_info(ctx.device)
    diff = abs(room.bytes - free)
    rows.append(row("preflight", f"device_room({ctx.device}) vs torch.cuda.mem_get_info", PASS if diff <= 256 * 2**20
                    and 0 < room.bytes <= total else FAIL, max_abs_error=diff, tolerance=256 * 2**20,
                    error_kind="bytes", bytes=room.bytes, total_bytes=total, source=room.source))
    return rows


PARTS = {"nf4": nf4, "qlora_layer": qlora_layer, "autocast": autocast, "packed_attention": packed_attention,
         "dropout": dropout, "fused": fused, "compile": compile_check, "preflight": preflight}

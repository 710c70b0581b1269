"""QLoRA base weights: frozen linear layers stored as 4-bit NormalFloat (NF4).

Each weight is cut into blocks of 64 values; a block stores one absmax scale and 64 4-bit codes
that index the 16 NF4 levels (quantiles of a standard normal, rescaled to [-1, 1]). The block
scales are themselves quantized to int8 in groups ("double quantization"), so a weight costs
4 + 8/64 + a little = ~4.13 bits. The storage is torchao's NF4Tensor; the dense weight only
exists transiently, in the compute dtype, inside forward and backward (it is not kept for
backward). Quantize the base model first, then inject LoRA: LoRALinear wraps an NF4Linear like
an nn.Linear and merges through `dequantize()`.

Dequantization (`dequantize_nf4`, in forward and again in backward) is not torchao's `linear_nf4`:
torchao widens every 4-bit code to int64 twice, gathers, scales and interleaves in separate passes
(torchao 0.18 has no other dequantization: `linear_nf4` and `.to(dtype)` both call
`get_original_weight`). On the CPU, bitsandbytes' dequantization kernel (the `qlora` extra) reads
torchao's storage as it is (two codes per byte, high nibble first, one absmax per block); without
it, one torch gather of four levels per two stored bytes, scaled per block, does the same. Both give
bit for bit torchao's values (tests/peft/test_quant.py); the speed of each is in
docs/performance.md (`benchmarks/experiments/nf4_dequant.py`). torchao still quantizes and stores.

torchao is imported lazily (it takes seconds to import) and only needed when quantizing.
"""
from __future__ import annotations

import logging
import sys

import torch
from torch import nn

from ..errors import UserError
from .layout import is_conv1d

# The 16 NF4 code values of the QLoRA paper (Dettmers et al. 2023, appendix E), as bitsandbytes
# uses them. torchao's table is rounded to 4 decimals; our tensors carry these exact values.
NF4_LEVELS: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
BLOCK_SIZE = 64          # values per absmax scale (QLoRA)
MAX_SCALER_BLOCK = 256   # block scales per int8 double-quantization group (QLoRA)
_INNER = ("quantized_data", "quantized_scalers", "quantization_factor", "scaler_mean", "nf4")


def _nf4_module():
    """torchao's NF4 module, imported on first use with its import-time log noise silenced."""
    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    quiet = lambda record: record.levelno >= logging.ERROR  # noqa: E731
    for lg in loggers:  # a filter, not a level: torch's logging setup may reset levels meanwhile
        lg.addFilter(quiet)
    try:
        from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor
    except ImportError as e:
        raise UserError(f"model.quant: nf4 needs torchao: pip install 'loralab[qlora]' ({e})") from None
    finally:
        for lg in loggers:
            lg.removeFilter(quiet)
    return nf4_tensor


def scaler_block_size(numel: int) -> int:
    """Scales per double-quantization group for a weight of `numel` values.

    torchao requires the group size to divide the number of 64-value blocks exactly (its default,
    256, fails e.g. for 576 x 576: 5184 blocks). We take the largest divisor <= 256: the groups
    stay as large as QLoRA's, so the per-group fp32 factors still cost ~0.002 bits/weight."""
    n_blocks = numel // BLOCK_SIZE
    return max(d for d in range(1, min(MAX_SCALER_BLOCK, n_blocks) + 1) if n_blocks % d == 0)


def _check_shape(weight: torch.Tensor, name: str) -> None:
    if weight.dim() != 2 or weight.numel() == 0 or weight.numel() % BLOCK_SIZE:
        raise UserError(f"quant: cannot quantize {name} to NF4: its weight has shape {tuple(weight.shape)} "
                        f"({weight.numel()} values), not a whole number of {BLOCK_SIZE}-value blocks")
    if not weight.is_floating_point():
        raise UserError(f"quant: cannot quantize {name} to NF4: its weight is {weight.dtype}, not floating point")


def to_nf4(weight: torch.Tensor, name: str = "weight"):
    """Quantize a 2-D weight to a torchao NF4Tensor (fp32 metadata, exact NF4 levels, no grad).

    Quantization runs in fp32 whatever the weight's dtype, on the weight's device."""
    _check_shape(weight, name)
    mod = _nf4_module()
    w = weight.detach().to(torch.float32).contiguous()
    t = mod.to_nf4(w, BLOCK_SIZE, scaler_block_size(w.numel()))
    # Codes were picked against torchao's 4-decimal table (bins shift by < 1e-4 of a block's
    # absmax); dequantize with the paper's exact levels.
    t.nf4 = torch.tensor(NF4_LEVELS, dtype=t.nf4.dtype, device=t.nf4.device)
    return t


def _clone_nf4(t, device=None):
    """A copy of an NF4Tensor with fresh inner tensors (torchao's clone re-quantizes instead)."""
    mod = _nf4_module()
    attrs = {a: getattr(t, a).detach().to(device or t.device, copy=True) for a in _INNER}
    attrs["device"] = attrs["quantized_data"].device
    return mod.NF4Tensor(*mod.construct_nf4_args(t, attrs))


KERNELS = ("auto", "bitsandbytes", "torch", "torchao")  # NF4Linear.kernel: who dequantizes
_BNB: list = []  # [the bitsandbytes op, or None when it is not installed], looked up once
_DECODE_TABLES: dict = {}  # (device, levels) -> the 65,536 x 4 table of _decode_table


def _decode_table(t) -> torch.Tensor:
    """(65536, 4) fp32: the four levels two stored bytes (read as one 16-bit integer) decode to.
    One table per device and level set, shared by every tensor (1 MB); each tensor keeps a reference."""
    table = getattr(t, "_loralab_decode", None)
    if table is None:
        levels = t.nf4.detach().to("cpu", torch.float32)
        key = (str(t.quantized_data.device), tuple(levels.tolist()))
        table = _DECODE_TABLES.get(key)
        if table is None:
            byte = torch.arange(256)
            pairs = torch.stack((levels[byte >> 4], levels[byte & 15]), dim=1)  # a byte: high nibble first
            two = torch.arange(65536)
            first, second = (two & 255, two >> 8) if sys.byteorder == "little" else (two >> 8, two & 255)
            table = torch.cat((pairs[first], pairs[second]), dim=1).to(t.quantized_data.device)
            _DECODE_TABLES[key] = table
        t._loralab_decode = table
    return table


def _bitsandbytes_op():
    """bitsandbytes' dequantize_4bit op (CPU: a vectorised C++ kernel), or None when not installed."""
    if not _BNB:
        log = logging.getLogger("bitsandbytes")  # its modules' loggers inherit this level
        level = log.level
        log.setLevel(logging.ERROR)  # its import warns about optional GPU / kernel-hub code we do not use
        try:
            import bitsandbytes  # noqa: F401  (registers torch.ops.bitsandbytes)

            _BNB.append(torch.ops.bitsandbytes.dequantize_4bit.default)
        except (ImportError, AttributeError, RuntimeError, OSError):
            _BNB.append(None)
        finally:
            log.setLevel(level)
    return _BNB[0]


def _scales(t) -> torch.Tensor:
    """Each block's absmax in fp32 (double quantization undone), computed once per tensor: every
    forward and backward needs them, and they cost 4 bytes per 64 weights (~7 MB for 106 M)."""
    scales = getattr(t, "_loralab_scales", None)
    if scales is None:
        scales = t.dequantize_scalers(t.quantized_scalers, t.quantization_factor, t.scaler_block_size)
        scales = t._loralab_scales = scales.to(torch.float32)
    return scales


def _bitsandbytes_applies(t, dtype: torch.dtype) -> bool:
    """bitsandbytes' kernel has the paper's levels built in: only for tensors that carry exactly
    those (ours do; torchao's own are rounded to 4 decimals), on the CPU, in a dtype it writes."""
    ok = getattr(t, "_loralab_exact_levels", None)
    if ok is None:
        ok = torch.equal(t.nf4.detach().cpu().to(torch.float32), torch.tensor(NF4_LEVELS, dtype=torch.float32))
        t._loralab_exact_levels = ok
    return ok and t.quantized_data.device.type == "cpu" and dtype in (torch.float32, torch.bfloat16, torch.float16)


def dequantize_nf4(t, dtype: torch.dtype, kernel: str = "auto") -> torch.Tensor:
    """The dense (out, in) weight of an NF4Tensor in `dtype`, equal to torchao's
    `get_original_weight()` (fp32 math, one rounding into `dtype`). kernel: "auto" (bitsandbytes
    where installed and applicable, else torch), "bitsandbytes", "torch", "torchao" (for comparison)."""
    if kernel == "torchao":
        return t.get_original_weight().to(dtype)
    if kernel in ("auto", "bitsandbytes"):
        op = _bitsandbytes_op() if _bitsandbytes_applies(t, dtype) else None
        if op is not None:
            return op(t.quantized_data.reshape(-1), _scales(t), t.block_size, "nf4", list(t.shape), dtype)
        if kernel == "bitsandbytes":
            raise UserError("quant: the bitsandbytes NF4 kernel is not available here (pip install bitsandbytes, "
                            "on the CPU, with NF4Linear's exact levels)")
    return _dequantize_torch(t, dtype)


def _dequantize_torch(t, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight of an NF4Tensor in `dtype`, equal to torchao's `get_original_weight()`
    (fp32 math, one rounding into `dtype`), in two passes: one gather decodes four codes (two
    stored bytes) at a time from a 65,536-entry table, then each block of 64 is multiplied by its
    absmax scale (double quantization undone in fp32), written straight into `dtype`."""
    pairs_of_bytes = t.quantized_data.reshape(-1).view(torch.int16).to(torch.int32) & 0xFFFF
    w = _decode_table(t).index_select(0, pairs_of_bytes).view(-1, t.block_size)
    scales = _scales(t).unsqueeze(-1)
    if dtype == torch.float32:
        return w.mul_(scales).view(t.shape)
    out = torch.empty(w.shape, dtype=dtype, device=w.device)
    return torch.mul(w, scales, out=out).view(t.shape)


class _LinearNF4(torch.autograd.Function):
    """y = x W^T with W dequantized in forward and again in backward (for x's gradient); only the
    4-bit weight is saved, so the dense copy lives one matmul long."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight, kernel: str) -> torch.Tensor:
        ctx.weight, ctx.kernel = weight, kernel  # not save_for_backward: a frozen buffer, never in the graph
        return nn.functional.linear(x, dequantize_nf4(weight, x.dtype, kernel))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ dequantize_nf4(ctx.weight, grad.dtype, ctx.kernel), None, None


def nf4_nbytes(t) -> int:
    """Bytes actually stored by an NF4Tensor (codes, int8 scales, group factors, mean, levels)."""
    return sum(getattr(t, a).numel() * getattr(t, a).element_size() for a in _INNER)


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored in NF4 (blocks of 64, double-quantized scales).

    The weight is the non-persistent buffer `weight` (an NF4Tensor, never requiring grad); the
    bias, if any, is a frozen parameter in `compute_dtype`. forward() dequantizes into the input's
    dtype, and backward() dequantizes again to pass gradients to the input (so LoRA layers earlier
    in the network train); the quantized weight never gets a gradient."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype | None = None, name: str = "weight"):
        super().__init__()
        compute_dtype = compute_dtype or weight.dtype
        if compute_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise UserError(f"quant: compute dtype for {name} must be float32 or bfloat16, not {compute_dtype}")
        self.out_features, self.in_features = weight.shape
        self.compute_dtype = compute_dtype
        self.kernel = "auto"  # who dequantizes (KERNELS); benchmarks switch it to compare
        self.register_buffer("weight", to_nf4(weight, name), persistent=False)
        self.bias = None if bias is None else nn.Parameter(
            bias.detach().to(compute_dtype, copy=True), requires_grad=False)

    fan_in_fan_out = False  # True: quantized from a Conv1D, which merging writes back as one (layout.py)

    @classmethod
    def from_linear(cls, linear: nn.Module, compute_dtype: torch.dtype | None = None,
                    name: str = "linear") -> NF4Linear:
        """From an nn.Linear, or a GPT-2 Conv1D: its (in, out) weight is stored transposed, (out, in),
        so the quantized layer is an ordinary linear one from here on."""
        if not is_conv1d(linear):
            return cls(linear.weight, linear.bias, compute_dtype, name)
        layer = cls(linear.weight.t(), linear.bias, compute_dtype, name)
        layer.fan_in_fan_out = True
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _LinearNF4.apply(x, self.weight, self.kernel)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    @torch.no_grad()
    def requantize_(self, weight: torch.Tensor) -> None:
        """Store a new dense (out, in) weight, quantized (PiSSA / OLoRA's residual: init.py)."""
        self._buffers["weight"] = to_nf4(weight.to(self.weight.device), "weight")

    @torch.no_grad()
    def dequantize(self) -> torch.Tensor:
        """The dense (out, in) weight in compute_dtype (a fresh tensor)."""
        return dequantize_nf4(self.weight, self.compute_dtype, self.kernel)

    def _apply(self, fn, recurse=True):
        # nn.Module.to(dtype)/.half() would dequantize the NF4 buffer through Tensor.to(dtype).
        # Keep it quantized: move it to the new device only, and let compute_dtype follow the
        # dtype the call asks for (as the bias does).
        w = self._buffers.pop("weight")
        try:
            super()._apply(fn, recurse)
        finally:
            self._buffers["weight"] = w
        probe = fn(torch.zeros(1, dtype=self.compute_dtype, device=w.device))
        if probe.is_floating_point():
            self.compute_dtype = probe.dtype
        if probe.device != w.device:
            self._buffers["weight"] = _clone_nf4(w, probe.device)
        return self

    def __deepcopy__(self, memo):
        # Module deepcopy would clone the buffer with torchao's clone (re-quantization); copy the
        # stored codes instead.
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        w = self._buffers.pop("weight")
        try:
            import copy
            new.__dict__ = copy.deepcopy(self.__dict__, memo)
        finally:
            self._buffers["weight"] = w
        new._buffers["weight"] = _clone_nf4(w)
        return new

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, compute_dtype={self.compute_dtype}, nf4 blocks={BLOCK_SIZE}")


def quantize_model(model: nn.Module, module_names: list[str] | None = None, *,
                   compute_dtype: torch.dtype | None = None) -> int:
    """Replace nn.Linear (and GPT-2 Conv1D) modules by NF4Linear in place; returns how many were replaced.

    module_names: full module names (as in model.named_modules()); None means every such layer
    except the output layer (model.get_output_embeddings()). compute_dtype defaults to each
    layer's weight dtype. Run this before LoRA injection. All layers are checked before any is
    replaced, so a UserError leaves the model untouched."""
    modules = dict(model.named_modules())
    # a LoRA layer by its factors (peft.lora imports this module through peft.fused: no import back)
    if any(hasattr(m, "lora_A") and hasattr(m, "base") for m in modules.values()):
        raise UserError("quant: quantize the base model before injecting LoRA (LoRA layers found)")
    if module_names is None:
        get_head = getattr(model, "get_output_embeddings", None)
        head = get_head() if callable(get_head) else None
        names = [n for n, m in modules.items() if (isinstance(m, nn.Linear) or is_conv1d(m)) and m is not head]
    else:
        names = []
        for n in module_names:
            m = modules.get(n)
            if isinstance(m, NF4Linear):
                continue  # already quantized
            if not (isinstance(m, nn.Linear) or is_conv1d(m)):
                what = "no such module" if m is None else f"a {type(m).__name__}, not nn.Linear"
                raise UserError(f"quant: cannot quantize {n!r} to NF4: {what}")
            names.append(n)
    for n in names:
        _check_shape(modules[n].weight, n)
    for n in names:
        parent_name, _, child = n.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, NF4Linear.from_linear(modules[n], compute_dtype, name=n))
    return len(names)


def quantization_error(weight: torch.Tensor) -> float:
    """Relative Frobenius error ||W - dequant(quant(W))|| / ||W||, in fp32."""
    w = weight.detach().float()
    deq = dequantize_nf4(to_nf4(w), torch.float32)
    return ((deq - w).norm() / w.norm().clamp_min(1e-30)).item()


def bits_per_weight(module: nn.Module) -> float:
    """Stored bits per weight of an NF4Linear (bias excluded), from the actual tensor sizes."""
    return nf4_nbytes(module.weight) * 8 / (module.in_features * module.out_features)


def quantized_bytes(model: nn.Module) -> int:
    """Bytes held by the NF4 weights of all NF4Linear layers in `model` (shared ones once)."""
    seen: set[int] = set()
    total = 0
    for m in model.modules():
        if isinstance(m, NF4Linear) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            total += nf4_nbytes(m.weight)
    return total

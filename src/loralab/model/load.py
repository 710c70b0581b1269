"""A resolved model folder's weights as a model object (io/models.py finds and caches the folder): the model as
transformers computes it, with the attention `model.attn_implementation` asks for ('auto': SDPA, or eager for a
class that refuses SDPA); model/convert.py then changes what a training run changes."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import UserError
from ..io.models import load_error, load_tokenizer, resolve
from .attention import pick_attention


def _model_class(folder: Path, trust_remote_code: bool):
    """The causal-LM class transformers would build for the folder (None where it cannot tell)."""
    try:
        from transformers import AutoConfig
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        return MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(str(folder),
                                                                          trust_remote_code=trust_remote_code))]
    except Exception:  # noqa: BLE001 - an unknown or broken config: from_pretrained below says what is wrong
        return None


def load_weights(folder: Path, dtype: torch.dtype = torch.float32, *, trust_remote_code: bool = False,
                 device: str | torch.device = "cpu", attn_implementation: str = "auto"):
    """The model of a resolved folder as transformers computes it (model/convert.py changes that, for
    training), in eval mode with every parameter frozen."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress output is enough
    try:
        attention = pick_attention(attn_implementation, _model_class(folder, trust_remote_code))
        # use_kernels=False: with the `kernels` package installed (transformers pulls it in) each
        # model.train() / eval() re-kernelizes the decorated layers, which puts the class's forward back
        # on every RMSNorm (undoing model/norm.py's converter), and on a GPU would fetch kernel code from the Hub.
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, trust_remote_code=trust_remote_code,
                                                     attn_implementation=attention, use_kernels=False)
    except ValueError as e:
        raise load_error(folder, e, trust_remote_code) from None
    except (OSError, RuntimeError, json.JSONDecodeError) as e:
        raise UserError(f"{folder}: cannot load model ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    except Exception as e:  # safetensors raises its own error type on corrupt files
        if "safetensor" in type(e).__module__.lower() or "header" in str(e).lower():
            raise UserError(f"{folder}: corrupt safetensors weights ({str(e)[:160]})") from None
        raise
    model.to(device)
    model.requires_grad_(False)
    model.eval()
    return model


def copy_out_of_file(model) -> None:
    """Copy the model's plain CPU tensors into memory of their own, so the file they were loaded
    from can be unmapped. transformers maps a safetensors file and keeps weights of the stored dtype
    as views of that map; once quantization has replaced most of them, the few left dense
    (embeddings, norms) would keep the whole map alive, and with it every page of the full-precision
    weights that quantization read, resident for nothing."""
    for t in list(model.parameters()) + list(model.buffers()):
        if type(t.data) is torch.Tensor and t.device.type == "cpu":
            t.data = t.data.clone()


def load_model(spec: str, dtype: torch.dtype = torch.float32, *, trust_remote_code: bool = False,
               device: str | torch.device = "cpu", attn_implementation: str = "auto"):
    """Returns (model, tokenizer, folder). The model is in eval mode with every parameter frozen."""
    folder = resolve(spec)
    model = load_weights(folder, dtype, trust_remote_code=trust_remote_code, device=device,
                         attn_implementation=attn_implementation)
    return model, load_tokenizer(folder, trust_remote_code), folder

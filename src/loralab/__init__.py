"""loralab: a LoRA/QLoRA fine-tuning lab for causal language models."""
from .runtime.onednn import bound_primitive_cache

bound_primitive_cache()  # before torch builds any matmul primitive (onednn.py says why)

__version__ = "0.1.0"

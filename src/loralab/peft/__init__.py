"""LoRA itself: the layer (lora.py), which modules it wraps (targets.py, presets.py), putting it
into a model and taking it out (inject.py, merge.py), adapters on disk in PEFT's format
(adapters.py), and NF4 base weights for QLoRA (quant.py)."""

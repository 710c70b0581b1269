"""loralab: a LoRA/QLoRA fine-tuning lab for causal language models.

The Python API (api.py; `import loralab` stays cheap: each loads what it needs when called):
    loralab.train(config_or_path=None, **overrides) -> RunResult   fine-tune, as `loralab train`
    loralab.estimate(model, **settings) -> dict                      peak memory, as `loralab estimate`
    loralab.load(model=None, adapter=None) -> Loaded                 base + adapter; .generate(prompts)
Overrides are config keys with `__` for each dot (`train__max_steps=4`) or, through a dict, dotted
(`**{"train.max_steps": 4}`).
"""
import types as _types

from .runtime.onednn import bound_primitive_cache

bound_primitive_cache()  # before torch builds any matmul primitive (onednn.py says why)

__version__ = "0.1.0"
__all__ = ["train", "estimate", "load", "RunResult", "Loaded", "UserError", "__version__"]


class _CallableTrainPackage(_types.ModuleType):
    """`loralab.train` is both the subpackage (loop, optimizers, checkpoints: loralab.train.loop ...)
    and the API's train(): importing a submodule sets the package attribute, so the name cannot hold
    a plain function; the subpackage, called, runs api.train."""

    def __call__(self, config_or_path=None, /, *, quiet: bool = False, **overrides):
        """loralab.train(config_or_path=None, *, quiet=False, **overrides) -> RunResult: fine-tune as
        `loralab train` does (help(loralab.api.train) for the arguments)."""
        from .api import train

        return train(config_or_path, quiet=quiet, **overrides)


def __getattr__(name: str):
    if name in ("estimate", "load", "RunResult", "Loaded"):
        from . import api

        return getattr(api, name)
    if name == "UserError":
        from .errors import UserError

        return UserError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


from . import train  # noqa: E402  (cheap: the subpackage's __init__ imports nothing)

train.__class__ = _CallableTrainPackage

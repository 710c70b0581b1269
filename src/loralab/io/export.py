"""Exports: a model (e.g. with its adapter merged in) written as a plain Hugging Face folder."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ..errors import UserError
from .fileio import plain_permissions


def new_output_folder(out_dir: str | os.PathLike) -> Path:
    """The folder an export will create: refused at once (before any loading) if it holds anything."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: output exists and is not an empty folder")
    return out


def save_hf_folder(model, tokenizer, out_dir: str | os.PathLike) -> Path:
    """`save_pretrained` of model and tokenizer into a temporary sibling, renamed into place: the
    folder appears complete or not at all."""
    out = new_output_folder(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        plain_permissions(tmp)  # mkdtemp made it 0700
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out

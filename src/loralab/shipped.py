"""The run configs that ship inside the package (loralab/bundled/*.yaml, package data), so that
`loralab train demo` works from any folder after a plain install, where the repository's configs/
folder is not there. The repository's configs/demo.yaml is the same file (tests/test_shipped.py)."""
from __future__ import annotations

from pathlib import Path

from .errors import UserError

SHIPPED_DIR = Path(__file__).resolve().parent / "bundled"


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in SHIPPED_DIR.glob("*.yaml"))


def resolve_config(arg: str) -> str:
    """A config argument as a path: an existing file is itself; a bare name that is not a file here
    (`demo`, `demo.yaml`) is the shipped config of that name. Anything else is left to the YAML
    reader, which says the file does not exist."""
    p = Path(arg)
    if p.exists() or len(p.parts) != 1 or p.suffix not in ("", ".yaml"):
        return arg
    shipped = SHIPPED_DIR / f"{p.stem}.yaml"
    if shipped.is_file():
        return str(shipped)
    raise UserError(f"{arg}: no such config file here, and not a shipped config "
                    f"(shipped: {', '.join(shipped_configs())}; or give a path to a YAML file)")

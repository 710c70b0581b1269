"""The package's shape: no import cycles between modules or between subpackages, small files."""
import ast
from pathlib import Path

import loralab

SRC = Path(loralab.__file__).parent


def _imports() -> dict[str, set[str]]:
    """Module (dotted, relative to loralab) -> the loralab modules it imports, at any depth of the file."""
    out = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).with_suffix("")
        if rel.name == "__init__":
            continue
        pkg = list(rel.parts[:-1])
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = pkg[:len(pkg) - node.level + 1] + (node.module.split(".") if node.module else [])
                for alias in node.names:  # `from . import x` names a module; `from .m import f` a name in m
                    as_module = base + [alias.name]
                    target = as_module if SRC.joinpath(*as_module).with_suffix(".py").exists() else base
                    deps.add(".".join(target))
        out[".".join(rel.parts)] = deps
    return out


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path + [nxt]
            if nxt not in state and (found := visit(nxt, path + [nxt])):
                return found
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node, [node])):
            return found
    return None


def test_no_import_cycles_between_modules_or_subpackages():
    graph = _imports()
    assert "train.step" in graph and "train.loss" in graph["train.step"]  # the scan sees relative imports
    assert _cycle(graph) is None, _cycle(graph)
    room = lambda m: m.split(".")[0]
    rooms: dict[str, set[str]] = {}
    for m, deps in graph.items():
        rooms.setdefault(room(m), set()).update(room(d) for d in deps if room(d) != room(m))
    assert _cycle(rooms) is None, _cycle(rooms)
    assert _cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]  # the check itself can fail


def test_the_data_package_never_touches_a_model():
    graph = _imports()
    data = {m: deps for m, deps in graph.items() if m.startswith("data.")}
    leaves = {"errors", "io.reading"}  # the one-line error and the guarded file open: no model in either
    assert data and all(d.startswith("data.") or d in leaves for deps in data.values() for d in deps)
    assert not graph["io.reading"] - {"errors"}


def test_source_files_stay_small():
    sizes = {str(p.relative_to(SRC)): len(p.read_text().splitlines()) for p in SRC.rglob("*.py")}
    assert not {p: n for p, n in sizes.items() if n > 400}

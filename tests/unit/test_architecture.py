"""The package's import graph: no circles, and every import points down the layers of
docs/architecture.md (benchmarks -> entrypoints -> engine -> executor -> worker -> model -> ops ->
distributed), with `core/` beside the engine and the configs and user-facing types at the bottom.
Every import counts, also those inside functions and under TYPE_CHECKING: a lazy import is still a
dependency. The program's roots may import anything: the package's `__init__` (the public API) and
the `tokenmill` command's `main`, which wires every subcommand (`tokenmill bench` included).
Also: no environment variable is read below `entrypoints/` and `config/`."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "tokenmill"

# Lowest first; a module may import its own layer or any layer below it.
LAYERS = [
    ("version", "sampling_params", "pooling_params", "outputs", "pooling_outputs", "utils", "config"),
    ("structured_output", "core", "distributed"),
    ("ops",),
    ("model",),
    ("worker",),
    ("executor",),
    ("engine",),
    ("entrypoints",),
    ("benchmarks",),
]
ROOTS = ("tokenmill", "tokenmill.entrypoints.cli.main")
LEVEL = {name: i for i, names in enumerate(LAYERS) for name in names}
# May read the environment: the process's edge (CLI, server) and config resolution.
ENV_READERS = ("entrypoints", "config")


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        mods[".".join(parts)] = path
    return mods


def _imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".")[: len(mod.split(".")) - node.level + is_pkg]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                names = [target] + [f"{target}.{a.name}" for a in node.names]
            for name in names:
                while name and name not in mods:
                    name = name.rpartition(".")[0]
                if name and name != mod and not mod.startswith(name + "."):
                    edges[mod].add(name)
    return edges


def _layer(mod: str) -> str | None:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else None


def test_no_import_circles():
    edges = _imports(_modules())
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    assert circles == []


def test_imports_point_down_the_layers():
    mods = _modules()
    assert {_layer(m) for m in mods} - {None} <= set(LEVEL), "a new top-level part needs a layer"
    upward = []
    for mod, targets in _imports(mods).items():
        src = _layer(mod)
        if mod in ROOTS:
            continue
        for target in targets:
            dst = _layer(target)
            if dst is not None and LEVEL[dst] > LEVEL[src]:
                upward.append(f"{mod} -> {target}")
    assert upward == []


def test_no_environment_reads_below_the_edges():
    readers = []
    for mod, path in _modules().items():
        if _layer(mod) in ENV_READERS or _layer(mod) == "benchmarks":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv"):
                readers.append(f"{mod}:{node.lineno}")
    assert readers == []

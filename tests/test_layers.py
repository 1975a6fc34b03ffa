"""The package's layers (shared/STYLE.md, "Layout"), checked from the imports themselves: every
import of every module — at the top or inside a function — points down or sideways within its
layer, never up; training and evaluation never import each other; nothing in m2sa_jax imports
checkpoints_convert; and no two modules import each other, directly or through others."""

from __future__ import annotations

import ast
import os

from tests.support import REPO

# (layer, module prefixes); a module belongs to the first entry whose prefix it starts with
LAYERS = [
    (4, ("m2sa_jax.main", "m2sa_jax.segment", "m2sa_jax.serve", "m2sa_jax.demo_sam",
         "checkpoints_convert")),
    (3, ("m2sa_jax.training", "m2sa_jax.evaluation")),
    (2, ("m2sa_jax.inference",)),
    (1, ("m2sa_jax.checkpoints", "m2sa_jax.quantization", "m2sa_jax.sharding",
         "m2sa_jax.config_file")),
    (0, ("m2sa_jax.models", "m2sa_jax.data", "m2sa_jax.tree", "m2sa_jax.dtypes")),
]
PACKAGES = ("m2sa_jax", "checkpoints_convert")


def _modules() -> dict[str, str]:
    out = {}
    for package in PACKAGES:
        for folder, _, files in os.walk(os.path.join(REPO, package)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(folder, f), REPO)[:-3].replace(os.sep, ".")
                    out[rel.removesuffix(".__init__")] = os.path.join(folder, f)
    return out


def _imports(path: str, name: str, modules) -> set[str]:
    """The project modules ``name`` imports (``from a import b`` counts a.b when it is one)."""
    tree = ast.parse(open(path).read())
    package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                       for a in node.names]
        for t in targets:
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def _layer(name: str) -> tuple[int, str]:
    for layer, prefixes in LAYERS:
        for p in prefixes:
            if name == p or name.startswith(p + "."):
                return layer, p
    return 4, name          # m2sa_jax/__init__.py: m2sa_jax.load, an entry point


def test_imports_point_down_and_never_cycle():
    modules = _modules()
    graph = {name: _imports(path, name, modules) for name, path in modules.items()}
    wrong = []
    for name, deps in graph.items():
        layer, group = _layer(name)
        for dep in deps:
            dep_layer, dep_group = _layer(dep)
            if name.startswith("m2sa_jax") and dep.startswith("checkpoints_convert"):
                wrong.append(f"{name} imports {dep} (m2sa_jax never imports the converter CLI)")
            elif dep_layer > layer:
                wrong.append(f"{name} (layer {layer}) imports {dep} (layer {dep_layer})")
            elif layer == 3 and dep_layer == 3 and group != dep_group:
                wrong.append(f"{name} imports {dep} (training and evaluation are siblings)")
            elif layer == 0 and dep_layer == 0 and group != dep_group and \
                    group in ("m2sa_jax.models", "m2sa_jax.data") and \
                    dep_group in ("m2sa_jax.models", "m2sa_jax.data"):
                wrong.append(f"{name} imports {dep} (models and data are independent)")
    assert not wrong, "\n".join(sorted(wrong))

    # cycles: a depth-first search over the whole graph
    state, stack, cycles = {}, [], []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                cycles.append(" → ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    # a package's __init__ re-exporting its own submodules is not a cycle of ideas
    cycles = [c for c in cycles if not all(p.startswith(c.split(" → ")[0]) for p in c.split(" → "))]
    assert not cycles, "\n".join(cycles)


def test_files_hold_one_idea():
    """No module of the package over ~400 lines."""
    long = {name: n for name, path in _modules().items()
            if (n := sum(1 for _ in open(path))) > 420}
    assert not long, long

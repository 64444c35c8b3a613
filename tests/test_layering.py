"""The package's import graph: no cycles, and no imports hidden inside functions to dodge one.

The graph is built from the AST of every module's top-level imports (``if TYPE_CHECKING``
blocks excluded: they never run). An edge ``a -> b`` means importing ``a`` runs ``b``;
``from diffusion_np.x import y`` points at ``diffusion_np.x.y`` when that is a module, at
``diffusion_np.x`` otherwise; importing ``diffusion_np.x.y`` from outside package ``x`` also
runs ``x/__init__.py`` first, so it adds an edge to ``diffusion_np.x`` as well (a package
that re-exports a module above its importers is a cycle too). A function-level import of a
diffusion_np module is allowed only with a comment on its line or the line above saying why
(an optional dependency, a heavy module loaded on first use).
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import diffusion_np

ROOT = Path(diffusion_np.__file__).resolve().parent.parent
PACKAGE = ROOT / "diffusion_np"

def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imported(node: ast.AST) -> list[str]:
    """The diffusion_np modules an import statement runs."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                 for a in node.names]
    else:
        return []
    out = []
    for name in names:
        while name and name not in MODULES:  # `import diffusion_np.x.y` names a module; strip attributes
            name = name.rpartition(".")[0]
        if name.startswith("diffusion_np"):
            out.append(name)
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _top_level_imports(tree: ast.Module):
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and not _is_type_checking(node):
            stack.extend(node.body + node.orelse)
        elif isinstance(node, ast.Try):
            stack.extend(node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body])


def _packages_above(name: str) -> set[str]:
    """The packages whose ``__init__`` runs before module ``name``: a.b.c -> {a, a.b}."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        targets = {m for node in _top_level_imports(tree) for m in _imported(node) if m != name}
        # a package's __init__ runs on the first import of any of its modules; the importer's own
        # packages are already running (or done) by then, so they add no edge
        inits = {p for m in targets for p in _packages_above(m)} - _packages_above(name) - {name}
        graph[name] = targets | inits
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes (first == last), or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_import_graph_is_acyclic():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("name", sorted(m for m in MODULES if not m.endswith("__main__")))  # __main__ runs the CLI
def test_every_module_imports(name):
    importlib.import_module(name)


def test_no_unexplained_function_level_imports():
    found = []
    for name, path in MODULES.items():
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        for fn in ast.walk(ast.parse(text)):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if not isinstance(node, (ast.Import, ast.ImportFrom)) or not _imported(node):
                    continue
                here, above = lines[node.lineno - 1], lines[node.lineno - 2].strip()
                if "#" not in here and not above.startswith("#"):
                    found.append(f"{name}:{node.lineno}: {here.strip()}")
    assert not found, "function-level imports without a comment saying why:\n" + "\n".join(found)


def test_no_sampler_imports_another_sampler():
    """What samplers share lives in samplers/base.py and samplers/timesteps.py (schedule math in
    schedules.py and diffusion.py), so each sampler file reads on its own."""
    shared = {"diffusion_np.samplers", "diffusion_np.samplers.base", "diffusion_np.samplers.timesteps",
              "diffusion_np.samplers.loop"}
    graph = import_graph()
    samplers = [m for m in MODULES if m.startswith("diffusion_np.samplers.") and m not in shared]
    assert len(samplers) >= 9
    found = {m: sorted(t for t in graph[m] if t.startswith("diffusion_np.samplers") and t not in shared)
             for m in samplers}
    assert not any(found.values()), {m: t for m, t in found.items() if t}

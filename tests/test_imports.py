"""The package's import graph, read with `ast`: no cycle among its modules, and production never imports the harness.

Counted: every `import` and `from ... import` that can run, at module level and inside functions (a lazy import
is still a dependency: it only moves the cost to the first call, and a cycle through one is still a cycle).
Not counted: imports under `if TYPE_CHECKING:` (they never run), and the parent packages that Python initialises
before a submodule (a package's __init__ that exposes its submodules would otherwise be in a cycle with each).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "neuron"
HARNESS = "neuron.harness"
# The console script is the one place that wires the harness's commands (`neuron mocknet`, `neuron bench`),
# by imports inside those two commands; nothing that a miner, a validator or the gateway runs imports it.
ENTRY_POINT = "neuron.cli"


def module_name(path: Path, root: Path) -> str:
    parts = ("neuron",) + path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported(tree: ast.AST, name: str, is_package: bool, modules: set[str]) -> set[str]:
    """The package's modules that `tree` (module `name`) imports."""
    out: set[str] = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _type_checking(node):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name if is_package else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}" if base else package
            # `from pkg import sub` imports the submodule pkg.sub; `from mod import name` imports mod.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for t in targets:
            while t and t not in modules:  # `import neuron.x.y` names a module; an attribute path falls back
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    paths = sorted(root.rglob("*.py"))
    modules = {module_name(p, root) for p in paths}
    return {module_name(p, root): imported(ast.parse(p.read_text(), str(p)), module_name(p, root),
                                           p.name == "__init__.py", modules) for p in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path that starts and ends at the same module, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_module_of_the_package_is_in_an_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_production_modules_import_nothing_from_the_harness():
    graph = import_graph()
    offenders = {m: sorted(n for n in deps if n == HARNESS or n.startswith(HARNESS + "."))
                 for m, deps in graph.items()
                 if not (m == HARNESS or m.startswith(HARNESS + ".")) and m != ENTRY_POINT}
    assert not {m: d for m, d in offenders.items() if d}
    # The entry point reaches the harness only from inside its two harness commands.
    tree = ast.parse((ROOT / "cli.py").read_text())
    top = {a.name if isinstance(n, ast.Import) else n.module for n in tree.body
           if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    assert not any(t and t.startswith(HARNESS) for t in top)


def test_the_graph_sees_imports_inside_functions_and_finds_a_cycle(tmp_path):
    """The checks can fail: a cycle made of a module-level import and a function-local one is found."""
    pkg = tmp_path / "neuron"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from neuron.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .. import a\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from neuron import a\n")
    graph = import_graph(pkg)
    assert graph["neuron.a"] == {"neuron.sub.b"} and graph["neuron.sub.b"] == {"neuron.a"}
    assert graph["neuron.c"] == set()  # never runs
    assert find_cycle(graph) == ["neuron.a", "neuron.sub.b", "neuron.a"]
    (pkg / "sub" / "b.py").write_text("def f():\n    return 1\n")
    assert find_cycle(import_graph(pkg)) is None


@pytest.mark.parametrize("module", ["neuron.miner", "neuron.validator.loop", "neuron.gateway.app", "neuron.axon"])
def test_a_production_module_reaches_no_harness_module_at_all(module):
    """Not even through another module: the transitive imports of what a miner, validator or gateway runs."""
    graph = import_graph()
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph.get(m, ()))
    assert not sorted(m for m in seen if m.startswith(HARNESS)), module

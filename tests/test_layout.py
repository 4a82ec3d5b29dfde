"""The package's import graph has no circle.

Every ``import`` anywhere in a module counts: at the top, inside a function, or
under ``if TYPE_CHECKING`` (a circle hidden in a function is still a circle a
reader has to untangle).  import-linter checks the layers; this checks what a
layer contract with a gap could miss.
"""

from __future__ import annotations

import ast
import pathlib
from importlib.machinery import EXTENSION_SUFFIXES

import aiopostcopy

PACKAGE = pathlib.Path(aiopostcopy.__file__).parent


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).parts)
    parts[-1] = parts[-1].split(".")[0]  # foo.py, and foo.cpython-311-x86_64-linux-gnu.so
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: pathlib.Path, modules: set[str]) -> set[str]:
    """The package's modules that ``path`` imports (a name from a package counts as its submodule)."""
    name = _module_name(path)
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    compiled = {_module_name(p) for suffix in EXTENSION_SUFFIXES for p in PACKAGE.rglob(f"*{suffix}")}
    modules = set(paths) | compiled
    return {name: _imports(path, modules) for name, path in paths.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of ``graph`` as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_find_cycle_sees_a_circle_and_a_line() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_walk_sees_imports_inside_functions() -> None:
    graph = import_graph()
    assert "aiopostcopy.tools.demo" in graph["aiopostcopy.cli"]  # imported inside build_parser
    assert "aiopostcopy.errors" in graph["aiopostcopy.messages"]


def test_no_import_circle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_library_does_not_import_the_tools() -> None:
    graph = import_graph()
    library = [m for m in graph if not m.startswith(("aiopostcopy.tools", "aiopostcopy.cli", "aiopostcopy.__main__"))]
    offenders = {m: sorted(t for t in graph[m] if t.startswith("aiopostcopy.tools")) for m in library}
    assert not {m: t for m, t in offenders.items() if t}

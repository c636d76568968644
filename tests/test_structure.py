"""The shape of the package: imports point one way (no cycle), and no module grows long without a reason.

docs/design.md's module map says which way imports go; these tests keep the code to its rules.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "gated"
MAX_LINES = 600
# A module over MAX_LINES says why at the top of its docstring, in a sentence starting with this.
REASON = "Long because"


def _modules() -> dict[str, Path]:
    """Every module of gated by its dotted name ("gated.policy.cm"); a package by its own name."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The gated modules `name` imports when it runs: at the top and inside functions alike.

    Imports under `if TYPE_CHECKING:` only name types for a checker and never run, so they are not
    counted. Modules loaded by a name held in a string (AVAILABLE_BACKENDS, AVAILABLE_READERS) are
    plug-ins picked by the config's `type`, not imports, and are not counted either.
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    type_only = {id(node) for block in ast.walk(tree)
                 if isinstance(block, ast.If) and ast.unparse(block.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
                 for stmt in block.body for node in ast.walk(stmt)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: "from . import x", "from .base import y"
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            # "from gated import config" imports the module gated.config; "from gated.config import X" gated.config.
            found |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names}
    return {m for m in found if m in MODULES and m != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each group of modules that import one another (Tarjan's strongly connected components), as one
    cycle through the group: ["a", "b", "a"]."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_path_around(graph, set(group)) for group in groups]


def _path_around(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """One cycle through a strongly connected group, found breadth-first from its first module back to it."""
    start = min(group)
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & group):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w not in came_from:
                    came_from[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {sorted(group)}")


def test_the_cycle_finder_names_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_walk_sees_imports_inside_functions_not_type_only_ones() -> None:
    # gated.cli imports gated.daemon only inside `gated run`; a walk of the top level alone misses it.
    assert "gated.daemon" in _imports("gated.cli", MODULES["gated.cli"])
    # gated.mqtt names gated.pipeline's Gate only under TYPE_CHECKING.
    assert "gated.pipeline" not in _imports("gated.mqtt", MODULES["gated.mqtt"])


def test_no_import_cycle_among_gateds_modules() -> None:
    graph = {name: _imports(name, path) for name, path in MODULES.items()}
    cycles = [" -> ".join(cycle) for cycle in _cycles(graph)]
    assert not cycles, "import cycles (move what both sides need into a module both import): " + "; ".join(cycles)


def test_imports_point_the_way_docs_design_says() -> None:
    graph = {name: _imports(name, path) for name, path in MODULES.items()}
    importers = {m: {n for n, found in graph.items() if m in found} for m in MODULES}
    assert graph["gated.model"] == graph["gated.errors"] == set()
    assert graph["gated.tokens"] <= {"gated.logs"}
    assert not any(m.startswith("gated.policy") for m in importers["gated.drivers.gpio"])
    assert importers["gated.cli"] == {"gated.__main__"}
    assert importers["gated.daemon"] <= {"gated.__main__", "gated.cli"}


def test_the_module_map_of_docs_design_names_every_module() -> None:
    text = (PACKAGE.parent / "docs" / "design.md").read_text()
    section = text.split("## Module map", 1)[1].split("\n## ", 1)[0]
    rows = {row.split("|")[1]: row for row in section.splitlines() if row.startswith("| `gated/")}
    missing = []
    for path in MODULES.values():
        where = path.relative_to(PACKAGE.parent)
        if len(where.parts) == 2:  # gated/NAME.py: named in the first column
            if path.stem not in ("__init__", "__main__") and f"`{where}`" not in "".join(rows):
                missing.append(str(where))
        elif where.parts[1] in ("policy", "store") and path.stem != "__init__":  # rows that name their files
            row = next(r for first, r in rows.items() if f"`gated/{where.parts[1]}/`" in first)
            if not re.search(rf"`{path.stem}(\.py|`|\.)", row):
                missing.append(str(where))
    assert not missing, f"docs/design.md's module map does not name {missing}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_a_long_module_says_why_at_its_top(name: str) -> None:
    path = MODULES[name]
    where = str(path.relative_to(PACKAGE.parent))
    lines = len(path.read_text().splitlines())
    if lines <= MAX_LINES:
        return
    docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert REASON in docstring, (f"{where} has {lines} lines (over {MAX_LINES}): split it by job, or say why "
                                 f'it stays whole in its docstring, in a sentence starting "{REASON}".')

"""The package's import graph has no cycles, counting imports inside functions and under
``TYPE_CHECKING``: a cycle is two modules that cannot be understood (or split) apart."""

from __future__ import annotations

import ast
from pathlib import Path

import rankwise

PACKAGE = Path(rankwise.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Every rankwise module ``path`` imports, wherever the import statement stands."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}".rstrip(".")
            for a in node.names:  # `from pkg import module` imports the module
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, modules) for p in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that returns to its start, or None.

    >>> find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}})
    ['a', 'b', 'c', 'a']
    >>> find_cycle({"a": {"b"}, "b": set()}) is None
    True
    """
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_no_import_cycles():
    graph = import_graph()
    graph.pop("rankwise", None)  # the package root re-exports the API: nothing imports it back
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_graph_sees_function_level_imports():
    """The check is only as good as its graph: an import inside a function is an edge."""
    graph = import_graph()
    assert "rankwise.analysis.estimate" in graph["rankwise.run.runner"]


# The floors, lowest first. A package may import only packages on lower floors: storage sits
# under everything that trains, the study orchestrates from the top, and the packages that
# share a floor (the executor, the reports, the stages) do not import one another, so the
# study wires them together (reports observe through the callbacks it hands the runner).
FLOORS = [
    {"errors", "records"},
    {"core"},  # the torch-free ask/tell search core
    {"config"},
    {"storage"},  # the run directory and its SQLite store
    {"io"},
    {"training"},
    {"analysis"},
    {"run", "report", "stages"},
    {"study", "testing"},
    {"cli"},
]


def package_of(module: str) -> str:
    """``rankwise.core.criteria`` -> ``core``; ``rankwise.cli`` -> ``cli``."""
    return module.split(".")[1]


def floor_of(package: str) -> int:
    return next(i for i, floor in enumerate(FLOORS) if package in floor)


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import of a package on the same floor or a higher one, as ``a -> b``.

    >>> upward_imports({"rankwise.io.data": {"rankwise.storage.rundir"}})
    []
    >>> upward_imports({"rankwise.storage.rundir": {"rankwise.io.data"}})
    ['rankwise.storage.rundir -> rankwise.io.data']
    >>> upward_imports({"rankwise.report.view": {"rankwise.run.runner"}})
    ['rankwise.report.view -> rankwise.run.runner']
    """
    bad = []
    for module, targets in sorted(graph.items()):
        here = package_of(module)
        for target in sorted(targets):
            there = package_of(target)
            if there != here and floor_of(there) >= floor_of(here):
                bad.append(f"{module} -> {target}")
    return bad


def test_every_package_has_a_floor():
    packages = {package_of(m) for m in import_graph() if m != "rankwise"}
    assert packages == set().union(*FLOORS), packages ^ set().union(*FLOORS)


def test_no_package_imports_upward_or_sideways():
    graph = import_graph()
    graph.pop("rankwise", None)
    assert upward_imports(graph) == [], "\n".join(upward_imports(graph))

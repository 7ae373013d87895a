"""Imports run downwards only: cli → report → train, convert → publish → source, arch, outdir, errors; no import
cycle anywhere in the package; no module imports a private (`_name`) of another."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "upcycle"
FLOOR = {"api": 4, "report": 3, "train": 2, "convert": 2, "publish": 1}  # anything else at the top level: floor 0


def _floor(module: str) -> int:
    return FLOOR.get(module.split(".")[0], 0)


def _imports(path: Path, runtime_only: bool = False) -> set[str]:
    """Modules of upcycle that PATH imports, relative to the package (e.g. 'report.routing'); with runtime_only,
    not those imported for type checking only."""
    here = path.relative_to(PACKAGE).with_suffix("").parts[:-1]
    found = set()
    for node in _runtime_nodes(path) if runtime_only else ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(here[: len(here) - node.level + 1])
                found.add(".".join(base + ([node.module] if node.module else [])))
            elif node.module and node.module.startswith("upcycle."):
                found.add(node.module.removeprefix("upcycle."))
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("upcycle.") for a in node.names if a.name.startswith("upcycle.")}
    return {m for m in found if m}


def test_imports_only_run_downwards():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "__init__.py":  # the package's front door re-exports the public names
            continue
        own = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        for module in _imports(path):
            top = module.split(".")[0]
            if top != own and _floor(module) >= _floor(own) and _floor(module) > 0:
                wrong.append(f"{path.relative_to(PACKAGE)} imports {module}")
    assert wrong == []


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _graph() -> dict[str, set[str]]:
    """module -> the modules of upcycle it imports at run time (top-level and late imports alike, not those under
    `if TYPE_CHECKING:`), packages as their __init__."""
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py") if _module_name(p)}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        found = set()
        for module in _imports(path, runtime_only=True) | _submodules(path, paths):
            while module and module not in paths:  # `from .x import name`: the module x
                module = module.rpartition(".")[0]
            if module and module != name:
                found.add(module)
        graph[name] = found
    return graph


def _runtime_nodes(path: Path) -> list[ast.AST]:
    """The nodes of PATH outside `if TYPE_CHECKING:` blocks: type-only imports make no import cycle at run time."""
    tree = ast.parse(path.read_text())
    typing_only = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
        for stmt in node.body
        for n in ast.walk(stmt)
    }
    return [n for n in ast.walk(tree) if id(n) not in typing_only]


def _submodules(path: Path, known: dict[str, Path]) -> set[str]:
    """Modules imported by name from their package (`from ..convert import methods`: convert.methods)."""
    found = set()
    for node in _runtime_nodes(path):
        if isinstance(node, ast.ImportFrom):
            for package in _imports_of(node, path):
                names = {".".join(filter(None, (package, a.name))) for a in node.names}
                found |= names & known.keys()
    return found


def _imports_of(node: ast.ImportFrom, path: Path) -> set[str]:
    here = path.relative_to(PACKAGE).with_suffix("").parts[:-1]
    if node.level:
        return {".".join(list(here[: len(here) - node.level + 1]) + ([node.module] if node.module else []))}
    if node.module and node.module.startswith("upcycle."):
        return {node.module.removeprefix("upcycle.")}
    return {""} if node.module == "upcycle" else set()


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    """No module imports, however late, a module that imports it back (through any chain) within a package."""
    graph = _graph()
    cycles = []
    for component in _cycles(graph):
        packages = {m.rpartition(".")[0] for m in component}
        cycles.append(f"{' <-> '.join(component)} (packages {sorted(packages)})")
    assert cycles == []


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_a_private_name_of_another():
    """`from .x import _name` reaches into another module's internals: make the name public or move the code."""
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            ours = node.level > 0 or (node.module or "").split(".")[0] == "upcycle"
            private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
            if ours and private:
                wrong.append(f"{path.relative_to(PACKAGE)} imports {', '.join(private)} from {node.module or '.'}")
    assert wrong == []

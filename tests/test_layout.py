"""Imports run downwards only: cli → report → train, convert → publish → source, arch, outdir, errors."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "upcycle"
FLOOR = {"api": 4, "report": 3, "train": 2, "convert": 2, "publish": 1}  # anything else at the top level: floor 0


def _floor(module: str) -> int:
    return FLOOR.get(module.split(".")[0], 0)


def _imports(path: Path) -> set[str]:
    """Modules of upcycle that PATH imports, relative to the package (e.g. 'report.routing')."""
    here = path.relative_to(PACKAGE).with_suffix("").parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
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

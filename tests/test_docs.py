"""The README and docs/: links resolve, the README stays an entry point, its generated parts stay generated,
and CI still finds its test command in the Quick start."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
PAGES += [ROOT / "benchmarks" / "gpu" / "README.md"]
MAX_README_LINES = 250

FENCE = re.compile(r"^(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def links(path: Path) -> list[str]:
    """Link targets of a Markdown file, outside code blocks and inline code."""
    found = []
    for line in prose_lines(path.read_text()):
        line = re.sub(r"`[^`]*`", "", line)
        found += LINK.findall(line)
    return found


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text, lower-cased, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading counts by its text
    text = text.replace("*", "").replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    for line in prose_lines(path.read_text()):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            seen.setdefault(base if n == 0 else f"{base}-{n}", 1)
    return set(seen)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with that anchor in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_slug_follows_github():
    assert slug("`upcycle_vs_dense.py`: does upcycling pay, against training the dense model on?") == (
        "upcycle_vs_densepy-does-upcycling-pay-against-training-the-dense-model-on"
    )
    assert slug("Memory plan: `--dry-run`") == "memory-plan---dry-run"
    assert slug("RUN_DIR (`upcycle train`)") == "run_dir-upcycle-train"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in links(README) if t.startswith("docs/")}
    pages = {p.resolve() for p in (ROOT / "docs").glob("*.md")}
    assert pages - linked == set(), f"docs pages the README does not link: {sorted(p.name for p in pages - linked)}"


def test_readme_is_an_entry_point():
    lines = README.read_text().count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move reference material to docs/"


def test_readme_family_table_is_generated(capsys):
    from upcycle_cli.main import run

    assert run(["inspect", "--families", "--markdown"]) == 0
    printed = capsys.readouterr().out.strip()
    m = re.search(r"<!-- families:[^\n]*-->\n(.*?)\n<!-- /families -->", README.read_text(), re.S)
    assert m, "README.md has lost its <!-- families: ... --> and <!-- /families --> markers"
    assert m.group(1).strip() == printed, (
        "README's family table is stale: paste `upcycle inspect --families --markdown`"
    )


def quick_start_commands(text: str) -> list[str]:
    """As .ci/run reads the README: the first fenced block after a "Quick start" heading, its non-empty
    lines that are not comments."""
    commands, started, inside = [], False, False
    for line in text.splitlines():
        if re.match(r"^#+ .*[Qq]uick ?[Ss]tart", line):
            started = True
            continue
        if started and line.startswith("```"):
            if inside:
                break
            inside = True
            continue
        if started and inside and line.split() and not line.split()[0].startswith("#"):
            commands.append(line)
    return commands


def test_quick_start_yields_the_ci_test_command():
    commands = quick_start_commands(README.read_text())
    assert len(commands) == 2, f"the Quick start block should hold two commands, not {len(commands)}"
    install, test = commands
    assert "pip install" in install and "upcycle convert" in install and "upcycle verify" in install
    assert "ruff check ." in test and "python -m pytest" in test, f"CI would run {test!r} as the test command"


@pytest.mark.skipif(shutil.which("awk") is None, reason="needs awk")
def test_ci_script_extracts_the_same_command():
    script = re.search(r"awk '\n(.*?)\n' README\.md", (ROOT / ".ci" / "run").read_text(), re.S)
    assert script, ".ci/run no longer extracts the command with awk; update quick_start_commands"
    out = subprocess.run(["awk", script.group(1), str(README)], capture_output=True, text=True, check=True).stdout
    assert out.rstrip("\n") == quick_start_commands(README.read_text())[1]

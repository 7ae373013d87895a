"""`--expert-prompts FILE`: the prompts that define each expert for `--router-init hidden`.

The file is YAML (so JSON too): a list with one entry per router row, each a non-empty list of non-empty
strings, e.g.

    - ["def add(a, b):", "import numpy as np"]          # expert 0: code
    - ["The Senate passed the bill on Tuesday."]         # expert 1: news

One entry per expert; with --init fine-grained one per replica (N / G entries), since the G parts of a replica
share one router row. With S `--expert-from` models, one entry per source is enough: it stands for each of
that source's experts (rows N / S at a time).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UpcycleError


def read_expert_prompts(path: Path, rows: int, what: str, sources: int = 0) -> list[list[str]]:
    """The prompts of each of `rows` router rows; `what` says what a row is, for the error message. With
    `sources` (--expert-from models), a list of one entry per source is repeated for each of its rows."""
    import yaml

    name = f"--expert-prompts {path.name}"
    if not path.is_file():
        raise UpcycleError(f"{name}: no such file; give a YAML list with one list of prompts per expert")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UpcycleError(f"{name} is not UTF-8 text; give a YAML list of prompt lists") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise UpcycleError(f"{name} is not valid YAML{line}; give a list with one list of prompts per expert") from None
    if not isinstance(data, list) or not all(isinstance(entry, list) for entry in data):
        raise UpcycleError(f"{name} must be a YAML list with one list of prompts (strings) per expert")
    if sources and len(data) == sources and len(data) != rows and rows % sources == 0:
        data = [entry for entry in data for _ in range(rows // sources)]  # one source's entry for each of its rows
    if len(data) != rows:
        per_source = f" (or one per --expert-from model: {sources})" if sources else ""
        raise UpcycleError(
            f"{name} lists prompts for {len(data)} experts, but the router has {rows} {what}{per_source}"
        )
    for e, entry in enumerate(data):
        if not entry:
            raise UpcycleError(f"{name}: expert {e} has no prompts; give at least one")
        for p in entry:
            if not isinstance(p, str) or not p.strip():
                raise UpcycleError(f"{name}: expert {e} has a prompt that is not a non-empty string: {p!r:.40}")
    return data


def prompts_by_source(path: Path, sources: int) -> list[list[str]]:
    """Each --expert-from model's prompts (all of its experts' entries, in order), for upcycle.json and the card;
    the file was checked when the routers were made."""
    import yaml

    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    per = len(data) // sources
    return [list(dict.fromkeys(p for entry in data[i * per : (i + 1) * per] for p in entry)) for i in range(sources)]

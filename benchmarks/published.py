"""How a benchmark names a path in the results it commits: never as a local path (the results are published)."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository


def public_path(arg: str | os.PathLike[str]) -> str:
    """ARG as a committed results file may hold it: a path inside the repository relative to it, any other path
    (absolute, or one that exists) by its last part only (upcycle.source.public_name's rule), and anything else
    (a flag, a number, a Hub id) as given."""
    text = os.fspath(arg)
    if not (os.path.isabs(text) or os.path.exists(text)):
        return text
    path = Path(os.path.abspath(text))
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name

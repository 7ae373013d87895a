"""Rows of the training data that are not documents: counted while reading, and a bad one located in its file.

A row is *bad* when it has no text field or the field is null (a `.jsonl` row without the key reads as null): it is
refused unless `--skip-bad-rows` says to leave such rows out. A row whose text is empty or whitespace only is not
bad, just no document; both kinds are counted and reported.

Where a bad row is: datasets reads the files of a group in order and numbers their rows across them, so the row
number is turned back into a file and a line (JSON lines: datasets skips blank lines, so row r is the r-th
non-blank line) or a row within the file (a JSON array, parquet). This reads the files up to that row once, on the
refusal path only.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


@dataclass
class RowCounts:
    """Rows read that gave no document, counted while reading (mutable: it is the counter)."""

    empty: int = 0  # empty or whitespace-only text
    bad: int = 0  # no text field, or a null one (left out with --skip-bad-rows)
    first_bad: str | None = None  # where the first bad row is, e.g. "--data: corpus.jsonl line 7"


def bad_row_message(where: str, field: str) -> str:
    return (
        f"{where} has no {field!r} field (or it is null); fix that row, pick another field with --text-field, "
        "or pass --skip-bad-rows to leave such rows out"
    )


def locate_row(builder: str, files: list[Path], index: int) -> str:
    """Where row INDEX (0-based, counted over FILES in order as datasets' BUILDER reads them) is: "NAME line N" for
    JSON lines, "NAME row N" for a JSON array or parquet."""
    left = index
    for path in files:
        if builder == "parquet":
            import pyarrow.parquet as pq

            n = pq.ParquetFile(path).metadata.num_rows
            if left < n:
                return f"{path.name} row {left + 1}"
            left -= n
            continue
        with _open_text(path) as f:
            if _is_array(f):
                rows = json.load(f)
                if left < len(rows):
                    return f"{path.name} row {left + 1}"
                left -= len(rows)
                continue
            for number in _numbered_rows(f):
                if left == 0:
                    return f"{path.name} line {number}"
                left -= 1
    return f"row {index + 1} of {', '.join(p.name for p in files)}"  # not found: the files changed meanwhile


def _open_text(path: Path) -> IO[str]:
    opener = OPENERS.get(path.suffix.lower())
    if opener is not None:
        return opener(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _is_array(f: IO[str]) -> bool:
    """Whether the JSON file starts with "[" (a JSON array of rows); the file is left at its start."""
    while True:
        char = f.read(1)
        if not char or not char.isspace():
            f.seek(0)
            return char == "["


def _numbered_rows(f: IO[str]) -> Iterator[int]:
    """The line number of each non-blank line: the rows of a JSON lines file as datasets reads them."""
    for number, line in enumerate(f, start=1):
        if line.strip():
            yield number

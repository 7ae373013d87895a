"""The benchmarks' recorded results are published with the repository: no local path may be in them (a work
folder is written as <work>, a temporary one as <tmp>, the home folder as ~, the repository's paths relative to it)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
LOCAL = re.compile(r"(?<![\w.<>~])/(root|work|home|tmp|Users)/")


@pytest.mark.parametrize("path", sorted(RESULTS.glob("*.json")), ids=lambda p: p.name)
def test_recorded_results_hold_no_local_path(path):
    text = path.read_text()
    json.loads(text)  # and it is JSON
    assert not LOCAL.search(text), [m.group(0) for m in LOCAL.finditer(text)][:3]

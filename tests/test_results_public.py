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


def test_public_path_names_no_local_folder(tmp_path, monkeypatch):
    """benchmarks/published.py, the one rule the benchmarks' recorded flags and commands go through."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("published", RESULTS.parent / "published.py")
    published = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(published)
    repo = RESULTS.parent.parent
    assert published.public_path(repo / "configs" / "x.yaml") == "configs/x.yaml"  # inside the repository
    assert published.public_path(str(tmp_path / "calib.txt")) == "calib.txt"  # elsewhere: the last part only
    (tmp_path / "here.txt").write_text("x")
    monkeypatch.chdir(tmp_path)
    assert published.public_path("here.txt") == "here.txt"  # an existing relative path, outside: its name
    for arg in ("--router-init", "kmeans", "8", "HuggingFaceTB/SmolLM2-135M"):  # not paths: as given
        assert published.public_path(arg) == arg
    assert not LOCAL.search(published.public_path("/home/someone/model"))

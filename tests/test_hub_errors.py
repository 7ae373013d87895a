"""A Hub id that cannot be fetched: one true line, at once, whether offline mode is set or the Hub is down."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# huggingface_hub retries an unreachable Hub for about 23 s (1+2+4+8+8 s of back-off); a run that ends well
# before that did not go through those retries.
BELOW_RETRIES_S = 20


def _run(argv: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    base |= {"HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_CACHE": str(tmp_path / "hub-cache")} | env
    return subprocess.run(
        [sys.executable, "-m", "upcycle_cli.main", *argv],
        env=base,
        capture_output=True,
        text=True,
        timeout=BELOW_RETRIES_S,
        cwd=tmp_path,
    )


@pytest.mark.parametrize("command", ["convert", "inspect"])
def test_unreachable_hub(tmp_path, command):
    argv = ["convert", "some-org/some-model", "out"] if command == "convert" else ["inspect", "some-org/some-model"]
    proc = _run(argv, tmp_path, HF_ENDPOINT="http://127.0.0.1:9")  # nothing listens on port 9 (discard)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr  # no retry notices from huggingface_hub
    line = lines[0]
    assert line.startswith("error: some-org/some-model") and "cannot be reached" in line
    assert "http://127.0.0.1:9" in line and "HF_HUB_OFFLINE=1" in line
    assert "unset HF_HUB_OFFLINE" not in line  # it was never set
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["convert", "inspect"])
def test_offline_and_not_cached(tmp_path, command):
    argv = ["convert", "some-org/some-model", "out"] if command == "convert" else ["inspect", "some-org/some-model"]
    proc = _run(argv, tmp_path, HF_HUB_OFFLINE="1")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert "not in the Hub cache" in lines[0] and str(tmp_path / "hub-cache") in lines[0]
    assert "HF_HUB_OFFLINE is set" in lines[0] and "cannot be reached" not in lines[0]

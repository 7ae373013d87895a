"""Every source tensor is accounted for, OUT never lies inside the source, and the MoE config is explicit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_bad_input import assert_clean, expect_error

from upcycle_cli.main import run


def _edit_config(src: Path, **changes) -> None:
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(changes)
    (src / "config.json").write_text(json.dumps(cfg))


def _edit_weights(src: Path, add: dict[str, torch.Tensor] | None = None, drop: tuple[str, ...] = ()) -> None:
    """Add tensors to the last shard and drop tensors from any shard, keeping the index consistent."""
    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    for shard in shards:
        tensors = load_file(src / shard)
        for name in drop:
            if tensors.pop(name, None) is not None:
                del index["weight_map"][name]
        if shard == shards[-1]:
            tensors |= add or {}
            index["weight_map"] |= {name: shard for name in add or {}}
        save_file(tensors, src / shard, metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))


@pytest.fixture
def out(tmp_path) -> Path:
    return tmp_path / "out"


@pytest.mark.parametrize("dry_run", [False, True], ids=["convert", "dry-run"])
def test_config_with_fewer_layers_than_the_weights(capsys, dense, out, dry_run):
    src = dense("llama")  # 4 layers in the weights
    _edit_config(src, num_hidden_layers=2)
    line = expect_error(capsys, ["convert", src, out, *(["--dry-run"] if dry_run else [])], "model.layers.2.")
    assert "num_hidden_layers=2" in line and "disagree" in line and "layers up to 3" in line
    assert_clean(out)


def test_unknown_tensor_is_named(capsys, dense, out):
    src = dense("qwen2")
    _edit_weights(src, add={"model.layers.1.mlp.extra_proj.weight": torch.ones(4, 32)})
    line = expect_error(capsys, ["convert", src, out], "model.layers.1.mlp.extra_proj.weight")
    assert "disagree" in line
    assert_clean(out)


def test_missing_tensor_is_named(capsys, dense, out):
    src = dense("llama")
    _edit_weights(src, drop=("model.layers.2.self_attn.k_proj.weight",))
    line = expect_error(capsys, ["convert", src, out], "model.layers.2.self_attn.k_proj.weight")
    assert "no tensor" in line
    assert_clean(out)


def test_config_that_wants_biases_the_weights_lack(capsys, dense, out):
    src = dense("qwen3")  # Qwen3 with attention_bias=True expects q/k/v/o biases the weights do not have
    _edit_config(src, attention_bias=True)
    line = expect_error(capsys, ["convert", src, out], "no tensor model.layers.0.self_attn.")
    assert ".bias (and 15 more)" in line  # q, k, v, o biases of 4 layers
    assert_clean(out)


def test_rotary_buffers_are_left_out_with_a_note(capsys, dense, out):
    src = dense("llama")
    buffers = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.rand(4) for i in range(4)}
    _edit_weights(src, add=buffers)
    capsys.readouterr()
    assert run(["convert", str(src), str(out), "--experts", "2"]) == 0
    err = capsys.readouterr().err
    assert "note: left out model.layers.0.self_attn.rotary_emb.inv_freq (and 3 more)" in err
    written = set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"])
    assert not any("inv_freq" in name for name in written)
    assert "model.layers.3.self_attn.q_proj.weight" in written


def test_tied_head_may_be_present_or_absent(tmp_path):
    """A tied lm_head is optional: checkpoints that store it and checkpoints that do not both convert."""
    from tiny import make_dense

    from upcycle.convert.pipeline import convert
    from upcycle.convert.spec import build_spec

    src = make_dense(tmp_path / "tied", "llama", tie_word_embeddings=True)
    names = set(json.loads((src / "model.safetensors.index.json").read_text())["weight_map"])
    assert "lm_head.weight" not in names
    convert(str(src), tmp_path / "a", build_spec(experts=2))
    embed = load_file(
        src / json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]["model.embed_tokens.weight"]
    )["model.embed_tokens.weight"]
    _edit_weights(src, add={"lm_head.weight": embed.clone()})
    result = convert(str(src), tmp_path / "b", build_spec(experts=2))
    assert "lm_head.weight" in {op.name for op in result.plan.ops}


# --- OUT inside SRC ------------------------------------------------------------------------------------------


def test_out_inside_the_source_is_refused_before_any_work(capsys, monkeypatch, dense):
    import upcycle.convert.pipeline as pipeline

    def no_work(*args, **kwargs):
        raise AssertionError("the source was read before OUT was checked")

    monkeypatch.setattr(pipeline, "resolve", no_work)
    src = dense("llama")
    before = sorted(p.name for p in src.iterdir())
    for out in (src / "moe", src / "deeper" / "moe"):
        line = expect_error(capsys, ["convert", src, out], "inside the source")
        assert "choose an out outside it" in line.lower()
        expect_error(capsys, ["convert", src, out, "--force", "--dry-run"], "inside the source")
    assert sorted(p.name for p in src.iterdir()) == before


def test_out_inside_a_hub_snapshot_is_refused(dense_store, tmp_path, monkeypatch):
    """Resolved sources (here a Hub cache snapshot given by repo id) are checked again once known."""
    import huggingface_hub.constants as hub_constants
    from test_hub import populate_cache

    from upcycle.convert.pipeline import convert
    from upcycle.convert.spec import build_spec
    from upcycle.errors import UpcycleError

    cache = tmp_path / "hub"
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    snapshot = populate_cache(cache, "tiny-org/tiny", dense_store("llama"))
    with pytest.raises(UpcycleError, match="inside the source"):
        convert("tiny-org/tiny", snapshot / "moe", build_spec(experts=2))
    assert not (snapshot / "moe").exists()


# --- router_aux_loss_coef ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family, flags, target",
    [("llama", {}, "mixtral"), ("llama", {"every": 2}, "qwen2_moe"), ("qwen3", {}, "qwen3_moe")],
)
def test_router_aux_loss_coef_is_written(dense_store, tmp_path, family, flags, target):
    from transformers import AutoConfig

    from upcycle.convert.pipeline import convert
    from upcycle.convert.spec import build_spec

    out = tmp_path / "moe"
    result = convert(str(dense_store(family)), out, build_spec(experts=2, **flags))
    assert result.plan.target == target
    recipe = json.loads((out / "upcycle.json").read_text())
    written = json.loads((out / "config.json").read_text())
    default = type(AutoConfig.for_model(written["model_type"]))().router_aux_loss_coef
    assert recipe["config"]["router_aux_loss_coef"] == written["router_aux_loss_coef"] == default == 0.001

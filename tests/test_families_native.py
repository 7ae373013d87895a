"""Phi-3 and Gemma (v1) as dense sources: fused tensors read as row views, Gemma's norms, embedding scale and
tied head rewritten. Tiny random models with the real quirks (longrope past original_max_position_embeddings,
sliding window, head_dim ≠ hidden/heads, tied embeddings) convert, reload with plain transformers and match
the dense logits; `verify` passes whole and layer by layer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from test_bad_input import assert_clean, expect_error
from tiny import make_dense

from upcycle.convert.pipeline import convert, plan_for
from upcycle.convert.spec import build_spec
from upcycle.report.verify import verify
from upcycle.source import Checkpoint, resolve

ORIGINAL = 32  # longrope's original_max_position_embeddings; the test sequence (80 tokens) goes past it
LONGROPE = dict(
    max_position_embeddings=128,
    original_max_position_embeddings=ORIGINAL,
    rope_parameters={
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "short_factor": [1.0, 1.1, 1.3, 1.6],
        "long_factor": [1.5, 2.5, 4.0, 6.0],
        "original_max_position_embeddings": ORIGINAL,
    },
)
SOURCES = {
    "phi3-longrope": ("phi3", LONGROPE),
    "phi3-sliding": ("phi3", dict(sliding_window=8)),
    "gemma": ("gemma", {}),
}
CASES = [(name, every) for name in SOURCES for every in (1, 2)]  # --every 1 -> mixtral, 2 -> qwen2_moe
TOKENS = 80


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("native")
    made: dict[str, Path] = {}

    def get(name: str, dtype=torch.float32) -> Path:
        key = f"{name}-{dtype}"
        if key not in made:
            family, overrides = SOURCES[name]
            made[key] = make_dense(root / key, family, dtype=dtype, **overrides)
        return made[key]

    return get


def _logits(folder: Path, ids, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, output_loading_info=True)
    with torch.no_grad():
        return model.eval()(ids).logits, info


def _ids(vocab: int = 128):
    return torch.randint(0, vocab, (1, TOKENS), generator=torch.Generator().manual_seed(1))


@pytest.mark.slow
@pytest.mark.parametrize(("name", "every"), CASES, ids=[f"{n}-every{e}" for n, e in CASES])
def test_clone_exact_after_reload_and_verified(name, every, sources, tmp_path):
    src, out = sources(name), tmp_path / "moe"
    result = convert(str(src), out, build_spec(experts=4, top_k=2, every=every))
    assert result.plan.target == ("mixtral" if every == 1 else "qwen2_moe")
    assert result.plan.exact
    ids = _ids()
    dense, _ = _logits(src, ids)
    moe, info = _logits(out, ids)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert (dense - moe).abs().max().item() <= 1e-5
    for mode in ("whole", "layerwise"):
        report = verify(str(src), str(out), tokens=TOKENS, mode=mode)
        assert report.passed and report.max_abs_diff <= 1e-5, (mode, report.max_abs_diff)
    assert report.tensor_check.passed and report.tensor_check.equal == report.tensor_check.compared > 0


def test_longrope_config_carried_and_used(sources, tmp_path):
    """The long factors matter past original_max_position_embeddings, and the MoE keeps them."""
    src, out = sources("phi3-longrope"), tmp_path / "moe"
    convert(str(src), out, build_spec(experts=2, top_k=1, every=1))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_parameters"]["rope_type"] == "longrope"
    assert cfg["rope_parameters"]["long_factor"] == LONGROPE["rope_parameters"]["long_factor"]
    assert cfg["rope_parameters"]["original_max_position_embeddings"] == ORIGINAL
    ids = _ids()
    moe, _ = _logits(out, ids)
    short, _ = _logits(out, ids[:, :ORIGINAL])  # below the original length the short factors apply
    assert (moe[:, :ORIGINAL] - short).abs().max().item() > 1e-3  # so the long path really ran
    dense, _ = _logits(src, ids)
    assert (dense - moe).abs().max().item() <= 1e-5


def test_views_are_row_ranges_of_the_fused_tensors(sources):
    src = sources("phi3-sliding")
    dense, plan = plan_for(resolve(str(src)), build_spec(experts=2, top_k=1, every=2))
    ckpt, cfg = dense.checkpoint, dense.config
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    q_rows, kv_rows = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim
    with safe_open(ckpt.tensors["model.layers.1.self_attn.qkv_proj.weight"].file, framework="pt") as fh:
        qkv = fh.get_tensor("model.layers.1.self_attn.qkv_proj.weight")
    assert torch.equal(ckpt.load("model.layers.1.self_attn.q_proj.weight"), qkv[:q_rows])
    assert torch.equal(ckpt.load("model.layers.1.self_attn.k_proj.weight"), qkv[q_rows : q_rows + kv_rows])
    assert torch.equal(ckpt.load("model.layers.1.self_attn.v_proj.weight"), qkv[q_rows + kv_rows :])
    with safe_open(ckpt.tensors["model.layers.0.mlp.gate_up_proj.weight"].file, framework="pt") as fh:
        gate_up = fh.get_tensor("model.layers.0.mlp.gate_up_proj.weight")
    gate, up = gate_up.chunk(2)  # Phi3MLP's own split
    assert torch.equal(ckpt.load("model.layers.0.mlp.gate_proj.weight"), gate)
    assert torch.equal(ckpt.load("model.layers.0.mlp.up_proj.weight"), up)
    # the plan copies views (a byte range each: no Python-side compute); the fused keys are not written
    names = {op.name: op for op in plan.ops}
    assert names["model.layers.0.self_attn.q_proj.weight"].kind == "copy"
    assert names["model.layers.0.mlp.gate_proj.weight"].kind == "copy"  # layer 0 stays dense with --every 2
    assert not any("qkv_proj" in n or "gate_up_proj" in n for n in names)
    assert plan.dense_params == sum(math.prod(t.shape) for t in Checkpoint.open(src).tensors.values())


@pytest.mark.slow
def test_split_and_drop_read_the_views(sources, tmp_path):
    src = sources("phi3-longrope")
    exact = tmp_path / "split"
    convert(str(src), exact, build_spec(init="split", experts=4, top_k=4, router_init="zero", every=1))
    report = verify(str(src), str(exact), tokens=TOKENS, mode="layerwise")
    assert report.passed and report.max_abs_diff <= 1e-5
    assert report.tensor_check.computed > 0 and report.tensor_check.passed
    dropped = tmp_path / "drop"
    convert(str(src), dropped, build_spec(init="drop", experts=4, top_k=2, every=2))
    report = verify(str(src), str(dropped), tokens=TOKENS, mode="layerwise")
    assert report.tensor_check.passed and report.tensor_check.computed > 0  # each computed expert recomputed equal
    assert report.plan_exact is False and report.max_abs_diff > 1e-3  # drop re-initialises neurons, as planned


def test_gemma_tensors_and_config(sources, tmp_path):
    src, out = sources("gemma"), tmp_path / "moe"
    result = convert(str(src), out, build_spec(experts=2, top_k=1, every=1))
    dense_cfg = json.loads((src / "config.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    assert dense_cfg["tie_word_embeddings"] is True and cfg["tie_word_embeddings"] is False
    assert cfg["hidden_act"] == "gelu_pytorch_tanh" and cfg["head_dim"] == 16 != cfg["hidden_size"] // 4
    dense, moe = Checkpoint.open(src), Checkpoint.open(out)
    assert "lm_head.weight" not in dense.tensors
    emb = dense.load("model.embed_tokens.weight")
    scale = torch.tensor(32**0.5, dtype=torch.float32)  # GemmaTextScaledWordEmbedding's embed_scale
    assert torch.equal(moe.load("lm_head.weight"), emb)  # the head keeps the unscaled embeddings
    assert torch.equal(moe.load("model.embed_tokens.weight"), emb * scale)
    for key in ("model.norm.weight", "model.layers.2.input_layernorm.weight"):
        assert torch.equal(moe.load(key), 1.0 + dense.load(key))
    vocab, hidden = emb.shape
    assert result.plan.total_params - result.plan.dense_params > vocab * hidden  # the untied head counts
    assert any(f"+{vocab * hidden:,} parameters" in n and "lm_head.weight" in n for n in result.plan.notes)
    table = {row["name"]: row for row in result.plan.op_table()}  # what --dry-run --json lists
    assert table["model.norm.weight"]["values"] == ["add", 1.0, "float32"]
    assert table["model.embed_tokens.weight"]["values"] == ["mul", float(scale), "weight"]
    assert "values" not in table["lm_head.weight"] and table["lm_head.weight"]["src"] == "lm_head.weight"


def test_gemma_legacy_gelu_becomes_tanh(tmp_path):
    """Gemma v1 checkpoints say hidden_act="gelu" but mean the tanh approximation; transformers maps it, and
    the MoE config names the function the dense model really ran."""
    src = make_dense(tmp_path / "g", "gemma", hidden_act="gelu")
    raw = json.loads((src / "config.json").read_text())
    raw["hidden_act"] = "gelu"
    (src / "config.json").write_text(json.dumps(raw))
    _, plan = plan_for(resolve(str(src)), build_spec(experts=2, top_k=1))
    assert plan.config["hidden_act"] == "gelu_pytorch_tanh"


@pytest.mark.slow
def test_gemma_bf16_is_close_not_exact_and_says_so(sources, tmp_path):
    src = sources("gemma", torch.bfloat16)
    out = tmp_path / "bf16"
    plan = convert(str(src), out, build_spec(experts=4, top_k=2, every=1)).plan
    assert not plan.exact and "rounded to BF16" in plan.exact_text
    assert any(n.startswith("not exact:") for n in plan.notes)
    report = verify(str(src), str(out), dtype="bfloat16", tokens=TOKENS, mode="layerwise")
    assert report.passed and report.tensor_check.passed  # the 1+w written as the converter computes it
    assert 0 < report.max_abs_diff < 0.05 * report.logit_scale  # rounded once more than the dense model does
    # the same bf16 weights written as float32 are exact again
    wide = tmp_path / "f32"
    plan = convert(str(src), wide, build_spec(experts=4, top_k=2, every=1, dtype="float32")).plan
    assert plan.exact
    assert verify(str(src), str(wide), tokens=TOKENS, mode="whole").max_abs_diff <= 1e-5


def test_partial_rotary_factor_has_no_native_form(capsys, tmp_path):
    """Phi-4-mini's partial rotary: a native target asked for is refused with the way that holds it (the generic
    wrapper, where `auto` goes; tests/test_generic.py converts and verifies it)."""
    src = make_dense(tmp_path / "phi4", "phi3", partial_rotary_factor=0.75, tokenizer=False)
    out = tmp_path / "out"
    line = expect_error(capsys, ["convert", src, out, "--target", "mixtral"], "partial_rotary_factor=0.75")
    assert "no native MoE class" in line and "--target generic keeps it exactly" in line
    assert_clean(out)
    _, plan = plan_for(resolve(str(src)), build_spec(experts=4, top_k=2))
    assert plan.target == "generic" and plan.exact
    assert any("partial_rotary_factor=0.75, which no native MoE class holds" in note for note in plan.notes)


def test_fused_rows_disagreeing_with_config(capsys, tmp_path):
    src = make_dense(tmp_path / "phi3", "phi3", tokenizer=False)
    raw = json.loads((src / "config.json").read_text())
    raw["num_key_value_heads"] = 1  # the stored qkv_proj has rows for 2
    (src / "config.json").write_text(json.dumps(raw))
    out = tmp_path / "out"
    line = expect_error(capsys, ["convert", src, out], "qkv_proj.weight has shape")
    assert "config.json and the weights disagree" in line
    assert_clean(out)


def test_family_table_lists_every_family_and_matches_readme():
    from upcycle.arch import families
    from upcycle.report.families import family_markdown, family_rows

    rows = {row["family"]: row for row in family_rows()}
    assert set(rows) == set(families())
    assert rows["gemma"]["targets"] == "mixtral, qwen2_moe"
    assert rows["phi3"]["targets"] == "mixtral, qwen2_moe, generic"  # generic: Phi-4-mini's partial rotary
    assert rows["gemma"]["exact"].startswith("float32") and rows["phi3"]["exact"] == "yes"
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert family_markdown() in readme, "README's family table is stale: paste `upcycle inspect --families --markdown`"


def test_inspect_families_cli(capsys):
    from upcycle_cli.main import run

    assert run(["inspect", "--families", "--json", "-"]) == 0
    listed = [row["family"] for row in json.loads(capsys.readouterr().out)["families"]]
    assert {"phi3", "gemma", "llama"} <= set(listed)


def test_phi3_kmeans_split_router(sources, tmp_path):
    """The calibrated router of a split reads the activation from the config (Phi3MLP has no act_fn)."""
    src, out = sources("phi3-sliding"), tmp_path / "moe"
    text = tmp_path / "cal.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    convert(
        str(src),
        out,
        build_spec(init="split", experts=4, top_k=2, every=2, router_init="kmeans", calibration=str(text)),
    )
    router = Checkpoint.open(out).load("model.layers.1.mlp.gate.weight")  # [E, H], from the calibration
    assert router.shape == (4, 32) and torch.isfinite(router).all() and router.abs().sum() > 0
    report = verify(str(src), str(out), tokens=TOKENS, mode="layerwise")
    assert report.tensor_check.passed and report.tensor_check.skipped > 0  # routers are not compared


def test_missing_fused_tensor_named_by_its_stored_key(capsys, tmp_path):
    """The dense class's key check runs on the stored (fused) keys, before the views exist."""
    from safetensors.torch import load_file, save_file

    src = make_dense(tmp_path / "phi3", "phi3", tokenizer=False, shard_size=None)
    weights = load_file(src / "model.safetensors")
    del weights["model.layers.2.self_attn.qkv_proj.weight"]
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    expect_error(capsys, ["convert", src, out], "no tensor model.layers.2.self_attn.qkv_proj.weight")
    assert_clean(out)


def test_phi3_hub_style_longrope_config(tmp_path):
    """Phi-3.5-mini's config.json spells longrope the 4.x way (rope_scaling with "type", top-level rope_theta and
    original_max_position_embeddings); transformers reads it, and the MoE gets the same rotary tables."""
    src = make_dense(tmp_path / "phi35", "phi3", **LONGROPE)
    raw = json.loads((src / "config.json").read_text())
    rope = raw.pop("rope_parameters")
    raw["rope_theta"] = rope["rope_theta"]
    raw["rope_scaling"] = {"type": "longrope", "short_factor": rope["short_factor"], "long_factor": rope["long_factor"]}
    (src / "config.json").write_text(json.dumps(raw))
    out = tmp_path / "moe"
    convert(str(src), out, build_spec(experts=2, top_k=1, every=2))
    assert json.loads((out / "config.json").read_text())["rope_parameters"]["rope_type"] == "longrope"
    ids = _ids()
    dense, _ = _logits(src, ids)
    moe, _ = _logits(out, ids)
    assert (dense - moe).abs().max().item() <= 1e-5


def test_gemma_bidirectional_attention_refused(capsys, tmp_path):
    src = make_dense(tmp_path / "gemma", "gemma", use_bidirectional_attention=True, tokenizer=False)
    out = tmp_path / "out"
    expect_error(capsys, ["convert", src, out], "use_bidirectional_attention=True")
    assert_clean(out)

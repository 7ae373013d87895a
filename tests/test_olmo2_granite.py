"""OLMo 2 → FlexOlmo, Granite → GraniteMoe (fused experts on disk), Ernie 4.5 → Ernie4.5-MoE and HunYuan dense →
HunYuan-MoE: exact after reload, verified whole and layer by layer, every expert method placed right in the fused
tensors, seeded, trainable and routable; the MoE siblings found inexact are refused with their reason."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from test_bad_input import assert_clean, expect_error
from tiny import BASE
from transformers import AutoConfig, AutoModelForCausalLM

from upcycle.arch import targets
from upcycle.convert.pipeline import convert
from upcycle.convert.spec import CHOICES, build_spec
from upcycle.report.verify import verify
from upcycle.train.metrics import read_metrics
from upcycle_cli.main import run

IDS = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(5))
GRANITE_MULTIPLIERS = ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling")

# (family, config overrides, spec, target class, MoE layers)
EVERY = (0, 1, 2, 3)
FINE = dict(experts=4, top_k=2, init="fine-grained", granularity=2, router_std=1.0)
SPLIT = dict(experts=4, top_k=4, init="split", router_init="zero")
CASES = [
    ("olmo2", {}, dict(experts=4, top_k=2), "FlexOlmoForCausalLM", EVERY),
    ("olmo2", {"tie_word_embeddings": True}, dict(experts=4, top_k=2), "FlexOlmoForCausalLM", EVERY),
    ("olmo2", {"attention_bias": True}, dict(experts=3, top_k=1, router_std=1.0), "FlexOlmoForCausalLM", EVERY),
    ("granite", {}, dict(experts=4, top_k=2), "GraniteMoeForCausalLM", EVERY),
    ("granite", {"tie_word_embeddings": True, "attention_bias": True}, dict(experts=4), "GraniteMoeForCausalLM", EVERY),
    ("granite", {}, SPLIT, "GraniteMoeForCausalLM", EVERY),
    ("granite", {}, FINE, "GraniteMoeForCausalLM", EVERY),
    ("ernie4_5", {}, dict(experts=4, top_k=2), "Ernie4_5_MoeForCausalLM", EVERY),
    ("ernie4_5", {"tie_word_embeddings": True}, dict(experts=4, every=2), "Ernie4_5_MoeForCausalLM", (1, 3)),
    ("ernie4_5", {}, dict(experts=4, top_k=2, layers="1,2"), "Ernie4_5_MoeForCausalLM", (1, 2)),
    ("hunyuan_v1_dense", {}, dict(experts=4, top_k=2), "HunYuanMoEV1ForCausalLM", EVERY),
    ("hunyuan_v1_dense", {"attention_bias": True}, SPLIT, "HunYuanMoEV1ForCausalLM", EVERY),
]


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as fh:
            out |= {k: fh.get_tensor(k) for k in fh.keys()}
    return out


def logits(folder: Path) -> tuple[torch.Tensor, object, dict]:
    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    with torch.no_grad():
        return model(input_ids=IDS).logits, model, info


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{'-'.join(f'{k}={v}' for k, v in c[2].items())}")
def test_exact_after_reload_and_verified(case, dense_store, tmp_path):
    family, overrides, spec, cls, moe_layers = case
    src = dense_store(family, **overrides)
    out = tmp_path / "moe"
    result = convert(str(src), out, build_spec(**spec))
    assert result.plan.exact and result.plan.moe_layers == moe_layers
    dense_logits, dense_model, _ = logits(src)
    moe_logits, moe_model, info = logits(out)
    assert type(moe_model).__name__ == cls
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert (dense_logits - moe_logits).abs().max().item() <= 1e-5
    # every hyperparameter copied, not left to the target's defaults (FlexOlmo: eps 1e-6, rope theta 5e5)
    dense_cfg, moe_cfg = dense_model.config, moe_model.config
    assert moe_cfg.rms_norm_eps == dense_cfg.rms_norm_eps
    assert moe_cfg.rope_parameters["rope_theta"] == dense_cfg.rope_parameters["rope_theta"] == 10000.0
    assert moe_cfg.tie_word_embeddings == dense_cfg.tie_word_embeddings
    assert getattr(moe_cfg, "attention_bias", None) == getattr(dense_cfg, "attention_bias", None)
    assert moe_cfg.head_dim == (getattr(dense_cfg, "head_dim", None) or 8)
    if family == "granite":
        for key in GRANITE_MULTIPLIERS:
            assert getattr(moe_cfg, key) == getattr(dense_cfg, key) != 1.0
    if family == "olmo2":
        assert moe_cfg.norm_topk_prob is True and dense_cfg.rms_norm_eps == 1e-5
    if family == "ernie4_5":  # the MoE layers as Ernie's range: start, end and step
        assert (moe_cfg.moe_layer_start_index, moe_cfg.moe_layer_end_index) == (moe_layers[0], moe_layers[-1])
        assert moe_cfg.moe_layer_interval == spec.get("every", 1) and moe_cfg.moe_num_shared_experts == 0
    if family == "hunyuan_v1_dense":  # the always-on shared MLP adds nothing: zeros, and the card says so
        shared = moe_model.model.layers[0].mlp.shared_mlp
        assert all(not p.any() for p in shared.parameters()) and shared.down_proj.weight.shape[0] == 32
        assert "shared MLP is written as zeros" in (out / "README.md").read_text()
    blocks = [i for i, layer in enumerate(moe_model.model.layers) if hasattr(getattr(layer, "mlp", None), "experts")]
    assert family == "granite" or tuple(blocks) == moe_layers
    for mode in ("whole", "layerwise"):
        report = verify(str(src), str(out), mode=mode)
        assert report.passed and report.max_abs_diff <= 1e-5, (mode, report.max_abs_diff)
    check = report.tensor_check
    assert check.passed and check.equal == check.compared > 0 and check.skipped == len(moe_layers)  # the routers
    assert all(row.block_max_abs_diff <= 1e-5 for row in report.layers if row.moe)
    assert [row.layer for row in report.layers if row.moe] == list(moe_layers)


def test_granite_on_disk_layout_is_what_save_pretrained_writes(dense_store, tmp_path):
    """Fused [E, 2I, H] input_linear (each expert's gate rows, then its up rows) and [E, H, I] output_linear."""
    src = dense_store("granite")
    out = tmp_path / "moe"
    convert(str(src), out, build_spec(experts=3, top_k=2))
    ours = tensors(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    model.save_pretrained(tmp_path / "resaved")
    theirs = tensors(tmp_path / "resaved")
    assert ours.keys() == theirs.keys()
    dense = tensors(src)
    for layer in range(4):
        moe = f"model.layers.{layer}.block_sparse_moe."
        assert ours[moe + "input_linear.weight"].shape == (3, 128, 32)
        assert ours[moe + "output_linear.weight"].shape == (3, 32, 64)
        assert ours[moe + "router.layer.weight"].shape == (3, 32)
        mlp = f"model.layers.{layer}.mlp."
        gate, up, down = (dense[mlp + f"{r}_proj.weight"] for r in ("gate", "up", "down"))
        for e in range(3):
            assert torch.equal(ours[moe + "input_linear.weight"][e], torch.cat([gate, up]))
            assert torch.equal(ours[moe + "output_linear.weight"][e], down)
            assert torch.equal(
                model.model.layers[layer].block_sparse_moe.experts.gate_up_proj[e], torch.cat([gate, up])
            )
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def as_llama(granite: Path, folder: Path) -> Path:
    """The same weights as a Llama checkpoint (Granite's keys are Llama's): the per-expert layout to compare with."""
    shutil.copytree(granite, folder)
    cfg = json.loads((folder / "config.json").read_text())
    for key in (*GRANITE_MULTIPLIERS, "mlp_bias", "architectures"):
        cfg.pop(key, None)
    cfg["model_type"] = "llama"
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


METHODS = [
    dict(experts=4, top_k=2),
    dict(experts=4, top_k=2, dtype="bfloat16"),  # cast parts: the first written, the others copied from the output
    dict(experts=4, top_k=2, init="drop", drop_ratio=0.25),
    dict(experts=4, top_k=2, init="split"),
    dict(experts=4, top_k=2, init="split", split_by="cluster"),
    dict(experts=8, top_k=2, init="fine-grained", granularity=2),
    dict(experts=4, top_k=2, noise=0.05),
]


@pytest.mark.parametrize("spec", METHODS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_fused_experts_hold_the_per_expert_tensors(spec, dense_store, tmp_path):
    """Every expert method gives the fused GraniteMoe tensors exactly the per-expert tensors a Mixtral gets from the
    same FFN weights and seed: the methods' code is shared, only the placement differs."""
    src = dense_store("granite")
    convert(str(src), tmp_path / "granitemoe", build_spec(seed=3, **spec))
    convert(str(as_llama(src, tmp_path / "llama")), tmp_path / "mixtral", build_spec(seed=3, **spec))
    fused, split = tensors(tmp_path / "granitemoe"), tensors(tmp_path / "mixtral")
    for layer in range(4):
        gate_up = fused[f"model.layers.{layer}.block_sparse_moe.input_linear.weight"]
        down = fused[f"model.layers.{layer}.block_sparse_moe.output_linear.weight"]
        assert gate_up.shape[0] == spec["experts"]
        for e in range(spec["experts"]):
            w = f"model.layers.{layer}.block_sparse_moe.experts.{e}.w"
            assert torch.equal(gate_up[e], torch.cat([split[w + "1.weight"], split[w + "3.weight"]]))
            assert torch.equal(down[e], split[w + "2.weight"])
        assert torch.equal(
            fused[f"model.layers.{layer}.block_sparse_moe.router.layer.weight"],
            split[f"model.layers.{layer}.block_sparse_moe.gate.weight"],
        )
    if spec.get("init") == "drop":  # not exact: verify says so, and its tensor check still finds every byte right
        report = verify(str(src), str(tmp_path / "granitemoe"), mode="layerwise")
        assert report.tensor_check.passed and report.tensor_check.computed == 8  # 2 fused tensors × 4 layers


def shard_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


@pytest.mark.parametrize("spec", [dict(init="drop"), dict(init="split", split_by="cluster"), dict(noise=0.05)])
def test_fused_layout_is_seeded(spec, dense_store, tmp_path):
    src = dense_store("granite")
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        convert(str(src), tmp_path / name, build_spec(experts=4, seed=seed, **spec))
    assert shard_hashes(tmp_path / "a") == shard_hashes(tmp_path / "b")
    a, c = tensors(tmp_path / "a"), tensors(tmp_path / "c")
    assert not torch.equal(
        a["model.layers.0.block_sparse_moe.router.layer.weight"],
        c["model.layers.0.block_sparse_moe.router.layer.weight"],
    )


@pytest.mark.parametrize(
    ("family", "overrides", "flags", "needle"),
    [
        ("olmo2", {}, ["--target", "flex_olmo", "--every", "2"], "flex_olmo makes every layer MoE"),
        ("olmo2", {}, ["--target", "flex_olmo", "--layers", "0,1"], "make every layer MoE (--every 1"),
        ("granite", {}, ["--target", "granitemoe", "--every", "2"], "granitemoe makes every layer MoE"),
        (
            "granite",
            {"mlp_bias": True},
            ["--target", "granitemoe"],
            "mlp_bias=True, which no native MoE class holds (they need mlp_bias=False",
        ),
        (
            "granite",
            {},
            ["--target", "granitemoe", "--routing", "softmax-topk"],
            "granitemoe, the only native MoE class for granite models",
        ),
        ("olmo2", {}, ["--target", "mixtral"], "a olmo2 model has no exact mixtral form"),
        (
            "ernie4_5",
            {"use_bias": True},
            ["--target", "ernie4_5_moe"],
            "use_bias=True, which no native MoE class holds (they need use_bias=False)",
        ),
        ("ernie4_5", {}, ["--target", "ernie4_5_moe", "--layers", "0,3"], "layers 0,3 are not such a set"),
        (
            "hunyuan_v1_dense",
            {},
            ["--target", "hunyuan_v1_moe", "--every", "2"],
            "hunyuan_v1_moe makes every layer MoE",
        ),
        (
            "hunyuan_v1_dense",
            {},
            ["--target", "hunyuan_v1_moe", "--shared-experts", "1"],
            "hunyuan_v1_moe has none, and no native MoE class for hunyuan_v1_dense models",
        ),
    ],
)
def test_refusals_are_one_line(family, overrides, flags, needle, dense_store, tmp_path, capsys):
    src = dense_store(family, **overrides)
    out = tmp_path / "moe"
    line = expect_error(capsys, ["convert", src, out, "--experts", "4", *flags], needle)
    assert needle in line
    assert_clean(out)


def test_every_target_table_is_a_target_choice():
    assert set(CHOICES["target"]) == {"auto", "generic", *targets()}


@pytest.mark.parametrize(
    ("family", "flags"),
    [("granite", ["--target", "granitemoe"]), ("ernie4_5", ["--every", "2"]), ("olmo2", ["--target", "flex_olmo"])],
)
def test_cli_and_layerwise_without_upcycle_json(family, flags, dense_store, tmp_path, capsys):
    """Without upcycle.json, --layerwise infers the plan from the MoE config: fused experts, Ernie's layer range;
    inspect finds the experts in either layout."""
    src = dense_store(family)
    out = tmp_path / "moe"
    assert run(["convert", str(src), str(out), "--experts", "4", *flags]) == 0
    (out / "upcycle.json").unlink()
    report = verify(str(src), str(out), mode="layerwise")
    moe_layers = [row.layer for row in report.layers if row.moe]
    assert report.passed and report.tensor_check.passed and report.max_abs_diff <= 1e-5
    assert moe_layers == ([1, 3] if family == "ernie4_5" else [0, 1, 2, 3])
    assert (
        run(["verify", str(src), str(out), "--whole"]) == 0 and run(["verify", str(src), str(out), "--layerwise"]) == 0
    )
    capsys.readouterr()
    assert run(["inspect", str(out), "--json", "-"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "moe" and info["experts"] == 4 and info["moe_layers"] == moe_layers


def test_softmax_topk_on_flex_olmo_is_exact_with_a_zero_router(dense_store, tmp_path):
    src = dense_store("olmo2")
    out = tmp_path / "moe"
    result = convert(str(src), out, build_spec(experts=4, top_k=2, routing="softmax-topk", router_init="zero"))
    assert result.plan.exact and json.loads((out / "config.json").read_text())["norm_topk_prob"] is False
    assert (logits(src)[0] - logits(out)[0]).abs().max().item() <= 1e-5


@pytest.mark.parametrize(
    ("model_type", "sibling", "why"),
    [("exaone4", "exaone_moe", "normalises each sublayer"), ("olmo3", "flex_olmo", "no sliding-window attention")],
)
def test_inexact_siblings_go_to_the_generic_wrapper(model_type, sibling, why, tmp_path, capsys):
    """No native sibling holds these exactly (the family table says why), so auto writes the generic wrapper,
    says so, and the result computes the dense model; asking for the sibling is refused."""
    from upcycle.arch import families
    from upcycle.report.verify import verify

    assert why in families()[model_type].caveats and sibling in families()[model_type].caveats
    config = AutoConfig.for_model(model_type, **{**BASE, "head_dim": 8, "sliding_window": 16})
    src = tmp_path / "dense"
    AutoModelForCausalLM.from_config(config).save_pretrained(src)  # a real tiny checkpoint of the family
    out = tmp_path / "moe"
    result = convert(str(src), out, build_spec(experts=4, top_k=2))
    assert result.plan.target == "generic" and result.plan.exact
    assert any("trust_remote_code" in note for note in result.plan.notes)
    report = verify(str(src), str(out))
    assert report.passed and report.max_abs_diff <= 1e-5
    line = expect_error(capsys, ["convert", src, tmp_path / "moe2", "--target", sibling], sibling)
    assert "generic" in line
    assert_clean(tmp_path / "moe2")


@pytest.mark.slow
@pytest.mark.parametrize("family", ["olmo2", "granite", "ernie4_5", "hunyuan_v1_dense"])
def test_train_and_routing_find_the_experts(family, dense_store, tmp_path):
    src = dense_store(family)
    moe = tmp_path / "moe"
    convert(str(src), moe, build_spec(experts=4, top_k=2, noise=0.01))
    text = tmp_path / "text.txt"
    words = ["the quick brown fox", "jumps over", "the lazy dog", "and runs away", "into the dark wood"]
    text.write_text("\n\n".join(" ".join(words[(i + j) % 5] for j in range(8)) + "." for i in range(120)) + "\n")
    out = tmp_path / "run"
    args = ["train", str(moe), "--data", str(text), "--out", str(out), "--steps", "12", "--seq-len", "32"]
    assert run([*args, "--micro-batch", "2", "--lr", "1e-2", "--log-every", "1", "--save-every", "6"]) == 0
    train = [r for r in read_metrics(out) if r["kind"] == "train"]
    assert len(train) == 12 and all(math.isfinite(r["loss"]) for r in train)
    assert sum(r["lm"] for r in train[-3:]) < sum(r["lm"] for r in train[:3]) - 0.1  # summed over 3 steps
    assert [row["layer"] for row in train[-1]["layers"]] == [0, 1, 2, 3]
    _, info = AutoModelForCausalLM.from_pretrained(out / "final", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert tensors(out / "final").keys() == tensors(moe).keys()
    report = tmp_path / "report"
    assert run(["routing", str(out), "--out", str(report), "--text", str(text), "--max-tokens", "200"]) == 0
    routed = json.loads((report / "routing.json").read_text())
    assert routed["tokens"] == 200 and routed["moe_layers"] == [0, 1, 2, 3]
    assert all(0 < row["weight_cosine"] < 1 for row in routed["layers"])  # trained experts moved apart

"""End-to-end conversion of tiny random models of every family, reloaded with plain transformers."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from upcycle.convert.pipeline import convert
from upcycle.convert.spec import build_spec

CLASSES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}

# (family, config overrides, spec, expected target)
CASES = [
    ("llama", {}, dict(experts=4, top_k=2), "mixtral"),
    ("llama", {}, dict(experts=4, top_k=2, every=2), "qwen2_moe"),
    ("llama", {}, dict(experts=3, top_k=1, target="qwen2_moe", router_init="zero"), "qwen2_moe"),
    ("llama", {"tie_word_embeddings": True}, dict(experts=8, top_k=2, layers="0,3"), "qwen2_moe"),
    (
        "llama",
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
            "rms_norm_eps": 1e-5,
        },
        dict(experts=4, top_k=2, router_std=1.0),
        "mixtral",
    ),
    ("mistral", {}, dict(experts=4, top_k=2, router_init="zero"), "mixtral"),
    ("mistral", {"sliding_window": 8}, dict(experts=4, top_k=2), "mixtral"),
    ("mistral", {"sliding_window": 8}, dict(experts=4, top_k=3, every=2), "qwen2_moe"),
    ("qwen2", {}, dict(experts=4, top_k=2), "qwen2_moe"),
    (
        "qwen2",
        {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2},
        dict(experts=4, top_k=2, every=3),
        "qwen2_moe",
    ),
    ("qwen3", {}, dict(experts=4, top_k=2, every=2), "qwen3_moe"),
    ("qwen3", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 0}, dict(experts=4), "qwen3_moe"),
]


def _id(case) -> str:
    family, over, spec, _target = case
    return f"{family}-{'-'.join(f'{k}={v}' for k, v in spec.items())}{'-custom' if over else ''}"


def logits(folder: Path, ids: torch.Tensor) -> tuple[torch.Tensor, object, dict]:
    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    with torch.no_grad():
        return model(input_ids=ids).logits, model, info


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_clone_is_exact_after_reload(case, dense_store, tmp_path):
    family, overrides, spec_kwargs, target = case
    src = dense_store(family, **overrides)
    out = tmp_path / "moe"
    result = convert(str(src), out, build_spec(**spec_kwargs))
    assert result.plan.target == target

    ids = torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(1))  # longer than the window
    dense_logits, dense_model, _ = logits(src, ids)
    moe_logits, moe_model, info = logits(out, ids)

    assert type(moe_model).__name__ == CLASSES[target]
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    n = dense_model.config.num_hidden_layers
    moe_layers = set(result.plan.moe_layers)
    for i, layer in enumerate(moe_model.model.layers):
        is_moe = hasattr(layer.mlp, "experts")
        assert is_moe == (i in moe_layers), f"layer {i}"
        if is_moe:  # every expert holds the dense FFN, router has the requested shape
            dense_mlp = dense_model.model.layers[i].mlp
            gate_up = torch.cat([dense_mlp.gate_proj.weight, dense_mlp.up_proj.weight], 0)
            for e in range(spec_kwargs["experts"]):
                assert torch.equal(layer.mlp.experts.gate_up_proj[e], gate_up)
                assert torch.equal(layer.mlp.experts.down_proj[e], dense_mlp.down_proj.weight)
            assert layer.mlp.gate.weight.shape == (spec_kwargs["experts"], dense_model.config.hidden_size)
    assert len(moe_layers) <= n
    assert (dense_logits - moe_logits).abs().max().item() <= 1e-5
    assert torch.equal(dense_logits.argmax(-1), moe_logits.argmax(-1))


def test_hyperparameters_copied_explicitly(dense_store, tmp_path):
    """Mixtral's defaults (eps 1e-5, rope theta 1e6) must never leak in."""
    src = dense_store("llama", rms_norm_eps=1e-6)
    out = tmp_path / "moe"
    convert(str(src), out, build_spec(experts=4))
    cfg = json.loads((out / "config.json").read_text())
    dense = json.loads((src / "config.json").read_text())
    assert cfg["model_type"] == "mixtral" and cfg["architectures"] == ["MixtralForCausalLM"]
    assert cfg["rms_norm_eps"] == 1e-6
    assert cfg["rope_parameters"]["rope_theta"] == dense["rope_parameters"]["rope_theta"] == 10000.0
    assert cfg["head_dim"] == 8 and cfg["num_local_experts"] == 4 and cfg["num_experts_per_tok"] == 2
    assert cfg["intermediate_size"] == 64 and cfg["tie_word_embeddings"] is False
    assert cfg["bos_token_id"] == 1 and cfg["eos_token_id"] == 2


def test_qwen2_moe_interleaving_config(dense_store, tmp_path):
    src = dense_store("llama")
    out = tmp_path / "moe"
    convert(str(src), out, build_spec(experts=4, every=2))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["mlp_only_layers"] == [0, 2] and cfg["decoder_sparse_step"] == 1
    assert cfg["qkv_bias"] is False and cfg["norm_topk_prob"] is True
    assert cfg["shared_expert_intermediate_size"] == 0
    assert cfg["moe_intermediate_size"] == cfg["intermediate_size"] == 64
    assert cfg["layer_types"] == ["full_attention"] * 4


def test_on_disk_keys_are_the_ones_save_pretrained_writes(dense_store, tmp_path):
    """Our per-expert key spelling must equal what transformers itself writes for the class."""
    for spec, target in ((dict(experts=2), "mixtral"), (dict(experts=2, every=2), "qwen2_moe")):
        src = dense_store("llama")
        out = tmp_path / target
        convert(str(src), out, build_spec(**spec))
        ours = set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"])
        model = AutoModelForCausalLM.from_pretrained(out)
        model.save_pretrained(tmp_path / f"{target}-resaved")
        resaved = tmp_path / f"{target}-resaved"
        theirs = set()
        for f in resaved.glob("*.safetensors"):
            with safe_open(f, "pt") as fh:
                theirs |= set(fh.keys())
        assert ours == theirs


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


def test_same_seed_same_bytes(dense_store, tmp_path):
    src = dense_store("qwen3")
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    convert(str(src), a, build_spec(experts=4, seed=7, max_shard_size="100KB"))
    convert(str(src), b, build_spec(experts=4, seed=7, max_shard_size="100KB"))
    convert(str(src), c, build_spec(experts=4, seed=8, max_shard_size="100KB"))
    assert len(_digest(a)) > 1  # several shards
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)
    index = json.loads((a / "model.safetensors.index.json").read_text())["weight_map"]
    router = "model.layers.0.mlp.gate.weight"
    with safe_open(a / index[router], "pt") as fh:
        std = fh.get_tensor(router).std().item()
    assert 0.01 < std < 0.04  # router_std 0.02


def test_zero_router_and_dtype_conversion(dense_store, tmp_path):
    src = dense_store("llama")
    out = tmp_path / "moe"
    convert(str(src), out, build_spec(experts=4, router_init="zero", dtype="bfloat16"))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16"
    dense = AutoModelForCausalLM.from_pretrained(src)
    with safe_open(next(out.glob("*.safetensors")), "pt") as fh:
        keys = list(fh.keys())
        for key in keys:
            assert fh.get_tensor(key).dtype == torch.bfloat16
        w1 = fh.get_tensor("model.layers.0.block_sparse_moe.experts.3.w1.weight")
        gate = fh.get_tensor("model.layers.0.block_sparse_moe.gate.weight")
    assert torch.equal(w1, dense.model.layers[0].mlp.gate_proj.weight.to(torch.bfloat16))
    assert torch.count_nonzero(gate) == 0


def test_output_folder_contents(dense_store, tmp_path):
    src = dense_store("llama")
    out = tmp_path / "moe"
    result = convert(str(src), out, build_spec(experts=4, every=2))
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "upcycle.json",
        "README.md",
    } <= names
    assert not [n for n in names if n.startswith(".")]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    sizes = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    assert index["metadata"]["total_size"] <= sizes
    assert index["metadata"]["total_parameters"] == result.plan.total_params

    recipe = json.loads((out / "upcycle.json").read_text())
    assert recipe["recipe"]["experts"] == 4 and recipe["recipe"]["every"] == 2
    assert recipe["plan"]["moe_layers"] == [1, 3] and recipe["plan"]["target"] == "qwen2_moe"
    for name, digest in recipe["source"]["files_sha256"].items():
        assert hashlib.sha256((src / name).read_bytes()).hexdigest() == digest
    assert recipe["tool"]["name"] == "upcycle"
    assert recipe["command"].startswith("upcycle convert")

    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md")
    assert set(card.data.tags) >= {"moe", "upcycled"}
    assert card.data.library_name == "transformers"
    assert "Qwen2MoeForCausalLM" in card.text and "top-2" in card.text


def test_plain_transformers_in_a_fresh_process(dense_store, tmp_path):
    """Loading needs nothing from upcycle: a fresh interpreter that never imports it gets the same logits."""
    outs = {}
    for family in ("llama", "mistral", "qwen2", "qwen3"):
        outs[family] = tmp_path / family
        convert(str(dense_store(family)), outs[family], build_spec(experts=4, every=2))
    script = """
import sys, json, torch
from transformers import AutoModelForCausalLM
res = {}
for dense, moe in json.loads(sys.argv[1]):
    ids = torch.arange(40).reshape(1, 40) % 100
    a = AutoModelForCausalLM.from_pretrained(dense)(input_ids=ids).logits
    m = AutoModelForCausalLM.from_pretrained(moe)
    b = m(input_ids=ids).logits
    res[moe] = [type(m).__name__, (a - b).abs().max().item()]
assert "upcycle" not in sys.modules
print(json.dumps(res))
"""
    pairs = [[str(dense_store(f)), str(o)] for f, o in outs.items()]
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps(pairs)], capture_output=True, text=True, check=True, cwd=tmp_path
    )
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    for family, out in outs.items():
        cls, diff = res[str(out)]
        assert cls == ("Qwen3MoeForCausalLM" if family == "qwen3" else "Qwen2MoeForCausalLM")
        assert diff <= 1e-5


def test_cast_in_small_pieces_is_exact(tmp_path, monkeypatch):
    """Casting streams through a small buffer; piece boundaries (mid-row) change nothing."""
    from safetensors.torch import save_file

    import upcycle.convert.execute as conv
    from upcycle.source import read_header

    t = torch.randn(37, 11, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    save_file({"w": t, "v": torch.randn(5)}, tmp_path / "x.safetensors")
    info = {i.name: i for i in read_header(tmp_path / "x.safetensors")}["w"]
    monkeypatch.setattr(conv, "CHUNK_BYTES", 52)  # 13 float32 values: pieces cut rows in the middle
    pieces = [bytes(p) for p in conv.cast_chunks(info, "F32")]
    assert len(pieces) > 10
    got = torch.frombuffer(bytearray(b"".join(pieces)), dtype=torch.float32).reshape(37, 11)
    assert torch.equal(got, t.float())


def test_output_has_the_usual_permissions(dense_store, tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        out = tmp_path / "moe"
        convert(str(dense_store("llama")), out, build_spec(experts=2))
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    for name in ("README.md", "upcycle.json", "config.json", "model.safetensors.index.json"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name

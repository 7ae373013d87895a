"""The plan is pure: checkpoint-scale key and shape logic runs without any weights."""

from __future__ import annotations

from pathlib import Path

import pytest

from upcycle.convert.plan import moe_layer_indices
from upcycle.convert.planner import make_plan
from upcycle.convert.spec import build_spec
from upcycle.errors import UpcycleError
from upcycle.source import TensorInfo

LLAMA3_70B = dict(
    model_type="llama",
    architectures=["LlamaForCausalLM"],
    vocab_size=128256,
    hidden_size=8192,
    intermediate_size=28672,
    num_hidden_layers=80,
    num_attention_heads=64,
    num_key_value_heads=8,
    head_dim=128,
    hidden_act="silu",
    max_position_embeddings=131072,
    initializer_range=0.02,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0},
    attention_dropout=0.0,
    attention_bias=False,
    mlp_bias=False,
    bos_token_id=128000,
    eos_token_id=128001,
)


def fake_tensors(cfg: dict, dtype: str = "BF16") -> dict[str, TensorInfo]:
    """The tensor index of a Llama checkpoint, built from its config alone (no weights)."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes |= {
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
    out, offset = {}, 0
    for name, shape in shapes.items():
        n = 2
        for d in shape:
            n *= d
        out[name] = TensorInfo(name, dtype, shape, Path("fake.safetensors"), offset, n)
        offset += n
    return out


def test_llama3_70b_plan_at_scale():
    tensors = fake_tensors(LLAMA3_70B)
    dense = sum(t.nbytes // 2 for t in tensors.values())
    ffn = 3 * 8192 * 28672
    plan = make_plan(LLAMA3_70B, tensors, build_spec(experts=8, top_k=2))
    assert plan.target == "mixtral" and plan.moe_layers == tuple(range(80))
    routers = 80 * 8 * 8192
    assert plan.dense_params == dense
    assert plan.total_params == dense + 80 * 7 * ffn + routers
    assert plan.active_params == dense + 80 * 1 * ffn + routers
    assert plan.total_bytes == 2 * plan.total_params
    assert plan.config["rms_norm_eps"] == 1e-5 and plan.config["rope_parameters"]["rope_theta"] == 500000.0
    names = [op.name for op in plan.ops]
    assert len(names) == len(set(names))
    assert "model.layers.79.block_sparse_moe.experts.7.w2.weight" in names
    assert not any(".mlp.gate_proj" in n for n in names)
    # streaming order: embeddings first, then layer by layer, experts closing each layer, head last
    assert names[0] == "model.embed_tokens.weight" and names[-1] in ("lm_head.weight", "model.norm.weight")
    layer_of = [int(n.split(".")[2]) for n in names if n.startswith("model.layers.")]
    assert layer_of == sorted(layer_of)


def test_every_other_layer_at_scale_uses_qwen2_moe():
    plan = make_plan(LLAMA3_70B, fake_tensors(LLAMA3_70B), build_spec(experts=16, top_k=4, every=2))
    assert plan.target == "qwen2_moe"
    assert plan.moe_layers == tuple(range(1, 80, 2))
    assert plan.config["mlp_only_layers"] == list(range(0, 80, 2))
    assert plan.config["num_experts"] == 16 and plan.config["num_experts_per_tok"] == 4
    shared = [op for op in plan.ops if "shared_expert" in op.name]
    assert len(shared) == 4 * 40 and sum(op.numel for op in shared) == 40 * 8192  # only the [1,H] gate has size
    dense_ffn = [op for op in plan.ops if ".mlp.gate_proj" in op.name]
    assert len(dense_ffn) == 40


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(every=1), (0, 1, 2, 3, 4, 5)),
        (dict(every=2), (1, 3, 5)),
        (dict(every=3), (2, 5)),
        (dict(every=4), (3,)),
        (dict(layers="5,1"), (1, 5)),
        (dict(every=2, layers="0"), (0,)),
    ],
)
def test_layer_selection(kwargs, expected):
    assert moe_layer_indices(6, build_spec(**kwargs)) == expected


def test_layer_selection_errors():
    with pytest.raises(UpcycleError, match="selects no layer"):
        moe_layer_indices(3, build_spec(every=5))
    with pytest.raises(UpcycleError, match="out of range"):
        moe_layer_indices(6, build_spec(layers="6"))


def test_refusals():
    tensors = fake_tensors(LLAMA3_70B)
    with pytest.raises(UpcycleError, match=r"attention_bias.*--target generic keeps it"):  # auto: tests/test_generic.py
        make_plan(LLAMA3_70B | {"attention_bias": True}, tensors, build_spec(target="mixtral"))
    with pytest.raises(UpcycleError, match=r"not supported.*gemma.*gpt2.*llama.*olmo2.*phi3.*qwen3"):
        make_plan(LLAMA3_70B | {"model_type": "bert"}, tensors, build_spec())
    with pytest.raises(UpcycleError, match="not a causal language model"):
        make_plan(LLAMA3_70B | {"architectures": ["LlamaForSequenceClassification"]}, tensors, build_spec())
    with pytest.raises(UpcycleError, match="no exact qwen3_moe"):
        make_plan(LLAMA3_70B, tensors, build_spec(target="qwen3_moe"))
    with pytest.raises(UpcycleError, match="--target qwen2_moe"):
        make_plan(LLAMA3_70B, tensors, build_spec(target="mixtral", every=2))
    broken = dict(tensors)
    del broken["model.layers.3.mlp.up_proj.weight"]
    with pytest.raises(UpcycleError, match=r"no tensor model\.layers\.3\.mlp\.up_proj"):
        make_plan(LLAMA3_70B, broken, build_spec())
    with pytest.raises(UpcycleError, match=r"config\.json and the weights disagree"):
        make_plan(LLAMA3_70B | {"intermediate_size": 1000}, tensors, build_spec())


def test_mixed_sliding_layers_go_generic_where_no_native_target_expresses_them():
    qwen3 = LLAMA3_70B | {
        "model_type": "qwen3",
        "architectures": ["Qwen3ForCausalLM"],
        "sliding_window": 4096,
        "layer_types": ["sliding_attention"] * 40 + ["full_attention"] * 40,
    }
    with pytest.raises(UpcycleError, match="mixes sliding-window and full-attention") as exc:
        make_plan(qwen3, fake_tensors(LLAMA3_70B), build_spec(target="qwen3_moe"))
    assert "no native MoE class (qwen3_moe) holds; --target generic keeps it exactly" in str(exc.value)
    plan = make_plan(qwen3, fake_tensors(LLAMA3_70B), build_spec())  # auto: the dense class's own attention
    assert plan.target == "generic" and plan.config["layer_types"] == qwen3["layer_types"]
    assert any("mixes sliding-window and full-attention layers" in note for note in plan.notes)
    uniform = qwen3 | {"layer_types": ["sliding_attention"] * 80}
    plan = make_plan(uniform, fake_tensors(LLAMA3_70B), build_spec())
    assert plan.config["use_sliding_window"] is True and plan.config["sliding_window"] == 4096


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(experts=1), "at least 2"),
        (dict(experts=4, top_k=5), "--top-k 5"),
        (dict(top_k=0), "--top-k 0"),
        (dict(every=0), "--every 0"),
        (dict(init="moefication"), "--init 'moefication'"),
        (dict(router_init="kmeans"), "--router-init"),
        (dict(target="llama4"), "--target"),
        (dict(dtype="int8"), "--dtype"),
        (dict(router_std=-1.0), "--router-std"),
        (dict(layers="a,b"), "--layers"),
        (dict(experts="8"), "must be a whole number"),
    ],
)
def test_spec_validation(kwargs, match):
    with pytest.raises(UpcycleError, match=match):
        build_spec(**kwargs)


def test_recipe_then_flags(tmp_path):
    from upcycle.convert.spec import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("experts: 16\ntop-k: 4\nevery: 2\nrouter_init: zero\n")
    spec = build_spec(load_recipe(recipe), experts=None, top_k=1)
    assert (spec.experts, spec.top_k, spec.every, spec.router_init) == (16, 1, 2, "zero")
    recipe.write_text("expert: 16\n")
    with pytest.raises(UpcycleError, match="unknown key 'expert'"):
        build_spec(load_recipe(recipe))


def test_architecture_tables_are_consistent():
    from upcycle.arch import FFN_ROLES, families, targets

    named = {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "olmo2", "granite", "ernie4_5", "hunyuan_v1_dense"}
    assert named <= set(families())
    for fam in families().values():
        roles = {r for r in (*FFN_ROLES, "gate_up") if fam.mlp.get(r)} if fam.mlp else set(FFN_ROLES)
        if fam.mlp and fam.targets and "gate_up" in roles:  # Phi-3: native targets view the fused tensor
            fused = f"{fam.mlp['path']}.{fam.mlp['gate_up']}.weight"
            assert [part for part, _ in fam.views[fused]] == [fam.ffn["gate"], fam.ffn["up"]]
            roles = set(FFN_ROLES)
        assert set(fam.ffn) == roles
        assert all("{layer}" in t for t in fam.ffn.values())
        assert set(fam.auto_target.values()) <= set(fam.targets) <= set(targets())
    for tgt in targets().values():
        if tgt.fused:  # one tensor per fused key, each role in exactly one of them
            assert not tgt.expert and sorted(r for roles in tgt.fused.values() for r in roles) == sorted(FFN_ROLES)
            assert all("{layer}" in t and "{expert}" not in t for t in tgt.fused)
        else:
            assert set(tgt.expert) == set(FFN_ROLES)
            assert all("{layer}" in t and "{expert}" in t for t in tgt.expert.values())
        assert {"experts", "top_k", "expert_size"} <= set(tgt.config)
        assert tgt.interleave == ("dense_layers" in tgt.config or bool(tgt.layer_range))

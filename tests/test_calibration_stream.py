"""The calibration pass runs the dense model one decoder layer at a time (upcycle/convert/stream.py).

On every family's tiny model: the FFN inputs it captures equal those of the whole model run by plain
transformers (a forward pre-hook on each layer's `mlp`, each chunk its own forward), with sequences longer
than the tiny sliding windows and of two lengths; and the router rows and neuron partitions `calibrate` makes
from them equal those it makes from the whole-model pass.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_router_init import TEXT
from tiny import BASE, FAMILIES, GENERIC_FAMILIES, make_dense, save_tokenizer
from transformers import AutoConfig, AutoModelForCausalLM

from upcycle.convert import calibrate as calibrate_module
from upcycle.convert import stream
from upcycle.convert.pipeline import plan_for
from upcycle.convert.spec import build_spec
from upcycle.source import Checkpoint, resolve

# exaone4 and olmo3 (generic only, sliding-window layers) are not in tests/tiny.py: built here as
# tests/test_olmo2_granite.py builds them
EXTRA = {"exaone4": dict(head_dim=8, sliding_window=8), "olmo3": dict(head_dim=8, sliding_window=8)}
ALL = sorted([*FAMILIES, *GENERIC_FAMILIES, *EXTRA])
NATIVE = set(FAMILIES)
UNGATED = {"gpt2", "phi", "glm", "glm4"}  # --init clone only (no computed experts)
PROMPTS = [["def add(a, b): return a + b", "import numpy"], ["The Senate passed the bill."], ["0 1 1 2 3 5 8"]]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            folder = root / family
            if family in EXTRA:
                torch.manual_seed(0)
                config = AutoConfig.for_model(family, **{**BASE, **EXTRA[family]})
                AutoModelForCausalLM.from_config(config).save_pretrained(folder, max_shard_size="40KB")
                save_tokenizer(folder, config.vocab_size)
            else:
                make_dense(folder, family)
            made[family] = folder
        return made[family]

    return get


def whole_model(src: Path, sequences: list[torch.Tensor], layers: list[int], dtype=torch.float32) -> dict:
    """Each layer's FFN input per sequence, from the whole model (plain transformers): layer -> [[t, H]]."""
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
    stack = next(m for m in model.base_model.children() if isinstance(m, torch.nn.ModuleList))
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    for i in layers:
        stack[i].mlp.register_forward_pre_hook(lambda _m, a, i=i: seen[i].append(a[0][0]))
    with torch.no_grad():
        for ids in sequences:
            model(input_ids=ids[None])
    return seen


@pytest.mark.parametrize("family", ALL)
def test_streamed_inputs_equal_the_whole_model(family, models):
    src = models(family)
    ckpt = Checkpoint.open(src)
    gen = torch.Generator().manual_seed(0)
    sequences = [torch.randint(3, 128, (n,), generator=gen) for n in (40, 40, 13)]  # windows of 8: crossed
    layers = [0, 2]  # layer 3 never runs: the pass stops at the last MoE layer
    plan = stream.layer_plan(src, ckpt, max(layers), torch.float32)
    assert plan.base is not None, plan.reason  # streamed, not the whole-model fallback
    got = dict(stream.ffn_inputs(src, ckpt, sequences, tuple(layers), torch.float32))
    want = whole_model(src, sequences, layers)
    assert sorted(got) == layers
    for i in layers:
        assert [x.shape for x in got[i]] == [(len(s), x.shape[1]) for s, x in zip(sequences, got[i], strict=True)]
        diff = max((a - b).abs().max().item() for a, b in zip(got[i], want[i], strict=True))
        print(f"{family} layer {i}: max |streamed - whole| = {diff:.2e}")
        assert diff <= 1e-5


def specs(family: str, calib: Path, prompts: Path) -> list[dict]:
    """The calibrated methods the family's plans take: --router-init hidden everywhere; k-means and the split's
    ridge rows on co-activation experts where the native target is used; co-activation on gated generic MLPs."""
    found = [dict(experts=3, top_k=2, router_init="hidden", expert_prompts=str(prompts))]
    split = dict(init="split", split_by="coactivation", calibration=str(calib), calibration_tokens=600)
    if family in NATIVE:
        found.append(dict(experts=4, top_k=2, router_init="kmeans", calibration=str(calib), calibration_tokens=600))
        found.append(dict(split, experts=4, top_k=2, router_init="kmeans"))
    elif family not in UNGATED:
        found.append(dict(split, experts=4, top_k=2))
    return found


@pytest.mark.parametrize("family", ALL)
def test_same_rows_and_partitions_as_the_whole_model_pass(family, models, tmp_path, monkeypatch):
    src = models(family)
    calib, prompts = tmp_path / "calib.txt", tmp_path / "prompts.yaml"
    calib.write_text(TEXT)
    prompts.write_text(json.dumps(PROMPTS))
    for kw in specs(family, calib, prompts):
        spec = build_spec(**kw)
        dense, plan = plan_for(resolve(str(src)), spec)
        streamed = calibrate_module.calibrate(src, dense.checkpoint, plan, spec)
        with monkeypatch.context() as m:
            m.setattr(stream, "layer_plan", lambda *a: stream.LayerPlan(None, None, "", "forced"))
            whole = calibrate_module.calibrate(src, dense.checkpoint, plan, spec)
        assert streamed[2] == whole[2]  # the same text and token counts recorded
        rows, want_rows = streamed[0], whole[0]
        assert (rows is None) == (want_rows is None)
        for layer in want_rows or {}:
            assert torch.allclose(rows[layer], want_rows[layer], atol=1e-6), (kw, layer)
        parts, want_parts = streamed[1], whole[1]
        assert (parts is None) == (want_parts is None) and (parts or {}).keys() == (want_parts or {}).keys()
        for layer, by in (want_parts or {}).items():
            for key, groups in by.items():
                assert [g.tolist() for g in parts[layer][key]] == [g.tolist() for g in groups], (kw, layer)
        made = sorted((rows or {}).keys() | (parts or {}).keys())
        print(f"{family} {kw.get('init', 'clone')} {kw.get('router_init', 'random')}: layers {made} equal")
        assert made == list(plan.moe_layers)


def test_a_bfloat16_source_runs_in_float32(models, tmp_path):
    """The pass's dtype is float32 whatever the source's (as the whole-model pass loaded it)."""
    src = make_dense(tmp_path / "bf16", "llama", dtype=torch.bfloat16)
    ckpt = Checkpoint.open(src)
    sequences = [torch.arange(3, 60)]
    got = dict(stream.ffn_inputs(src, ckpt, sequences, (1,), torch.float32))
    want = whole_model(src, sequences, [1])
    assert got[1][0].dtype == torch.float32
    assert (got[1][0] - want[1][0]).abs().max().item() <= 1e-5


def test_calibration_dtype_source_runs_a_bfloat16_source_in_bfloat16(tmp_path, capsys):
    from test_bad_input import expect_error

    src = make_dense(tmp_path / "bf16", "llama", dtype=torch.bfloat16)
    ckpt = Checkpoint.open(src)
    assert calibrate_module.pass_dtype(ckpt, "source") == torch.bfloat16
    assert calibrate_module.pass_dtype(ckpt, "float32") == torch.float32
    sequences = [torch.arange(3, 60), torch.arange(5, 20)]
    got = dict(stream.ffn_inputs(src, ckpt, sequences, (0, 2), torch.bfloat16))
    want = whole_model(src, sequences, [0, 2], torch.bfloat16)
    for i in (0, 2):
        assert all(torch.equal(a, b.float()) for a, b in zip(got[i], want[i], strict=True))
    argv = ["convert", src, tmp_path / "out", "--calibration-dtype", "source"]
    expect_error(capsys, argv, "--calibration-dtype source applies only where the dense model is run")


def test_calibration_dtype_bfloat16_runs_a_float32_source_in_bfloat16(tmp_path):
    """--calibration-dtype bfloat16: the pass runs a float32 source with its weights rounded to bfloat16, as
    plain transformers runs the model loaded in bfloat16 (bitwise), and the k-means rows it makes are those of
    the bfloat16 model's inputs, near the float32 pass's."""
    src = make_dense(tmp_path / "f32", "llama")
    ckpt = Checkpoint.open(src)
    assert ckpt.tensors["model.embed_tokens.weight"].dtype == "F32"
    assert calibrate_module.pass_dtype(ckpt, "bfloat16") == torch.bfloat16
    sequences = [torch.arange(3, 60), torch.arange(5, 20)]
    got = dict(stream.ffn_inputs(src, ckpt, sequences, (0, 2), torch.bfloat16))
    want = whole_model(src, sequences, [0, 2], torch.bfloat16)
    f32 = dict(stream.ffn_inputs(src, ckpt, sequences, (0, 2), torch.float32))
    for i in (0, 2):
        assert all(torch.equal(a, b.float()) for a, b in zip(got[i], want[i], strict=True))
        diff = max((a - b).abs().max().item() for a, b in zip(got[i], f32[i], strict=True))
        assert 0 < diff < 0.1  # bfloat16 rounding: not the float32 pass, and close to it
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    rows = {}
    for dtype in ("float32", "bfloat16"):
        kw = dict(experts=4, top_k=2, router_init="kmeans", calibration=str(text), calibration_dtype=dtype)
        spec = build_spec(**kw)
        dense, plan = plan_for(resolve(str(src)), spec)
        rows[dtype], _, _ = calibrate_module.calibrate(src, dense.checkpoint, plan, spec)
    for layer, r in rows["float32"].items():
        cos = torch.nn.functional.cosine_similarity(r, rows["bfloat16"][layer], dim=1)
        assert cos.min().item() > 0.9, (layer, cos)


def test_whole_model_fallback_when_the_keys_differ(models, tmp_path):
    """A checkpoint whose keys are not the model's own names is run whole, as before; the plan says why."""
    from safetensors.torch import load_file, save_file

    src = tmp_path / "renamed"
    src.mkdir()
    folder = models("llama")
    for f in folder.iterdir():
        if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            (src / f.name).write_bytes(f.read_bytes())
    state = {}
    for f in folder.glob("*.safetensors"):
        state |= load_file(f)
    save_file({k.replace("self_attn", "attn"): v for k, v in state.items()}, src / "model.safetensors")
    plan = stream.layer_plan(src, Checkpoint.open(src), 1, torch.float32)
    assert plan.base is None and "q_proj" in plan.reason

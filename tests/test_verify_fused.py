"""`verify --layerwise` on an MoE saved in transformers 5's fused layout (save_original_format=False, as
mergekit-moe writes it): the tensor check reads each expert's part of the fused tensors in place."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from upcycle.convert.pipeline import convert
from upcycle.convert.spec import build_spec
from upcycle.report.verify import verify
from upcycle.source import Checkpoint


def resaved_fused(moe, out):
    model = AutoModelForCausalLM.from_pretrained(moe, dtype=torch.float32)
    model.save_pretrained(out, save_original_format=False)
    return Checkpoint.open(out)


@pytest.mark.parametrize(("family", "kw"), [("llama", dict(init="clone")), ("qwen2", dict(init="drop", every=2))])
def test_layerwise_reads_the_fused_layout(family, kw, dense_store, tmp_path):
    src, moe = dense_store(family), tmp_path / "moe"
    convert(str(src), moe, build_spec(experts=4, top_k=2, **kw))
    fused = resaved_fused(moe, tmp_path / "fused")
    assert any(name.endswith("experts.gate_up_proj") for name in fused.tensors)  # really the other layout
    assert not any(".experts.0." in name for name in fused.tensors)
    (tmp_path / "fused" / "upcycle.json").write_text((moe / "upcycle.json").read_text())  # the same recipe
    report = verify(str(src), str(tmp_path / "fused"), mode="layerwise")
    check = report.tensor_check
    assert check.passed, check.to_dict()
    assert report.passed == (kw["init"] == "clone")  # drop re-initialises neurons: not the dense function
    plain = verify(str(src), str(moe), mode="layerwise").tensor_check
    assert (check.compared, check.equal, check.computed) == (plain.compared, plain.equal, plain.computed)


def test_a_changed_expert_in_the_fused_layout_is_caught(dense_store, tmp_path):
    from safetensors.torch import load_file, save_file

    src, moe = dense_store("llama"), tmp_path / "moe"
    convert(str(src), moe, build_spec(experts=4, top_k=2))
    out = tmp_path / "fused"
    fused = resaved_fused(moe, out)
    name = "model.layers.1.mlp.experts.gate_up_proj"
    state = load_file(fused.tensors[name].file)
    intermediate = state[name].shape[1] // 2
    state[name][2, intermediate + 3] += 1.0  # expert 2's up_proj, one row
    save_file(state, fused.tensors[name].file, metadata={"format": "pt"})
    check = verify(str(src), str(out), mode="layerwise").tensor_check
    assert check.mismatched == ("model.layers.1.block_sparse_moe.experts.2.w3.weight",)
    assert json.loads(json.dumps(check.to_dict()))["mismatched"]

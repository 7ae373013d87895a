"""A new expert method is one registry entry: a throwaway method built through methods.LAYOUTS, end to end."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from upcycle import UpcycleError, build_spec, convert, verify
from upcycle.convert.methods import LAYOUTS
from upcycle.convert.methods.base import Layout, expert, parts_transform


def halved(spec, hidden: int, intermediate: int) -> Layout:
    """Every expert a copy of the dense FFN with its down_proj halved: the MoE computes half the dense FFN."""
    down = parts_transform("contiguous", 1, (0,), 0.5)
    experts = tuple(expert(hidden, intermediate, None, down) for _ in range(spec.experts))
    return Layout(intermediate, experts, False, "every expert's down_proj is halved")


def test_a_throwaway_method_through_the_registry(dense, tmp_path, monkeypatch):
    with pytest.raises(UpcycleError, match="--init 'halved' is not one of"):
        build_spec(None, init="halved")
    monkeypatch.setitem(LAYOUTS, "halved", halved)
    src, out = dense("llama"), tmp_path / "moe"
    result = convert(str(src), out, init="halved", experts=4, every=2)
    assert not result.plan.exact and result.plan.moe_layers == (1, 3)
    dense_model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    moe = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    for layer in result.plan.moe_layers:
        mlp = dense_model.model.layers[layer].mlp
        experts = moe.model.layers[layer].mlp.experts
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
        for e in range(4):
            assert torch.equal(experts.gate_up_proj[e], gate_up)
            assert torch.equal(experts.down_proj[e], mlp.down_proj.weight * 0.5)
    # the layerwise check recomputes the method's tensors and finds every one equal
    report = verify(str(src), out, mode="layerwise", tokens=16)
    check = report.tensor_check
    assert check.mismatched == () and check.equal == check.compared > 0 and check.computed > 0

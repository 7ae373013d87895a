"""verify, whole and layerwise, on every expert method: exact conversions pass both ways with every computed
expert tensor recomputed and equal; a method the plan does not claim exact fails honestly, and says so."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from test_methods import CASES, _id
from test_verify import edit_tensor

from upcycle.convert.ops import Expert
from upcycle.convert.pipeline import convert
from upcycle.convert.spec import build_spec
from upcycle.report.verify import verify
from upcycle_cli.main import run

EXACT = [case for case in CASES if case[2]]


def _converted(dense_store, tmp_path: Path, family: str, spec: dict) -> tuple[Path, Path]:
    src, out = dense_store(family), tmp_path / "moe"
    convert(str(src), out, build_spec(**spec))
    return src, out


@pytest.mark.parametrize("case", EXACT, ids=[_id(c) for c in EXACT])
def test_exact_methods_pass_whole_and_layerwise(case, dense_store, tmp_path):
    family, spec, _ = case
    src, out = _converted(dense_store, tmp_path, family, spec)
    plan = json.loads((out / "upcycle.json").read_text())["plan"]
    whole = verify(str(src), str(out), mode="whole")
    layerwise = verify(str(src), str(out), mode="layerwise")
    assert whole.passed and layerwise.passed, (whole.max_abs_diff, layerwise.max_abs_diff)
    assert whole.plan_exact is layerwise.plan_exact is True
    assert whole.max_abs_diff <= 1e-5 and layerwise.max_abs_diff <= 1e-5
    assert abs(whole.max_abs_diff - layerwise.max_abs_diff) <= 1e-6
    assert layerwise.top1_agreement == whole.top1_agreement == 1.0
    assert [row.layer for row in layerwise.layers if row.moe] == plan["moe_layers"]
    for row in layerwise.layers:
        assert row.block_max_abs_diff is None if not row.moe else row.block_max_abs_diff <= row.block_limit
    check = layerwise.tensor_check
    assert check.passed and check.equal == check.compared
    assert check.compared + check.zeros + check.skipped == plan["tensors"]
    assert check.skipped == len(plan["moe_layers"])  # the routers
    computed = sum(1 for op in _plan_ops(src, out) if isinstance(op, Expert) and op.transform is not None)
    assert check.computed == computed
    if spec.get("init") in ("split", "fine-grained") or spec.get("routing") == "softmax-topk":
        assert computed > 0  # these methods compute their experts: the check recomputed them


def _plan_ops(src: Path, out: Path):
    from upcycle.publish.card import read_recipe
    from upcycle.report.verify_layerwise import conversion_plan
    from upcycle.source import Checkpoint

    plan, _ = conversion_plan(Checkpoint.open(src), Checkpoint.open(out), read_recipe(out))
    return plan.ops


DROP = [
    ("llama", dict(init="drop", experts=4, seed=5)),
    ("qwen2", dict(init="drop", experts=4, shared_experts=1)),
]


@pytest.mark.parametrize(("family", "spec"), DROP, ids=["llama-drop-seed5", "qwen2-drop-shared"])
def test_drop_fails_honestly_with_its_bytes_right(family, spec, dense_store, tmp_path, capsys):
    src, out = _converted(dense_store, tmp_path, family, spec)
    report = verify(str(src), str(out), mode="layerwise")
    assert not report.passed and report.plan_exact is False and "re-initialised" in report.plan_why
    failed = [row for row in report.layers if row.moe and not row.passed]
    assert failed and all(row.block_max_abs_diff > row.block_limit for row in failed)
    assert report.max_abs_diff > 1e-3  # the logits really differ
    check = report.tensor_check  # the bytes are what the method (with this seed) writes
    assert check.passed and check.equal == check.compared and check.computed > 0
    whole = verify(str(src), str(out), mode="whole")
    assert not whole.passed and whole.plan_exact is False

    capsys.readouterr()
    assert run(["verify", str(src), str(out), "--layerwise", "--no-record"]) == 1
    text = capsys.readouterr().out
    assert re.search(r"exact at init \(plan\)\s*│\s*no \(note", text)
    why = report.plan_why
    assert f"note: the plan did not claim this MoE exact at init ({why}); the numbers are expected to differ" in text
    assert text.rstrip().endswith("FAIL")
    assert "differs from its source" not in text


def test_tensor_check_names_an_altered_computed_expert(dense_store, tmp_path):
    src, out = _converted(dense_store, tmp_path, "llama", dict(init="split", experts=4, top_k=4, router_init="zero"))
    key = "model.layers.2.block_sparse_moe.experts.1.w2.weight"  # Mixtral: w2 is down_proj
    edit_tensor(out, key, lambda t: t * (1 + torch.finfo(t.dtype).eps))
    check = verify(str(src), str(out), mode="layerwise").tensor_check
    assert check.mismatched == (key,) and check.equal == check.compared - 1

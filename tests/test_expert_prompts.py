"""`--router-init hidden --expert-prompts FILE`: router row e = the mean FFN input over expert e's prompts.

The FFN inputs are computed here independently, with plain transformers (a forward pre-hook on each dense
`mlp`, one forward per prompt), and the written rows are checked against their means.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_bad_input import assert_clean, expect_error
from test_methods import run_model, shard_hashes, tensors
from transformers import AutoModelForCausalLM, AutoTokenizer

from upcycle.convert.pipeline import convert
from upcycle.convert.spec import build_spec

HIDDEN = 32  # tests/tiny.py
PROMPTS = [
    ["def add(a, b): return a + b", "import numpy as np"],
    ["The Senate passed the bill on Tuesday."],
    ["0 1 1 2 3 5 8 13 21 34 55 89", "1969 384400 km"],
    ["Rain, rain, go away. Come again another day.", "she sells sea shells", "ZEBRA YAK WOMBAT"],
]


def write_prompts(path: Path, prompts) -> Path:
    path.write_text(json.dumps(prompts))  # JSON is YAML too
    return path


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    return write_prompts(tmp_path / "experts.yaml", PROMPTS)


def mean_inputs(src: Path, prompts: list[list[str]], layers: list[int]) -> dict[int, torch.Tensor]:
    """layer -> [E, H]: the mean FFN input over all tokens of each expert's prompts."""
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    for i in layers:
        model.model.layers[i].mlp.register_forward_pre_hook(lambda _m, a, i=i: seen[i].append(a[0][0]))
    means: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    with torch.no_grad():
        for texts in prompts:
            for i in layers:
                seen[i].clear()
            for text in texts:
                model(input_ids=torch.tensor([tok(text, add_special_tokens=False)["input_ids"]]))
            for i in layers:
                means[i].append(torch.cat(seen[i]).mean(0))  # over every token of every prompt of this expert
    return {i: torch.stack(m) for i, m in means.items()}


def routers(out: Path, plan) -> dict[int, torch.Tensor]:
    weights = tensors(out)
    return {op.layer: weights[op.name].float() for op in plan.ops if op.kind == "router"}


@pytest.mark.parametrize(
    "family, spec",
    [
        ("llama", dict(experts=4)),
        ("mistral", dict(experts=4, init="drop", every=2)),
        ("qwen2", dict(experts=4, init="split", top_k=2)),
        ("qwen3", dict(experts=8, init="fine-grained", granularity=2, top_k=2)),
    ],
)
def test_rows_are_mean_hidden_states(family, spec, dense_store, prompts_file, tmp_path):
    src, out = dense_store(family), tmp_path / "moe"
    plan = convert(str(src), out, build_spec(router_init="hidden", expert_prompts=str(prompts_file), **spec)).plan
    rows = routers(out, plan)
    means = mean_inputs(src, PROMPTS, sorted(rows))
    group = spec.get("granularity", 1)
    for layer, row in rows.items():
        m = means[layer]  # [E / G, H]
        want = m / m.norm(dim=1, keepdim=True) * 0.02 * math.sqrt(HIDDEN)  # a random row's norm, as kmeans
        torch.testing.assert_close(row, want.repeat_interleave(group, 0), rtol=1e-5, atol=1e-6)
        cos = torch.nn.functional.cosine_similarity(m[:, None], m[None], dim=-1)
        print(f"{family} layer {layer}: cosine between expert means {cos[0, 1:].tolist()}")
        assert not torch.allclose(row[0], row[group])  # different prompts, different rows


@pytest.mark.parametrize(
    "family, spec, exact",
    [
        ("llama", dict(experts=4, top_k=2), True),
        ("qwen3", dict(experts=4, top_k=1, every=2), True),
        ("qwen2", dict(experts=8, top_k=4, init="fine-grained", granularity=2), True),
        ("llama", dict(experts=4, top_k=4, init="split"), False),  # split is exact with a zero router only
    ],
)
def test_exact_where_claimed(family, spec, exact, dense_store, tmp_path):
    src, out = dense_store(family), tmp_path / "moe"
    path = write_prompts(tmp_path / "p.yaml", PROMPTS)  # 4 rows: 4 experts, or 8 experts / G = 2 -> 4 replicas
    plan = convert(str(src), out, build_spec(router_init="hidden", expert_prompts=str(path), **spec)).plan
    assert plan.exact is exact, plan.exact_text
    dense_logits, _, _ = run_model(src)
    moe_logits, _, info = run_model(out)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    diff = (dense_logits - moe_logits).abs().max().item()
    assert diff <= 1e-5 if exact else diff > 1e-4, diff


def test_deterministic_and_recorded(dense_store, prompts_file, tmp_path):
    src = dense_store("qwen2")
    spec = build_spec(router_init="hidden", expert_prompts=str(prompts_file), experts=4)
    convert(str(src), tmp_path / "a", spec)
    convert(str(src), tmp_path / "b", spec)
    assert shard_hashes(tmp_path / "a") == shard_hashes(tmp_path / "b")
    text = (tmp_path / "a" / "upcycle.json").read_text()
    recipe = json.loads(text)
    assert recipe["expert_prompts"]["file"] == "experts.yaml"
    assert recipe["expert_prompts"]["prompts"] == 8 and recipe["expert_prompts"]["tokens"] > 8
    assert recipe["recipe"]["expert_prompts"] == "experts.yaml"
    assert str(tmp_path) not in text and str(tmp_path) not in (tmp_path / "a" / "README.md").read_text()


def test_yaml_file(dense_store, tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("- [code, 'def f(x): return x']\n- - the news\n  - a second prompt\n")
    out = tmp_path / "moe"
    result = convert(
        str(dense_store("llama")), out, build_spec(router_init="hidden", expert_prompts=str(path), experts=2)
    )
    assert json.loads((out / "upcycle.json").read_text())["expert_prompts"]["prompts"] == 4
    assert result.plan.exact


@pytest.mark.parametrize(
    "content, needle",
    [
        (json.dumps(PROMPTS[:3]), "3 experts, but the router has 4"),
        (json.dumps([*PROMPTS, ["x"]]), "5 experts"),
        (json.dumps([*PROMPTS[:3], []]), "expert 3 has no prompts"),
        (json.dumps([*PROMPTS[:3], ["ok", ""]]), "not a non-empty string"),
        (json.dumps([*PROMPTS[:3], ["ok", 7]]), "not a non-empty string"),
        (json.dumps({"experts": PROMPTS}), "must be a YAML list"),
        (json.dumps(["a", "b", "c", "d"]), "must be a YAML list"),
        ("- [unclosed\n- x: [", "not valid YAML"),
        (b"\xff\xfe\x00garbage", "not UTF-8"),
        ("", "must be a YAML list"),
    ],
)
def test_bad_prompt_files(content, needle, capsys, dense_store, tmp_path):
    path, out = tmp_path / "bad.yaml", tmp_path / "out"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    argv = ["convert", dense_store("llama"), out, "--experts", "4", "--router-init", "hidden"]
    line = expect_error(capsys, [*argv, "--expert-prompts", path], needle)
    assert str(tmp_path) not in line
    assert_clean(out)


def test_fine_grained_wants_one_list_per_replica(capsys, dense_store, prompts_file, tmp_path):
    out = tmp_path / "out"
    argv = ["convert", dense_store("llama"), out, "--init", "fine-grained", "--granularity", "2", "--experts", "4"]
    argv += ["--router-init", "hidden", "--expert-prompts", prompts_file]
    expect_error(capsys, argv, "replica rows (--experts / --granularity = 2)")
    assert_clean(out)


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--router-init", "hidden"], "needs --expert-prompts"),
        (["--expert-prompts", "PROMPTS"], "applies to --router-init hidden"),
        (["--router-init", "hidden", "--expert-prompts", "MISSING"], "no such file"),
    ],
)
def test_bad_flags(flags, needle, capsys, dense_store, prompts_file, tmp_path):
    out = tmp_path / "out"
    flags = [{"PROMPTS": prompts_file, "MISSING": tmp_path / "none.yaml"}.get(f, f) for f in flags]
    expect_error(capsys, ["convert", dense_store("llama"), out, "--experts", "4", *flags], needle)
    assert_clean(out)

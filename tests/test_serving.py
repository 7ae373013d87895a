"""`convert --serve ENGINE[,ENGINE]` (issue 22): the layout the named engines need, written only where it keeps the
MoE exactly what it is in transformers; the plan's verdicts; one-line refusals; --target auto's fallbacks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_bad_input import assert_clean, expect_error
from transformers import AutoModelForCausalLM

from upcycle.convert.serving import GATE_FILL, SHARED_PAD, parse_serve
from upcycle_cli.main import run

IDS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(3))


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out |= load_file(shard)
    return out


def logits(folder: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def convert(src: Path, out: Path, *flags: str) -> dict:
    plan = out.parent / f"{out.name}.json"
    assert run(["convert", str(src), str(out), "--experts", "4", "--top-k", "2", *flags, "--json", str(plan)]) == 0
    return json.loads(plan.read_text())


LLAMA_CPP_QWEN2 = ["--target", "qwen2_moe", "--routing", "softmax-topk", "--router-init", "zero"]


@pytest.mark.parametrize("shared", [False, True])
def test_qwen2_moe_for_llama_cpp_is_exact_in_transformers(shared, dense_store, tmp_path):
    """The zero shared expert of width 64 (none asked for), the 2^-64 gate and the untied head change no logit."""
    src = dense_store("llama", tie_word_embeddings=True)
    extra = ["--shared-experts", "1"] if shared else []
    convert(src, tmp_path / "plain", *LLAMA_CPP_QWEN2, *extra)
    plan = convert(src, tmp_path / "gguf", *LLAMA_CPP_QWEN2, *extra, "--serve", "llama.cpp")
    got, before = tensors(tmp_path / "gguf"), tensors(tmp_path / "plain")
    gate = got["model.layers.0.mlp.shared_expert_gate.weight"]
    assert torch.all(gate == GATE_FILL) and torch.all(before["model.layers.0.mlp.shared_expert_gate.weight"] == 0)
    assert torch.equal(got["lm_head.weight"], got["model.embed_tokens.weight"]) and "lm_head.weight" not in before
    config = json.loads((tmp_path / "gguf" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["norm_topk_prob"] is False
    width = got["model.layers.0.mlp.shared_expert.down_proj.weight"].shape[1]
    if not shared:
        assert width == SHARED_PAD == config["shared_expert_intermediate_size"]
        assert not got["model.layers.0.mlp.shared_expert.down_proj.weight"].any()
        assert before["model.layers.0.mlp.shared_expert.down_proj.weight"].shape[1] == 0
    dense, moe = logits(src), logits(tmp_path / "gguf")
    assert torch.equal(moe, logits(tmp_path / "plain"))  # bit for bit what the plain layout computes
    assert (moe - dense).abs().max().item() < 1e-5
    verdicts = {v["engine"]: v for v in plan["serving"]}
    assert verdicts["llama.cpp"]["loads"] and verdicts["llama.cpp"]["evidence"] == "tested"
    assert verdicts["transformers"]["loads"]
    # verify rebuilds the plan from upcycle.json's recipe (serve included) and checks every tensor's bytes
    assert run(["verify", str(src), str(tmp_path / "gguf"), "--layerwise", "--no-record"]) == 0


def test_gate_fill_sigmoid_is_exactly_one_half():
    """What the 2^-64 gate relies on: sigmoid(2^-64 * s) rounds to 1/2 for any plausible sum s of the inputs."""
    s = torch.cat([torch.logspace(-18, 6, 200), -torch.logspace(-18, 6, 200)])
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.tensor(GATE_FILL, dtype=dtype) * s.to(dtype)).to(dtype)
        assert torch.all(x != 0)  # llama.cpp's silu(x)/x is not 0/0
        assert torch.all(torch.sigmoid(x) == 0.5)


def test_vllm_gets_explicit_zero_qkv_biases(dense_store, tmp_path):
    src = dense_store("llama")
    plan = convert(src, tmp_path / "moe", "--target", "qwen2_moe", "--serve", "vllm")
    got = tensors(tmp_path / "moe")
    assert json.loads((tmp_path / "moe" / "config.json").read_text())["qkv_bias"] is True
    for p in "qkv":
        bias = got[f"model.layers.1.self_attn.{p}_proj.bias"]
        assert bias.shape == (got[f"model.layers.1.self_attn.{p}_proj.weight"].shape[0],) and not bias.any()
    assert (logits(tmp_path / "moe") - logits(src)).abs().max().item() < 1e-5
    assert "q/k/v biases are written as zeros" in " ".join(plan["notes"])
    assert {v["engine"]: v["loads"] for v in plan["serving"]} == {
        "transformers": True, "llama.cpp": False, "vllm": True, "sglang": True,
    }  # fmt: skip


def test_default_serve_writes_what_it_always_wrote(dense_store, tmp_path):
    src = dense_store("qwen2")
    plan = convert(src, tmp_path / "moe", "--target", "qwen2_moe")
    got = tensors(tmp_path / "moe")
    assert got["model.layers.0.mlp.shared_expert.down_proj.weight"].shape[1] == 0
    verdicts = {v["engine"]: v for v in plan["serving"]}
    assert verdicts["transformers"]["loads"] and not verdicts["llama.cpp"]["loads"]
    assert "renormalises" in verdicts["llama.cpp"]["why"]
    card = (tmp_path / "moe" / "README.md").read_text()
    assert "| Runs in | transformers (native), vllm (from reading its code)" in card
    assert "not llama.cpp (its Qwen2-MoE never renormalises" in card


def test_dry_run_says_where_it_runs(dense_store, tmp_path, capsys):
    src = dense_store("llama")
    out = tmp_path / "moe"
    assert run(["convert", str(src), str(out), "--experts", "4", "--serve", "llama.cpp,vllm", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "runs in llama.cpp" in text and "runs in vllm" in text and "runs in sglang" in text
    assert not out.exists()


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--serve", "tensorrt"], "--serve 'tensorrt' is not an engine upcycle knows; name one or more of:"),
        (["--serve", ","], "--serve is empty"),
        (["--target", "qwen2_moe", "--serve", "llama.cpp"], "use --routing softmax-topk --router-init zero"),
        (["--every", "2", "--serve", "llama.cpp"], "use --every 1 (every layer MoE, no --layers)"),
        (["--target", "generic", "--serve", "vllm"], "--serve vllm: generic output would not run in vllm"),
        (["--target", "qwen2_moe", "--every", "2", "--serve", "sglang"], "makes every layer sparse"),
        ([*LLAMA_CPP_QWEN2, "--serve", "llama.cpp", "--dtype", "float16"], "use --dtype bfloat16 or float32"),
        # auto: mixtral has no shared expert and qwen2_moe needs llama.cpp's routing; the line names that routing
        (["--shared-experts", "1", "--serve", "llama.cpp"], "qwen2_moe output would not run in llama.cpp"),
    ],
)
def test_serve_refusals_are_one_line(flags, needle, dense_store, tmp_path, capsys):
    out = tmp_path / "moe"
    line = expect_error(capsys, ["convert", dense_store("llama"), out, "--experts", "4", *flags], needle)
    assert needle in line
    assert_clean(out)


@pytest.mark.parametrize(
    ("family", "overrides", "needle"),
    [
        ("gemma", {}, "activation is not silu"),  # llama.cpp's MoE graphs are SiLU whatever hidden_act says
        ("mistral", {"sliding_window": 8}, "read no sliding window"),
    ],
)
def test_llama_cpp_refuses_what_its_graphs_compute_otherwise(family, overrides, needle, dense_store, tmp_path, capsys):
    """A Gemma (GELU) or windowed Mistral source becomes a Mixtral that transformers runs exactly, but llama.cpp's
    graph would compute something else: the plan says so, and --serve llama.cpp is refused in one line."""
    src = dense_store(family, **overrides)
    plan = convert(src, tmp_path / "moe")
    assert plan["target"] == "mixtral"
    (row,) = [s for s in plan["serving"] if s["engine"] == "llama.cpp"]
    assert not row["loads"] and needle in row["why"]
    line = expect_error(capsys, ["convert", src, tmp_path / "no", "--experts", "4", "--serve", "llama.cpp"], needle)
    assert "--serve llama.cpp: mixtral output would not run in llama.cpp" in line
    assert_clean(tmp_path / "no")


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
def test_fused_moe_engines_refuse_a_gelu_model(engine, dense_store, tmp_path, capsys):
    """vLLM's and SGLang's fused MoE kernels are SiLU whatever hidden_act says: a Gemma (GELU) MoE, which
    transformers runs exactly, would compute something else there, so the plan says so and --serve is refused."""
    src = dense_store("gemma")
    plan = convert(src, tmp_path / "moe")
    (row,) = [s for s in plan["serving"] if s["engine"] == engine]
    assert not row["loads"] and "activation is not silu" in row["why"]
    line = expect_error(capsys, ["convert", src, tmp_path / "no", "--experts", "4", "--serve", engine], "not silu")
    assert f"--serve {engine}: mixtral output would not run in {engine}" in line
    assert_clean(tmp_path / "no")
    llama = convert(dense_store("llama"), tmp_path / "llama")  # a SiLU model still loads there
    assert [s["loads"] for s in llama["serving"] if s["engine"] == engine] == [True]


def test_auto_refusal_names_flags_that_work(dense_store, tmp_path, capsys):
    """The flags an auto refusal names give an output that runs there (here: qwen2_moe with llama.cpp's routing)."""
    src = dense_store("llama")
    flags = ["--shared-experts", "1", "--serve", "llama.cpp"]
    line = expect_error(capsys, ["convert", src, tmp_path / "no", "--experts", "4", *flags], "use --routing")
    named = line.split("; use ")[-1].split(" (")[0].split()
    assert named == ["--routing", "softmax-topk", "--router-init", "zero"]
    plan = convert(src, tmp_path / "moe", *flags, *named)
    assert plan["target"] == "qwen2_moe"
    assert [s["loads"] for s in plan["serving"] if s["engine"] == "llama.cpp"] == [True]
    assert run(["verify", str(src), str(tmp_path / "moe"), "--no-record"]) == 0


def test_parse_serve_orders_and_dedupes():
    assert parse_serve("vllm,llama.cpp, vllm") == ("llama.cpp", "vllm")
    assert parse_serve(["sglang", "transformers"]) == ("transformers", "sglang")
    assert parse_serve(None) == ("transformers",)


@pytest.mark.parametrize(
    ("family", "flags", "target"),
    [
        ("granite", ["--every", "2"], "generic"),
        ("olmo2", ["--layers", "1,3"], "generic"),
        ("hunyuan_v1_dense", ["--shared-experts", "1"], "generic"),
        ("llama", ["--shared-experts", "1"], "qwen2_moe"),  # mixtral has no shared expert: auto's next native class
    ],
)
def test_auto_falls_back_to_a_target_that_holds_the_request(family, flags, target, dense_store, tmp_path):
    src = dense_store(family)
    plan = convert(src, tmp_path / "moe", *flags)
    assert plan["target"] == target
    assert any(n.startswith(f"--target auto wrote {target}, since ") for n in plan["notes"])
    assert run(["verify", str(src), str(tmp_path / "moe"), "--no-record"]) == 0

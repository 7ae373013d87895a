"""The Python API (`from upcycle import convert, verify, ...`) without the CLI, on tiny models: real numbers."""

from __future__ import annotations

import inspect as pyinspect
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import upcycle
from upcycle import ConvertSpec, UpcycleError, convert, inspect, push, routing, train, verify


def _logits(folder, ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def test_convert_then_verify_through_the_api(dense, tmp_path):
    src = dense("llama")
    out = tmp_path / "moe"
    result = convert(str(src), out, experts=4, top_k=2, every=2)
    assert result.plan.experts == 4 and result.plan.top_k == 2 and result.plan.moe_layers == (1, 3)
    recipe = json.loads((out / "upcycle.json").read_text())
    assert recipe["recipe"]["experts"] == 4 and recipe["plan"]["tensors"] == len(result.plan.ops)
    # clone init is exact: the MoE's logits are the dense model's (computed here, not by verify)
    ids = torch.randint(0, 100, (1, 24), generator=torch.Generator().manual_seed(0))
    diff = (_logits(src, ids) - _logits(out, ids)).abs().max().item()
    assert diff <= 1e-5
    report = verify(str(src), out, tokens=32, mode="whole")
    assert report.passed and report.mode == "whole" and report.top1_agreement == 1.0
    assert report.max_abs_diff <= 1e-5 and not report.missing_keys and not report.unexpected_keys
    info = inspect(out)
    assert info["kind"] == "moe" and info["experts"] == 4 and info["moe_layers"] == [1, 3]
    files = push(out, "me/tiny-moe", dry_run=True)
    on_disk = {p.relative_to(out).as_posix(): p.stat().st_size for p in out.rglob("*") if p.is_file()}
    assert dict(files.files) == on_disk and files.total_bytes == sum(on_disk.values())


def test_a_spec_or_its_options_not_both(dense, tmp_path):
    src = dense("llama")
    plan = convert(str(src), tmp_path / "moe", ConvertSpec(experts=2, top_k=1), dry_run=True).plan
    assert plan.experts == 2 and plan.top_k == 1 and not (tmp_path / "moe").exists()
    with pytest.raises(UpcycleError, match="not both"):
        convert(str(src), tmp_path / "moe", ConvertSpec(), experts=2)
    with pytest.raises(UpcycleError, match="unknown"):
        convert(str(src), tmp_path / "moe", expertz=2, dry_run=True)
    with pytest.raises(UpcycleError, match="--text FILE"):
        routing(tmp_path / "no-such-moe", tmp_path / "report")


def test_train_dry_run_through_the_api(dense, tmp_path):
    src = dense("llama")
    moe = tmp_path / "moe"
    convert(str(src), moe, experts=4)
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    result = train(moe, tmp_path / "run", data=str(text), steps=3, micro_batch=2, seq_len=16, dry_run=True)
    plan = result.plan.to_dict()
    assert plan["steps"] == 3 and plan["experts"] == 4 and plan["tokens_per_step"] == 2 * 16
    assert not (tmp_path / "run").exists()


def test_the_packages_stay_packages_and_call_the_api():
    import upcycle.convert.pipeline as pipeline  # the subpackage still imports as before
    from upcycle import api

    assert pipeline.convert is not api.convert
    assert upcycle.convert.__wrapped__ is api.convert and upcycle.train.__wrapped__ is api.train
    assert pyinspect.signature(upcycle.convert) == pyinspect.signature(api.convert)
    for function in (api.convert, api.verify, api.inspect, api.routing, api.train, api.push):
        assert function.__doc__ and pyinspect.signature(function).return_annotation != pyinspect.Signature.empty


def test_the_cli_calls_the_api(dense, tmp_path, monkeypatch):
    """Each command goes through upcycle.api: a stand-in there is what `upcycle convert` runs."""
    from upcycle import api
    from upcycle_cli.main import run

    seen = []
    real = api.convert

    def spy(*args, **kwargs):
        seen.append(kwargs.get("dry_run"))
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "convert", spy)
    assert run(["convert", str(dense("llama")), str(tmp_path / "moe"), "--experts", "2", "--dry-run"]) == 0
    assert seen == [True]


def test_one_dtype_vocabulary_everywhere():
    """Both spellings are accepted by every option; each spec keeps the spelling its outputs have always had."""
    from upcycle import build_spec, build_train_spec

    for given in ("bf16", "bfloat16"):
        assert build_spec(None, dtype=given).dtype == "bfloat16"
        assert build_train_spec(None, dtype=given, data="x", steps=1).dtype == "bf16"
    assert build_spec(None, dtype="fp16").dtype == "float16" and build_spec(None, dtype="float32").dtype == "float32"
    assert build_train_spec({"dtype": "float32"}, data="x", steps=1).dtype == "fp32"
    with pytest.raises(UpcycleError, match="--dtype 'fp8' is not one of"):
        build_spec(None, dtype="fp8")
    with pytest.raises(UpcycleError, match="unknown key 'expertz' in the recipe"):
        build_spec({"expertz": 2})
    with pytest.raises(UpcycleError, match="unknown key 'stepz' in the run config"):
        build_train_spec({"stepz": 2})


def test_verify_accepts_the_short_dtype_names(dense, tmp_path):
    src = dense("llama")
    out = tmp_path / "moe"
    convert(str(src), out, experts=2, top_k=1)
    report = verify(str(src), out, tokens=16, dtype="bf16", mode="whole")
    assert report.dtype == "bfloat16" and report.passed


def test_one_reproducing_command_and_one_public_name(dense, tmp_path):
    """convert's and train's recorded commands come from one builder, naming local paths by their last part."""
    from upcycle.options import command_line
    from upcycle.source import public_name
    from upcycle.train.export import training_command

    src = dense("llama")
    out = tmp_path / "moe"
    convert(str(src), out, experts=4, layers="1,3", router_std=0.05)
    command = json.loads((out / "upcycle.json").read_text())["command"]
    assert command == f"upcycle convert {src.name} moe --experts 4 --layers 1,3 --router-std 0.05"
    assert str(tmp_path) not in command and public_name(str(src)) == src.name
    assert public_name("org/name") == "org/name" and public_name("smollm2") == "smollm2"
    spec = upcycle.build_train_spec(None, data=str(tmp_path / "moe" / "config.json"), steps=5, tensorboard=True)
    assert training_command(str(out), tmp_path / "run", spec) == (
        "upcycle train moe --out run --data config.json --steps 5 --tensorboard"
    )
    options = {"a": None, "b": 2, "c": False, "d_e": [1, 2]}
    assert command_line(["x"], options, {"b": 1, "c": False}) == "x --b 2 --d-e 1,2"

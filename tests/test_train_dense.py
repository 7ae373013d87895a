"""`upcycle train` on a dense model: the same loop, data, schedule and checkpoints as for an MoE, with no routers
(no router loss terms, no load records), so that the dense baseline of every comparison trains in the same loop."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from upcycle.train import loop
from upcycle.train.metrics import read_metrics
from upcycle.train.spec import build_train_spec
from upcycle_cli.main import run

SMALL = dict(seq_len=32, micro_batch=4, log_every=1, lr=3e-3)
CLOCK = {"tokens_per_s": None, "time": None, "elapsed_s": None}


@pytest.fixture(scope="module")
def text(jargon_text, tmp_path_factory) -> Path:
    head = jargon_text.read_text()[:40_000]
    path = tmp_path_factory.mktemp("text") / "jargon.txt"
    path.write_text(head[: head.rindex("\n\n")] + "\n")
    return path


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as fh:
            out |= {k: fh.get_tensor(k) for k in fh.keys()}
    return out


def test_a_dense_model_trains_and_resumes_exactly(dense_store, text, tmp_path):
    src = dense_store("llama")
    options = dict(data=str(text), steps=8, save_every=4, eval_every=4, keep_last=2, **SMALL)
    a = tmp_path / "a"
    result = loop.train(str(src), a, build_train_spec(**options))
    plan, summary = result.plan, result.summary
    assert plan.dense and plan.moe_layers == () and plan.experts == 0 and plan.architecture == "LlamaForCausalLM"
    assert plan.params_trainable == plan.params_total > 0
    records = read_metrics(a)
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 9))
    for r in train:  # no router terms and no load: the loss is the LM loss alone
        assert r["loss"] == r["lm"] and "balance" not in r and "z" not in r and "layers" not in r
    assert train[-1]["loss"] < train[0]["loss"] - 0.3  # 4.84 -> 4.41 in 8 steps of 128 tokens
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [4, 8] and all("layers" not in r for r in evals)
    assert evals[-1]["loss_on"] == "all tokens"
    assert not any(r["kind"] == "divergence" for r in records)
    assert summary["expert_load"] == [] and summary["expert_load_tokens"] is None
    assert not (a / "load.png").exists()
    recipe = json.loads((a / "final" / "upcycle.json").read_text())["training"]["recipe"]
    assert "aux_loss_coef" not in recipe and "jitter" not in recipe and recipe["train"] == "all"
    final = AutoModelForCausalLM.from_pretrained(a / "final")
    assert type(final).__name__ == "LlamaForCausalLM"
    assert tensors(a / "final").keys() == tensors(src).keys()
    assert any(not torch.equal(tensors(a / "final")[k], tensors(src)[k]) for k in tensors(src))

    b = tmp_path / "b"  # killed after step 4: the resumed steps 5-8 equal the uninterrupted run's, bit for bit
    shutil.copytree(a, b)
    shutil.rmtree(b / "checkpoints" / "step-8")
    shutil.rmtree(b / "final")
    resumed = loop.train(str(src), b, build_train_spec(**options), resume=True)
    assert resumed.summary["resumed_from"] == 4
    again = [r for r in read_metrics(b) if r["kind"] == "train"]
    assert [r["step"] for r in again] == list(range(1, 9))
    for r, s in zip(train, again, strict=True):
        assert {**r, **CLOCK} == {**s, **CLOCK}
    a_final, b_final = tensors(a / "final"), tensors(b / "final")
    assert all(torch.equal(a_final[k], b_final[k]) for k in a_final)


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--train", "experts"], "--train"),
        (["--jitter", "0.01"], "--jitter"),
        (["--capacity-factor", "1.0"], "--capacity-factor"),
        (["--router-noise"], "--router-noise"),
    ],
)
def test_routing_options_on_a_dense_model_are_refused(extra, named, dense_store, text, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", str(dense_store("llama")), "--data", str(text), "--out", str(out), "--steps", "2", *extra]
    capsys.readouterr()
    assert run(args) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "dense llama model" in err and named in err and "Traceback" not in err
    assert not out.exists()


def test_dry_run_of_a_dense_model(dense_store, text, capsys):
    capsys.readouterr()
    args = ["train", str(dense_store("llama")), "--data", str(text), "--steps", "3", "--dry-run", "--json", "-"]
    assert run(args) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["moe_layers"] == [] and plan["experts"] == 0 and plan["experts_impl"] == "none (dense)"
    assert plan["memory"]["fits"] and all("--train" not in o["flags"] for o in plan["memory"]["options"])

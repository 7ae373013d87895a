"""`upcycle train` on a machine that may be too small: the memory check before loading (refusal with the options
that fit, --force-memory, the dry run's verdict), Adafactor, no optimizer state for frozen parameters, the warning
for --train router on identical experts, the save/eval cadence and metrics.jsonl's timestamps."""

from __future__ import annotations

import json
import math
import shutil
from datetime import datetime
from pathlib import Path

import pytest
import torch
from test_train import cli, moe_store, tensors, text, train, train_records  # noqa: F401  (fixtures)

from upcycle.convert.pipeline import convert
from upcycle.convert.spec import build_spec
from upcycle.errors import UpcycleError
from upcycle.train import loop
from upcycle.train import setup as train_setup
from upcycle.train.checkpoint import checkpoints
from upcycle.train.distributed import destroy, init_distributed
from upcycle.train.memory import GiB
from upcycle.train.metrics import read_metrics
from upcycle.train.optim import (
    HELD_8BIT_CPU,
    QMAPS_8BIT,
    check_optimizer,
    eight_bit_available,
    optimizer_state_bytes,
    state_bytes,
)
from upcycle.train.setup import read_source, setup
from upcycle.train.spec import build_train_spec, default_every
from upcycle.train.step import train_step

BASE = ["--steps", "2", "--seq-len", "32", "--micro-batch", "2"]


def planned_total(model: Path, text_path: Path, **options) -> int:
    spec = build_train_spec(data=str(text_path), steps=2, seq_len=32, micro_batch=2, **options)
    return loop.train(str(model), None, spec, dry_run=True).plan.memory.estimate.total


@pytest.fixture
def tight(moe_store, text):  # noqa: F811
    """(model, --gpu-mem in GiB) where the default run does not fit and --optimizer adafactor does."""
    model = moe_store("mixtral")
    adamw, adafactor = planned_total(model, text), planned_total(model, text, optimizer="adafactor")
    assert adafactor < adamw
    return model, f"{(adamw + adafactor) / 2 / GiB:.12f}"


def test_a_run_that_does_not_fit_is_refused_before_loading(tight, text, tmp_path, capsys, monkeypatch):  # noqa: F811
    model, gib = tight

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(train_setup, "load_model", no_loading)
    out = tmp_path / "run"
    code, _, err = cli(["train", str(model), "--data", str(text), "--out", str(out), *BASE, "--gpu-mem", gib], capsys)
    assert code == 2, err
    assert err.startswith("error: this run needs about ") and err.count("\n") == 1 and "Traceback" not in err
    assert f"GiB is available (--gpu-mem {float(gib):g} GiB)" in err
    assert "--optimizer adafactor (" in err and "--force-memory" in err
    assert "--train router (" in err  # a frozen expert saves its gradient and its optimizer state
    assert not out.exists()


def test_force_memory_starts_anyway_with_a_note(tight, text, tmp_path, capsys):  # noqa: F811
    model, gib = tight
    out = tmp_path / "run"
    args = ["train", str(model), "--data", str(text), "--out", str(out), *BASE, "--gpu-mem", gib, "--force-memory"]
    code, _, err = cli(args, capsys)
    assert code == 0, err
    assert "note: this run needs about" in err and "starting anyway (--force-memory)" in err
    assert (out / "final" / "config.json").is_file()
    # the option that fits, taken: the run starts without a note
    code, _, err = cli([*args[:-1], "--optimizer", "adafactor", "--force"], capsys)
    assert code == 0 and "needs about" not in err, err


def test_dry_run_says_it_does_not_fit_and_what_would(tight, text, capsys):  # noqa: F811
    model, gib = tight
    args = ["train", str(model), "--data", str(text), *BASE, "--gpu-mem", gib, "--dry-run"]
    code, out, err = cli(args, capsys)
    assert code == 0  # a plan, not a run: it reports and exits 0
    assert "does NOT fit" in " ".join(out.split())
    line = next(line for line in err.splitlines() if "does not fit" in line)
    assert line.startswith("note: does not fit, so a run would be refused: this run needs about ")
    assert "--optimizer adafactor (" in line and "--force-memory" in line
    code, out, _ = cli([*args, "--json", "-"], capsys)
    mem = json.loads(out[out.index("{") :])["memory"]
    assert mem["fits"] is False and mem["phase"] in ("load", "step", "save")
    flags = {o["flags"]: o["total"] for o in mem["options"]}
    assert flags["--optimizer adafactor"] == planned_total(model, text, optimizer="adafactor") <= float(gib) * GiB
    assert all(total <= float(gib) * GiB for total in flags.values())


def test_estimate_counts_the_real_optimizer_state_and_the_weight_files(moe_store, text):  # noqa: F811
    from transformers import AutoModelForCausalLM

    model = moe_store("mixtral")
    plan = loop.train(str(model), None, build_train_spec(data=str(text), steps=2, optimizer="adafactor"), dry_run=True)
    est = plan.plan.memory.estimate
    net = AutoModelForCausalLM.from_pretrained(model)
    assert est.optimizer == optimizer_state_bytes(net.parameters(), "adafactor")
    assert est.optimizer < sum(p.numel() for p in net.parameters()) * 8 / 4  # factored: far below AdamW's 8 B
    files = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    assert files > 0 and est.mapped == 0  # an fp32 checkpoint: its mapped pages are the weights, counted once
    # Mixtral's files hold each expert's tensors; loading stacks them into new [experts, ...] tensors, which sit
    # beside the file pages they were read from until it ends (upcycle/pages.py gives those back then)
    stacked = sum(p.numel() for n, p in net.named_parameters() if ".experts." in n) * 4
    assert stacked > 0 and est.load_extra == stacked
    assert est.load_peak == est.runtime + est.weights + stacked
    assert est.total == max(est.load_peak, est.step_peak(False), est.save_peak)


def _run(model: Path, out: Path, **options):
    env = init_distributed()
    spec = build_train_spec(**{"seq_len": 32, "micro_batch": 2, "steps": 2, **options})
    run = setup(read_source(str(model), out, spec, env, dry_run=False), out, spec, env, resume=False, force=False,
                note=lambda _: None)  # fmt: skip
    return env, run


HAS_BNB = eight_bit_available()
NEEDS_BNB = pytest.mark.skipif(not HAS_BNB, reason="needs bitsandbytes (pip install 'upcycle[adamw8bit]')")
EIGHT_BIT = pytest.param("adamw8bit", marks=NEEDS_BNB)


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor", EIGHT_BIT])
def test_frozen_parameters_get_no_gradient_and_no_optimizer_state(optimizer, moe_store, text, tmp_path):  # noqa: F811
    held = {}
    for what in ("all", "router"):
        env, run = _run(moe_store("mixtral"), tmp_path / what, data=str(text), train=what, optimizer=optimizer)
        try:
            train_step(run, 1)
            frozen = [p for p in run.model.parameters() if not p.requires_grad]
            assert all(p.grad is None for p in frozen)
            states = run.optimizer.state
            assert not any(p in states for p in frozen)
            trainable = [p for p in run.model.parameters() if p.requires_grad]
            assert all(p in states for p in trainable)
            # each tensor once: AdamW8bit's quantile maps are shared by every parameter
            held_tensors = [t for s in states.values() for t in s.values() if torch.is_tensor(t) and t.ndim]
            tensors_held = {t.data_ptr(): t for t in held_tensors}
            nbytes = sum(t.numel() * t.element_size() for t in tensors_held.values())
            assert nbytes == optimizer_state_bytes(trainable, optimizer)
            maps = QMAPS_8BIT if optimizer == "adamw8bit" and any(p.numel() >= 4096 for p in trainable) else 0
            assert nbytes == sum(state_bytes(tuple(p.shape), optimizer) for p in trainable) + maps
            held[what] = nbytes
            if optimizer == "adamw8bit" and what == "all":  # 1-byte moments for every tensor of 4096+ elements
                big = [p for p in trainable if p.numel() >= 4096]
                assert big and all(states[p][k].dtype == torch.uint8 for p in big for k in ("state1", "state2"))
                held["params"] = sum(p.numel() for p in trainable)
        finally:
            destroy(env)
    assert held["router"] * (100 if optimizer == "adamw" else 10) < held["all"]
    if optimizer == "adamw8bit":  # the tiny model's many small tensors keep fp32 moments: still under 3 B/param
        assert held["all"] < 3 * held["params"]


@pytest.mark.parametrize(("optimizer", "lr"), [("adafactor", 1e-2), pytest.param("adamw8bit", 3e-3, marks=NEEDS_BNB)])
def test_light_optimizers_train_and_resume_exactly(optimizer, lr, moe_store, text, tmp_path):  # noqa: F811
    model = moe_store("mixtral")
    whole = tmp_path / "whole"
    options = dict(data=str(text), steps=6, save_every=3, eval_every=3, optimizer=optimizer, lr=lr, keep_last=3)
    train(model, whole, **options)
    records = train_records(whole)
    assert records[-1]["lm"] < records[0]["lm"]
    before, after = tensors(model), tensors(whole / "final")
    assert any(not torch.equal(before[k], after[k]) for k in before if k in after)
    # the same run, continued from its step-3 checkpoint
    part = tmp_path / "part"
    shutil.copytree(whole, part)
    shutil.rmtree(part / "final")
    for step, folder in checkpoints(part):
        if step > 3:
            shutil.rmtree(folder)
    loop.train(str(model), part, build_train_spec(**{**dict(seq_len=32, micro_batch=4, log_every=1), **options}),
               resume=True)  # fmt: skip
    got = train_records(part)
    for key in ("loss", "lm", "grad_norm", "lr"):
        assert [r[key] for r in got if r["step"] > 3] == [r[key] for r in records if r["step"] > 3], key
    a, b = tensors(whole / "final"), tensors(part / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_another_optimizer(moe_store, text, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    train(moe_store("mixtral"), out, data=str(text), steps=4, save_every=2, micro_batch=2)
    shutil.rmtree(out / "final")
    for step, folder in checkpoints(out):
        if step > 2:
            shutil.rmtree(folder)
    args = ["train", str(moe_store("mixtral")), "--data", str(text), "--out", str(out), "--resume", "--steps", "4"]
    args += ["--seq-len", "32", "--micro-batch", "2", "--optimizer", "adafactor"]
    code, _, err = cli(args, capsys)
    assert code == 2 and "--optimizer is 'adafactor' but the run" in err and "'adamw'" in err, err


def test_router_on_identical_experts_warns_before_the_run(moe_store, dense_store, text, tmp_path, capsys):  # noqa: F811
    model = moe_store("mixtral")  # cloned experts, no noise
    base = ["train", str(model), "--data", str(text), *BASE]
    code, _, err = cli([*base, "--out", str(tmp_path / "r"), "--train", "router"], capsys)
    assert code == 0
    warning = next(line for line in err.splitlines() if "identical copies" in line)
    assert warning.startswith("note: --train router") and "--train all" in warning and "--noise" in warning
    assert err.index("identical copies") < err.index("step 1/")  # before the first step
    code, _, err = cli([*base, "--out", str(tmp_path / "a"), "--train", "all"], capsys)
    assert code == 0 and "identical copies" not in err
    noisy = tmp_path / "noisy"
    convert(str(dense_store("llama")), noisy, build_spec(experts=4, top_k=2, noise=0.01))
    code, _, err = cli(["train", str(noisy), "--data", str(text), *BASE, "--out", str(tmp_path / "n"),
                        "--train", "router"], capsys)  # fmt: skip
    assert code == 0 and "identical copies" not in err


def test_eval_every_zero_skips_evaluation(moe_store, text, tmp_path):  # noqa: F811
    """(On the Qwen2-MoE with its size-0 shared expert, under Adafactor, which once divided by that size.)"""
    out = tmp_path / "run"
    result = train(moe_store("qwen2_moe"), out, data=str(text), steps=4, eval_every=0, save_every=2,
                   optimizer="adafactor")  # fmt: skip
    kinds = {r["kind"] for r in read_metrics(out)}
    assert "eval" not in kinds and "train" in kinds
    assert result.summary["eval_loss"] is None and result.plan.eval_every == 0
    assert (out / "final" / "config.json").is_file()


def test_metrics_carry_time_and_elapsed_seconds(moe_store, text, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    train(moe_store("mixtral"), out, data=str(text), steps=3, eval_every=3, save_every=3)
    records = read_metrics(out)
    assert {r["kind"] for r in records} >= {"train", "eval", "divergence"}
    times = [datetime.fromisoformat(r["time"]) for r in records]
    assert all(t.utcoffset().total_seconds() == 0 for t in times) and times == sorted(times)
    elapsed = [r["elapsed_s"] for r in records]
    assert elapsed == sorted(elapsed) and elapsed[0] >= 0
    span = (times[-1] - times[0]).total_seconds()
    assert abs((elapsed[-1] - elapsed[0]) - span) <= 1.5  # the same clock, to the second the stamp is cut to


def test_save_and_eval_cadence_scales_with_the_run():
    assert [default_every(n) for n in (1, 20, 50, 51, 100, 499, 500, 1000, 20_000)] == [
        1, 20, 50, 50, 50, 50, 50, 100, 2000,
    ]  # fmt: skip
    spec = build_train_spec(data="x", steps=20)
    assert (spec.every("eval_every", 20), spec.every("save_every", 20)) == (20, 20)
    assert build_train_spec(data="x", steps=20, eval_every=0).every("eval_every", 20) == 0


def test_adamw8bit_without_bitsandbytes_is_one_line_exit_3(moe_store, text, tmp_path, capsys, monkeypatch):  # noqa: F811
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what `import bitsandbytes` meets when not installed
    out = tmp_path / "run"
    args = ["train", str(moe_store("mixtral")), "--data", str(text), "--out", str(out), *BASE]
    code, _, err = cli([*args, "--optimizer", "adamw8bit"], capsys)
    assert code == 3 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("error: --optimizer adamw8bit needs the bitsandbytes package; install it: pip install")
    assert not out.exists()


def test_adamw8bit_is_refused_under_torchrun():
    with pytest.raises(UpcycleError, match="not supported under torchrun") as info:
        check_optimizer("adamw8bit", distributed=True)
    assert info.value.exit_code == 2 and "--optimizer adamw or adafactor" in str(info.value)
    check_optimizer("adafactor", distributed=True)  # the others pass


def test_adamw8bit_state_bytes():
    assert state_bytes((1000, 1000), "adamw8bit") == 2 * (1_000_000 + math.ceil(1_000_000 / 256) * 4)
    assert state_bytes((64, 63), "adamw8bit") == state_bytes((64, 63), "adamw") == 64 * 63 * 8  # under 4096: fp32


@NEEDS_BNB
def test_the_plan_offers_adamw8bit_and_counts_its_state(moe_store, text, capsys):  # noqa: F811
    model = moe_store("mixtral")
    adamw, eight = planned_total(model, text), planned_total(model, text, optimizer="adamw8bit")
    assert eight < adamw
    plan = loop.train(str(model), None, build_train_spec(data=str(text), steps=2, optimizer="adamw8bit"), dry_run=True)
    est = plan.plan.memory.estimate
    from transformers import AutoModelForCausalLM

    net = AutoModelForCausalLM.from_pretrained(model)
    assert est.optimizer == optimizer_state_bytes(net.parameters(), "adamw8bit")
    biggest = max(p.numel() for p in net.parameters())
    held = int(HELD_8BIT_CPU * sum(p.numel() for p in net.parameters()))  # what whole runs held beyond (optim.py)
    assert est.optimizer_step == 6 * biggest * 4 + held  # its CPU step: 6 fp32 copies of one tensor (test_train_memory)
    gib = f"{(adamw + eight) / 2 / GiB:.12f}"
    args = ["train", str(model), "--data", str(text), *BASE, "--gpu-mem", gib, "--dry-run", "--json", "-"]
    code, out, _ = cli(args, capsys)
    flags = {o["flags"]: o["total"] for o in json.loads(out[out.index("{") :])["memory"]["options"]}
    assert code == 0 and flags["--optimizer adamw8bit"] == eight


@pytest.mark.parametrize("what", ["all", "experts"])
def test_no_gradient_is_held_while_a_checkpoint_or_final_is_written(what, moe_store, text, tmp_path, monkeypatch):  # noqa: F811
    """The memory plan's save peak leaves the gradients out (memory.MemoryEstimate.save_peak): true only while
    every step frees them (zero_grad(set_to_none=True)) before the loop saves."""
    from upcycle.train import checkpoint as ckpt_module

    held: list[tuple[str, int]] = []

    def spy(original, name):
        def wrapper(*args, **kwargs):
            held.append((name, sum(p.grad.numel() for p in kwargs["model"].parameters() if p.grad is not None)))
            return original(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(ckpt_module, "save_checkpoint", spy(ckpt_module.save_checkpoint, "checkpoint"))
    monkeypatch.setattr(ckpt_module, "write_final", spy(ckpt_module.write_final, "final"))
    train(moe_store("mixtral"), tmp_path / "run", data=str(text), steps=4, save_every=2, train=what)
    assert held == [("checkpoint", 0), ("checkpoint", 0), ("final", 0)]


def test_the_progress_lines_show_the_phase_and_an_eta(moe_store, text, tmp_path, capsys):  # noqa: F811
    """On a plain console (not a terminal; stderr) every logged step after the first carries an ETA, and evaluating
    and saving are announced before they start, so a long save is not mistaken for a hang (issue 20)."""
    from test_train import _args

    code, _, err = cli(_args(moe_store("mixtral"), text, tmp_path / "run", 4), capsys)
    assert code == 0, err
    lines = err.splitlines()
    steps = [line for line in lines if line.startswith("step ")]
    assert len(steps) == 4 and all(" ETA " in line for line in steps[1:]), steps  # from the second step: a pace
    for n in (2, 4):  # --eval-every 2 --save-every 2
        at = next(i for i, line in enumerate(lines) if line.startswith(f"step {n}/4"))
        assert lines[at + 1] == "evaluating..." and lines[at + 2].startswith(f"eval at step {n}:"), lines[at:]
        assert lines[at + 3] == "saving...", lines[at:]

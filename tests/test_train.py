"""`upcycle train` end to end on tiny converted MoEs and real text: losses, run directory, freezing, exact resume,
bad input. Every run is a few dozen steps of 2-4 sequences of 32 tokens."""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from upcycle.arch import targets
from upcycle.convert.pipeline import convert
from upcycle.convert.spec import build_spec
from upcycle.errors import UpcycleError
from upcycle.train import loop
from upcycle.train.checkpoint import checkpoints, latest_checkpoint
from upcycle.train.metrics import read_metrics
from upcycle.train.optim import lr_factor, param_groups
from upcycle.train.spec import build_train_spec, load_run_config
from upcycle_cli.main import run

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("train-*.yaml"))
TRAIN_FIELDS = ("step", "tokens", "lr", "loss", "lm", "balance", "z", "grad_norm", "tokens_per_s", "layers")
CLOCK = {"tokens_per_s": None, "time": None, "elapsed_s": None}  # what a record says of the clock
SMALL = dict(seq_len=32, micro_batch=4, log_every=1, eval_every=10, save_every=10)


@pytest.fixture(scope="session")
def text(jargon_text, tmp_path_factory) -> Path:
    """The first 60K characters of the Jargon File (whole paragraphs): about 600 held-out tokens, so evals are quick."""
    head = jargon_text.read_text()[:60_000]
    path = tmp_path_factory.mktemp("text") / "jargon.txt"
    path.write_text(head[: head.rindex("\n\n")] + "\n")
    return path


@pytest.fixture(scope="session")
def moe_store(dense_store, tmp_path_factory):
    """moe_store(name) -> a tiny converted MoE: "mixtral" (4 experts, top-2, every layer) or "qwen2_moe"
    (4 experts, top-2, every other layer); "wide-router" is the Mixtral with router std 1 (large logits)."""
    root = tmp_path_factory.mktemp("moe")
    specs = {
        "mixtral": dict(experts=4, top_k=2),
        "qwen2_moe": dict(experts=4, top_k=2, every=2),
        "wide-router": dict(experts=4, top_k=2, router_std=1.0),
    }
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = root / name
            convert(str(dense_store("llama")), made[name], build_spec(**specs[name]))
        return made[name]

    return get


def train(model: Path, out: Path, **options):
    spec = build_train_spec(**{**SMALL, **options})
    return loop.train(str(model), out, spec)


def train_records(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if r["kind"] == "train"]


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as fh:
            out |= {k: fh.get_tensor(k) for k in fh.keys()}
    return out


def cli(args: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()  # what building the fixtures printed
    code = run(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- a run on real text ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_thirty_steps_loss_falls_and_final_loads_natively(name, moe_store, text, tmp_path):
    src = moe_store(name)
    out = tmp_path / "run"
    result = train(src, out, data=str(text), steps=30, lr=3e-3, tensorboard=True)
    records = train_records(out)
    assert [r["step"] for r in records] == list(range(1, 31))
    for r in records:
        assert set(TRAIN_FIELDS) <= set(r), set(TRAIN_FIELDS) - set(r)
        assert all(math.isfinite(r[k]) for k in TRAIN_FIELDS if k != "layers")
        assert r["loss"] == pytest.approx(r["lm"] + 0.01 * r["balance"] + 0.001 * r["z"], rel=1e-6)
    moe_layers = [0, 1, 2, 3] if name == "mixtral" else [1, 3]
    for row in records[-1]["layers"]:
        assert len(row["load"]) == 4 and sum(row["load"]) == pytest.approx(1.0)
        assert {"cv", "dropped"} <= set(row) and row["dropped"] == 0.0
    assert [row["layer"] for row in records[-1]["layers"]] == moe_layers
    first, last = sum(r["lm"] for r in records[:5]) / 5, sum(r["lm"] for r in records[-5:]) / 5
    assert last < first - 0.3, (first, last)
    evals = [r for r in read_metrics(out) if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [10, 20, 30]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert evals[-1]["perplexity"] == pytest.approx(math.exp(evals[-1]["eval_loss"]))
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert [step for step, _ in checkpoints(out)] == [20, 30]  # keep-last 2

    model, info = AutoModelForCausalLM.from_pretrained(out / "final", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert type(model).__name__ == targets()[name].architecture
    assert tensors(out / "final").keys() == tensors(src).keys()  # the same native per-expert layout as convert's
    ids = torch.tensor([[1, 5, 9, 14, 3, 22]])
    ckpt_model = AutoModelForCausalLM.from_pretrained(out / "checkpoints" / "step-30")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ckpt_model(ids).logits)

    recipe = json.loads((out / "final" / "upcycle.json").read_text())
    training = recipe["training"]
    assert training["steps"] == 30 and training["tokens"] == 30 * 4 * 32 and training["datasets"] == ["jargon.txt"]
    assert training["final_eval"]["loss"] == pytest.approx(evals[-1]["eval_loss"])
    assert [row["layer"] for row in training["expert_load"]] == moe_layers
    card = (out / "final" / "README.md").read_text()
    assert "## Training" in card and "jargon.txt" in card
    for published in (card, json.dumps(recipe)):
        assert str(tmp_path) not in published and str(text.parent) not in published
    assert result.summary["eval_loss"] == pytest.approx(evals[-1]["eval_loss"])
    assert result.summary["experts_implementation"] == "grouped_mm"
    assert result.summary["attention_implementation"] == "upcycle_causal_sdpa"  # text: no mask to build
    for saved in (out / "final", out / "checkpoints" / "step-30"):  # a run's choice, not the model's: not saved
        assert "attn_implementation" not in (saved / "config.json").read_text()


def test_cli_prints_summary_and_json(moe_store, text, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", str(moe_store("mixtral")), "--data", str(text), "--out", str(out), "--steps", "4"]
    code, stdout, err = cli([*args, "--seq-len", "32", "--micro-batch", "2", "--log-every", "2", "--json", "-"], capsys)
    assert code == 0, err
    summary = json.loads(stdout)  # with --json -, stdout is the JSON alone; the tables go to stderr
    assert summary["steps"] == 4 and summary["tokens"] == 4 * 2 * 32
    assert len(summary["expert_load"]) == 4 and all(0 <= r["min"] <= r["max"] <= 1 for r in summary["expert_load"])
    assert "final train loss" in err and "most loaded" in err
    assert "experts implementation grouped_mm" in err
    assert "step 2/4" in err and "step 4/4" in err  # plain lines when stderr is not a terminal


# --- router losses change the router ---------------------------------------------------------------------


def _router_logits(folder: Path, text: Path) -> list[torch.Tensor]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(text.read_text()[:2000], return_tensors="pt").input_ids[:, :256]
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        return list(model(ids, output_router_logits=True).router_logits)  # each (T, E)


def test_z_loss_shrinks_router_logits(moe_store, text, tmp_path):
    src = moe_store("wide-router")
    common = dict(data=str(text), steps=15, lr=1e-2, aux_loss_coef=0.0, save_every=15, eval_every=15)
    train(src, tmp_path / "z0", z_loss_coef=0.0, **common)
    train(src, tmp_path / "z1", z_loss_coef=0.1, **common)

    def z(folder: Path) -> float:
        return sum(torch.logsumexp(x, -1).square().mean().item() for x in _router_logits(folder, text)) / 4

    z_start, z_off, z_on = z(src), z(tmp_path / "z0" / "final"), z(tmp_path / "z1" / "final")
    assert z_on < 0.7 * z_off, (z_start, z_off, z_on)


def _prefer_expert_0(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Router rows whose expert 0 row points along the mean router input of x (T, H): its logit ≈ 4 on average."""
    mean = x.mean(0)  # (H,)
    w = weight.clone()  # (E, H)
    w[0] = 4.0 * mean / mean.square().sum()
    return w


def _skewed(src: Path, out: Path, text: Path, rows=_prefer_expert_0) -> Path:
    """A copy of `src` whose routers all prefer expert 0: each layer's router weight is `rows(x, weight)`, x the
    layer's router inputs (T, H) on a stretch of `text` (by default: expert 0's row along their mean)."""
    from transformers import AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src)
    tok = AutoTokenizer.from_pretrained(src)
    ids = tok(text.read_text()[:2000], return_tensors="pt").input_ids[:, :256]
    inputs: dict[int, torch.Tensor] = {}

    def keep(i: int):
        return lambda module, args: inputs.__setitem__(i, args[0].reshape(-1, args[0].shape[-1]))  # (T, H)

    hooks = [layer.mlp.gate.register_forward_pre_hook(keep(i)) for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(ids)
        for h in hooks:
            h.remove()
        for i, layer in enumerate(model.model.layers):
            layer.mlp.gate.weight.copy_(rows(inputs[i], layer.mlp.gate.weight))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    for name in ("upcycle.json", "README.md"):
        shutil.copyfile(src / name, out / name)
    return out


def _loads(folder: Path, text: Path) -> list[torch.Tensor]:
    """Per MoE layer, each expert's share of the top-2 assignments on a fixed stretch of text."""
    shares = []
    for logits in _router_logits(folder, text):
        counts = torch.bincount(logits.topk(2, dim=-1).indices.reshape(-1), minlength=logits.shape[-1]).double()
        shares.append(counts / counts.sum())  # (E,)
    return shares


def _load_cv(folder: Path, text: Path) -> float:
    cvs = [float(share.std(correction=0) / share.mean()) for share in _loads(folder, text)]
    return sum(cvs) / len(cvs)


def test_balance_loss_lowers_load_cv_from_a_skewed_router(moe_store, text, tmp_path):
    src = _skewed(moe_store("mixtral"), tmp_path / "skewed", text)
    # routers only: the cloned experts make the LM loss blind to routing, so only α can move the load
    common = dict(data=str(text), steps=20, lr=0.1, z_loss_coef=0.0, save_every=20, eval_every=20, train="router")
    train(src, tmp_path / "a0", aux_loss_coef=0.0, **common)
    train(src, tmp_path / "a1", aux_loss_coef=1.0, **common)
    assert all(share[0] > 0.4 for share in _loads(src, text))  # expert 0 is in the top-2 of over 80% of the tokens
    cv_start, cv_off, cv_on = (_load_cv(f, text) for f in (src, tmp_path / "a0" / "final", tmp_path / "a1" / "final"))
    assert cv_off == pytest.approx(cv_start, rel=0.05)  # α = 0 leaves the load as it was (Adam moves rounding noise)
    assert cv_on < 0.7 * cv_off, (cv_start, cv_off, cv_on)  # seen: 0.767 -> 0.447
    balance = [r["balance"] for r in train_records(tmp_path / "a1")]
    assert balance[-1] < balance[0]


# --- freezing -------------------------------------------------------------------------------------------


def _kind(key: str, name: str) -> str:
    target = targets()[name]
    import re

    def pattern(template: str) -> str:
        return re.escape(template).replace(r"\{layer\}", r"\d+").replace(r"\{expert\}", r"\d+")

    if any(re.fullmatch(pattern(t), key) for t in target.expert.values()):
        return "experts"
    if re.fullmatch(pattern(target.router), key):
        return "router"
    return "other"


@pytest.mark.parametrize("what", ["experts", "non-experts", "router"])
def test_frozen_tensors_stay_bitwise_equal(what, moe_store, text, tmp_path):
    src = moe_store("mixtral")
    out = tmp_path / "run"
    train(src, out, data=str(text), steps=3, lr=1e-2, train=what, save_every=3, eval_every=3)
    before, after = tensors(src), tensors(out / "final")
    assert before.keys() == after.keys()
    trains = {"experts": {"experts"}, "non-experts": {"router", "other"}, "router": {"router"}}[what]
    changed = {kind: 0 for kind in ("experts", "router", "other")}
    for key in before:
        kind = _kind(key, "mixtral")
        if kind in trains:
            changed[kind] += not torch.equal(before[key], after[key])
        else:
            assert torch.equal(before[key], after[key]), f"{key} ({kind}) changed under --train {what}"
    assert all(changed[kind] > 0 for kind in trains), changed


def test_a_router_checkpoint_holds_the_trained_tensors_only_and_resumes_exactly(moe_store, text, tmp_path, capsys):
    """A --train router checkpoint stores exactly the trainable tensors (the frozen rest is MODEL's, by its sha256);
    a run resumed from it, and its final/, are bit for bit the uninterrupted run's; a changed MODEL is refused."""
    from upcycle.report.routing_run import checkpoint_cosine
    from upcycle.train.frozen import TRAINABLE, source_sha256

    src = tmp_path / "src"  # a copy of its own, changed at the end
    shutil.copytree(moe_store("mixtral"), src)
    options = dict(data=str(text), steps=6, save_every=3, eval_every=6, train="router", lr=1e-2, jitter=0.01)
    options |= dict(keep_last=3)
    whole = tmp_path / "whole"
    train(src, whole, **options)
    step3 = whole / "checkpoints" / "step-3"
    source = tensors(src)
    routers = {k for k in source if _kind(k, "mixtral") == "router"}  # in the files' layout
    model = AutoModelForCausalLM.from_pretrained(src)  # the names of the loaded model's parameters
    router = targets()["mixtral"].modules["router"]
    trainable = {n for n, _ in model.named_parameters() if any(n.startswith(router.format(layer=i)) for i in range(4))}
    with safe_open(step3 / TRAINABLE, "pt") as fh:
        stored = {k: fh.get_tensor(k) for k in fh.keys()}
    assert set(stored) == trainable and len(trainable) == 4
    assert {t.dtype for t in stored.values()} == {torch.float32}
    assert sorted(p.name for p in step3.glob("*.safetensors")) == [TRAINABLE]  # no model*.safetensors
    model_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    ckpt_bytes = sum(p.stat().st_size for p in step3.iterdir())
    assert (step3 / TRAINABLE).stat().st_size < model_bytes / 50 and ckpt_bytes < model_bytes / 5
    state = json.loads((step3 / "trainer_state.json").read_text())
    assert state["frozen"] == {"source": str(src.resolve()), "sha256": source_sha256(src), "tensors": 4}
    assert checkpoint_cosine(step3) == checkpoint_cosine(src)  # the frozen experts read from MODEL

    part = tmp_path / "part"
    shutil.copytree(whole, part)
    shutil.rmtree(part / "checkpoints" / "step-6")
    shutil.rmtree(part / "final")
    result = loop.train(str(src), part, build_train_spec(**{**SMALL, **options}), resume=True)
    assert result.summary["resumed_from"] == 3
    for r, q in zip(train_records(whole), train_records(part), strict=True):
        assert {**r, **CLOCK} == {**q, **CLOCK}
    a, b = tensors(whole / "final"), tensors(part / "final")
    assert a.keys() == source.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(a[k], source[k]) for k in source if k not in routers)
    assert not all(torch.equal(a[k], source[k]) for k in routers)

    shutil.rmtree(part / "checkpoints" / "step-6")
    shutil.rmtree(part / "final")
    weights = next(src.glob("*.safetensors"))
    changed = {k: v + 1 if k in routers else v for k, v in source.items()}
    from safetensors.torch import save_file

    save_file(changed, weights, metadata={"format": "pt"})
    args = ["train", str(src), "--data", str(text), "--out", str(part), "--resume", "--steps", "6", "--seq-len", "32"]
    args += ["--micro-batch", "4", "--save-every", "3", "--eval-every", "6", "--train", "router", "--lr", "1e-2"]
    err = _bad(capsys, [*args, "--jitter", "0.01", "--log-every", "1", "--keep-last", "3"])
    assert "takes the rest from MODEL" in err and "files changed since" in err, err


# --- killed and resumed ---------------------------------------------------------------------------------

SLOW_TRAIN = """
import sys
import time

from upcycle.train import loop

original = loop.train_step


def train_step(run, step):
    time.sleep(0.25)  # slow enough to be killed between two checkpoints; the numbers are untouched
    return original(run, step)


loop.train_step = train_step

from upcycle_cli.main import run

sys.exit(run(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("jitter", ["0", "0.01"])
def test_killed_run_resumes_exactly(jitter, moe_store, text, tmp_path, capsys):
    src = moe_store("mixtral")
    args = ["train", str(src), "--data", str(text), "--steps", "30", "--seq-len", "32", "--micro-batch", "2"]
    args += ["--lr", "3e-3", "--save-every", "10", "--eval-every", "10", "--log-every", "1", "--jitter", jitter]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert run([*args, "--out", str(whole)]) == 0

    script = tmp_path / "slow_train.py"
    script.write_text(textwrap.dedent(SLOW_TRAIN))
    proc = subprocess.Popen([sys.executable, str(script), *args, "--out", str(killed)], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (killed / "checkpoints" / "step-10").is_dir():
            if proc.poll() is not None:
                pytest.fail(f"the run ended (exit {proc.returncode}) before its first checkpoint: {proc.stderr.read()}")
            if time.monotonic() > deadline:
                pytest.fail("no checkpoint within 120 s")
            time.sleep(0.02)
        assert proc.poll() is None, "the run finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert latest_checkpoint(killed).name == "step-10" and not (killed / "final").exists()

    capsys.readouterr()
    assert run([*args, "--out", str(killed), "--resume"]) == 0
    assert "resuming after step 10" in capsys.readouterr().err
    expected, got = train_records(whole), train_records(killed)
    assert [r["step"] for r in got] == list(range(1, 31))
    for key in ("loss", "lm", "balance", "z", "grad_norm", "lr"):
        assert [r[key] for r in got if r["step"] > 10] == [r[key] for r in expected if r["step"] > 10], key
    a, b = tensors(whole / "final"), tensors(killed / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_changed_data_order(moe_store, text, tmp_path, capsys):
    out = tmp_path / "run"
    train(moe_store("mixtral"), out, data=str(text), steps=4, save_every=2, micro_batch=2)
    base = ["train", str(moe_store("mixtral")), "--data", str(text), "--out", str(out), "--steps", "8"]
    base += ["--seq-len", "32", "--save-every", "2", "--log-every", "1"]
    code, _, err = cli([*base, "--micro-batch", "4", "--resume"], capsys)
    assert code == 2 and "--micro-batch is 4" in err and err.count("\n") == 1
    assert [s for s, _ in checkpoints(out)] == [2, 4]
    code, _, err = cli([*base, "--micro-batch", "2", "--resume"], capsys)
    assert code == 0, err
    assert [r["step"] for r in train_records(out)] == list(range(1, 9))


# --- non-finite losses ----------------------------------------------------------------------------------


def _poison(monkeypatch, bad_calls: set[int] | None, from_call: int | None = None) -> None:
    """Make the balance loss NaN at the given calls of router_terms (one call per step here)."""
    from upcycle.train import step as stepping

    original = stepping.router_terms
    calls = {"n": 0}

    def poisoned(records, counts=None):
        calls["n"] += 1
        terms = original(records, counts)
        if (bad_calls and calls["n"] in bad_calls) or (from_call and calls["n"] >= from_call):
            terms["balance"] = terms["balance"] * float("nan")
        return terms

    monkeypatch.setattr(stepping, "router_terms", poisoned)


def test_a_nonfinite_step_is_skipped(moe_store, text, tmp_path, monkeypatch):
    _poison(monkeypatch, {3})
    out = tmp_path / "run"
    result = train(moe_store("mixtral"), out, data=str(text), steps=6, save_every=6, eval_every=6)
    records = read_metrics(out)
    skip = [r for r in records if r["kind"] == "skip"]
    assert [r["step"] for r in skip] == [3] and "not finite" in skip[0]["reason"]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 4, 5, 6]
    assert result.summary["skipped_steps"] == [3]
    assert (out / "final" / "config.json").is_file()


def test_three_nonfinite_steps_stop_the_run(moe_store, text, tmp_path, monkeypatch, capsys):
    _poison(monkeypatch, None, from_call=6)
    out = tmp_path / "run"
    args = ["train", str(moe_store("mixtral")), "--data", str(text), "--out", str(out), "--steps", "20"]
    code, _, err = cli([*args, "--seq-len", "32", "--micro-batch", "2", "--save-every", "4"], capsys)
    assert code == 2
    assert "not finite at 3 steps in a row (steps 6, 7, 8)" in err and "step-4" in err
    assert err.strip().splitlines()[-1].startswith("error:")
    assert [s for s, _ in checkpoints(out)] == [4] and not (out / "final").exists()
    AutoModelForCausalLM.from_pretrained(out / "checkpoints" / "step-4")  # the last good checkpoint loads


def test_force_puts_the_old_run_back_when_the_new_one_fails_early(moe_store, text, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("previous run")
    _poison(monkeypatch, None, from_call=1)
    args = ["train", str(moe_store("mixtral")), "--data", str(text), "--out", str(out), "--steps", "10"]
    code, _, err = cli([*args, "--seq-len", "32", "--micro-batch", "2", "--force"], capsys)
    assert code == 2 and "no checkpoint was written" in err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


# --- bad input ------------------------------------------------------------------------------------------


def _bad(capsys, args: list[str]) -> str:
    code, _, err = cli(args, capsys)
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(
    "case, extra, message",
    [
        ("steps 0", ["--steps", "0"], "--steps 0 must be 1 or more"),
        ("train foo", ["--train", "foo"], "--train 'foo' is not one of"),
        ("dtype fp8", ["--dtype", "fp8"], "--dtype 'fp8' is not one of"),
        ("no length", [], "--steps N or --tokens N"),
        ("batched_mm", ["--experts-impl", "batched_mm"], "inference only"),
    ],
)
def test_bad_options(case, extra, message, moe_store, text, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", str(moe_store("mixtral")), "--data", str(text), "--out", str(out)]
    if case != "no length" and "--steps" not in extra:
        base += ["--steps", "2"]
    assert message in _bad(capsys, [*base, *extra])
    assert not out.exists()


def test_missing_and_empty_data(moe_store, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", str(moe_store("mixtral")), "--out", str(out), "--steps", "2", "--seq-len", "32"]
    assert "does not exist" in _bad(capsys, [*base, "--data", str(tmp_path / "nope.txt")])
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert "no text" in _bad(capsys, [*base, "--data", str(empty)])
    assert "--data" in _bad(capsys, base)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt"]


def test_rows_without_the_text_field_are_refused_unless_skipped(moe_store, text, tmp_path, capsys):
    """Issue 20, fault 8: a .jsonl row without the field is refused in one line naming its line; with
    --skip-bad-rows the run trains on the other rows and reports the documents used and the rows skipped."""
    paragraphs = [p for p in text.read_text().split("\n\n") if p.strip()]
    rows = [{"text": p} for p in paragraphs]
    rows[3] = {"title": paragraphs[3]}
    rows[7] = {"text": "   "}
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    base = ["train", str(moe_store("mixtral")), "--data", str(data), "--out", str(out), "--steps", "1"]
    base += ["--seq-len", "32", "--micro-batch", "2"]
    err = _bad(capsys, base)
    assert "rows.jsonl line 4 has no 'text' field" in err and "--skip-bad-rows" in err
    assert not out.exists()
    code, stdout, err = cli([*base, "--skip-bad-rows", "--json", "-"], capsys)
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["documents"] == len(rows) - 2
    assert summary["skipped_rows"] == {"empty": 1, "without_text": 1}
    assert f"data: {len(rows) - 2:,} documents (" in err and "skipped 1 rows without 'text' (--skip-bad-rows)" in err
    command = json.loads((out / "final" / "upcycle.json").read_text())["training"]["command"]
    assert "--skip-bad-rows" in command


def test_a_model_type_upcycle_does_not_read_is_refused(dense, text, tmp_path, capsys):
    """Dense models of the families upcycle converts train as they are (tests/test_train_dense.py); others are
    refused in one line."""
    src = dense("llama")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(config | {"model_type": "whisper"}))
    out = tmp_path / "run"
    err = _bad(capsys, ["train", str(src), "--data", str(text), "--out", str(out), "--steps", "2"])
    assert "'whisper' model, which upcycle cannot train" in err and "upcycle convert" in err
    assert not out.exists()


def test_existing_run_dir_needs_resume_or_force(moe_store, text, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    base = ["train", str(moe_store("mixtral")), "--data", str(text), "--out", str(out), "--steps", "2"]
    assert "--resume" in _bad(capsys, base) and "--force" in _bad(capsys, base)
    (out / "checkpoints" / ".step-5.tmp-abc").mkdir(parents=True)  # a checkpoint that was never completed
    assert "no complete checkpoint" in _bad(capsys, [*base, "--resume"])
    assert (out / "keep.txt").read_text() == "x"


def test_seq_len_above_the_model_limit_is_capped_with_a_note(moe_store, text, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", str(moe_store("mixtral")), "--data", str(text), "--out", str(out), "--steps", "1"]
    code, _, err = cli([*args, "--seq-len", "4096", "--micro-batch", "1"], capsys)
    assert code == 0, err
    assert "note: --seq-len 4096 is above the model's limit of 256 positions; training with 256" in err
    assert json.loads((out / "final" / "upcycle.json").read_text())["training"]["seq_len"] == 256


# --- the plan, the schedule, the parameter groups --------------------------------------------------------


def test_dry_run_plans_and_writes_nothing(moe_store, text, tmp_path, capsys):
    out = tmp_path / "run"
    src = moe_store("qwen2_moe")
    args = ["train", str(src), "--data", str(text), "--out", str(out), "--steps", "100", "--dry-run"]
    code, stdout, err = cli([*args, "--train", "router", "--seq-len", "64", "--grad-accum", "2", "--json", "-"], capsys)
    assert code == 0, err
    plan = json.loads(stdout)  # stdout is the JSON alone
    model = AutoModelForCausalLM.from_pretrained(src)
    assert plan["params_total"] == sum(p.numel() for p in model.parameters())
    assert plan["params_trainable"] == sum(model.model.layers[i].mlp.gate.weight.numel() for i in (1, 3))
    assert plan["tokens_per_step"] == 64 * 4 * 2 and plan["steps"] == 100 and plan["warmup"] == 1
    assert plan["moe_layers"] == [1, 3] and plan["min_lr"] == pytest.approx(1e-5)
    assert "lr schedule" in err and "1 warmup steps to 0.0001, cosine to 1e-05" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_dry_run_json_to_a_pipe_is_the_json_alone(moe_store, text, tmp_path):
    """Issue 20, fault 10: `upcycle train ... --dry-run --json - | python -m json.tool` works: in a child process
    whose stdout is a pipe, stdout holds the JSON alone, and the plan table and the notes go to stderr."""
    src = moe_store("qwen2_moe")
    args = ["train", str(src), "--data", str(text), "--out", str(tmp_path / "run"), "--steps", "20", "--dry-run"]
    args += ["--seq-len", "4096", "--micro-batch", "1", "--json", "-"]  # a seq-len above the limit: a note too
    root = str(Path(__file__).parent.parent)  # this checkout's upcycle and upcycle_cli, not an installed copy
    env = os.environ | {"PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "upcycle_cli.main", *args], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["steps"] == 20 and plan["tokens_per_step"] == 256 and plan["moe_layers"] == [1, 3]
    assert "lr schedule" in proc.stderr and "note: --seq-len 4096 is above the model's limit" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_lr_schedule():
    factors = [lr_factor(i, 10, 2, 0.1) for i in range(10)]
    assert factors[:3] == [0.5, 1.0, 1.0]
    assert factors[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(factors[1:]))  # decays monotonically after the warmup
    assert lr_factor(0, 1, 0, 0.1) == 1.0  # a one-step run trains at the peak


def test_param_groups_keep_norms_embeddings_and_routers_out_of_decay(moe_store):
    model = AutoModelForCausalLM.from_pretrained(moe_store("mixtral"))
    routers = [layer.mlp.gate.weight for layer in model.model.layers]
    spec = build_train_spec(steps=1, router_lr_scale=0.5, weight_decay=0.1)
    groups = {g["name"]: g for g in param_groups(model, routers, spec)}
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in groups["decay"]["params"]}
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    assert not any("norm" in n or "embed" in n or ".gate." in n for n in decayed)
    assert {names[id(p)] for p in groups["router"]["params"]} == {f"model.layers.{i}.mlp.gate.weight" for i in range(4)}
    assert groups["router"]["lr"] == pytest.approx(0.5 * spec.lr)
    assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))


@pytest.mark.parametrize("recipe", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_train_recipe_parses(recipe):
    spec = build_train_spec(load_run_config(recipe))
    assert spec.total_steps() >= 1


def test_library_refuses_resume_and_force_together(moe_store, text, tmp_path):
    with pytest.raises(UpcycleError, match="pass one of them"):
        loop.train(
            str(moe_store("mixtral")),
            tmp_path / "r",
            build_train_spec(data=str(text), steps=1),
            resume=True,
            force=True,
        )


# --- routing options, activation checkpointing, publishing ------------------------------------------------


def test_noise_and_capacity_resume_exactly_and_stay_out_of_final(moe_store, text, tmp_path):
    """Noisy top-k, capacity and jitter together: drops are logged, the noise weights live in the checkpoints
    only, and a run resumed from an earlier checkpoint repeats the same steps exactly."""
    src = moe_store("mixtral")
    options = dict(data=str(text), steps=6, save_every=3, eval_every=6, router_noise=True, capacity_factor=1.0)
    options |= dict(jitter=0.01, keep_last=3)
    train(src, tmp_path / "a", **options)
    records = train_records(tmp_path / "a")
    dropped = [row["dropped"] for r in records for row in r["layers"]]
    assert all(0 <= d < 1 for d in dropped) and sum(dropped) > 0  # shares of T·k; capacity 1.0 overflows
    with safe_open(tmp_path / "a" / "checkpoints" / "step-3" / "trainer_state.safetensors", "pt") as fh:
        assert sorted(fh.keys()) == [f"noise.{i}.weight" for i in range(4)]
    assert tensors(tmp_path / "a" / "final").keys() == tensors(src).keys()

    b = tmp_path / "b"
    shutil.copytree(tmp_path / "a", b)
    shutil.rmtree(b / "checkpoints" / "step-6")
    shutil.rmtree(b / "final")
    result = loop.train(str(src), b, build_train_spec(**{**SMALL, **options}), resume=True)
    assert result.summary["resumed_from"] == 3
    resumed = train_records(b)
    assert [r["step"] for r in resumed] == list(range(1, 7))
    for r, s in zip(records, resumed, strict=True):  # every figure of steps 4-6 again, bit for bit
        assert {**r, **CLOCK} == {**s, **CLOCK}
    a_final, b_final = tensors(tmp_path / "a" / "final"), tensors(b / "final")
    assert all(torch.equal(a_final[k], b_final[k]) for k in a_final)


def test_grad_checkpointing_gives_the_same_steps(moe_store, text, tmp_path):
    common = dict(data=str(text), steps=3, save_every=3, eval_every=3, jitter=0.01)
    train(moe_store("mixtral"), tmp_path / "plain", **common)
    train(moe_store("mixtral"), tmp_path / "ckpt", grad_checkpointing=True, **common)
    plain, ckpt = train_records(tmp_path / "plain"), train_records(tmp_path / "ckpt")
    for key in ("loss", "lm", "balance", "z", "grad_norm"):
        assert [r[key] for r in ckpt] == pytest.approx([r[key] for r in plain], rel=1e-5), key
    assert [r["layers"][0]["load"] for r in ckpt] == [r["layers"][0]["load"] for r in plain]  # one record per forward


def test_push_to_hub_publishes_final(moe_store, text, tmp_path, monkeypatch, capsys):
    from test_push import FakeHub

    hub = FakeHub(monkeypatch)
    out = tmp_path / "run"
    args = ["train", str(moe_store("mixtral")), "--data", str(text), "--out", str(out), "--steps", "2"]
    code, stdout, err = cli([*args, "--seq-len", "32", "--push-to-hub", "me/trained-moe"], capsys)
    assert code == 0, err
    (upload,) = hub.named("upload_folder")
    assert Path(upload["folder_path"]) == out / "final" and upload["repo_id"] == "me/trained-moe"
    assert "checkpoints/" not in json.dumps(upload["allow_patterns"])
    assert json.loads((out / "final" / "upcycle.json").read_text())["hub_repo"] == "me/trained-moe"
    assert "Pushed" in stdout and "hf_test_token_never_shown" not in stdout + err


def test_push_to_hub_without_a_token_fails_before_training(moe_store, text, tmp_path, monkeypatch, capsys):
    from test_push import FakeHub

    FakeHub(monkeypatch, token=None)
    out = tmp_path / "run"
    args = ["train", str(moe_store("mixtral")), "--data", str(text), "--out", str(out), "--steps", "2"]
    assert "no Hugging Face token" in _bad(capsys, [*args, "--push-to-hub", "me/trained-moe"])
    assert not out.exists()


def test_checkpoints_carry_the_router_jitter_generators(moe_store, text, tmp_path):
    """Jitter and noise draw from the tap's own generators, not torch's global RNG; each checkpoint saves them."""
    out = tmp_path / "run"
    train(moe_store("mixtral"), out, data=str(text), steps=2, jitter=0.01, save_every=2, eval_every=2)
    rng = torch.load(out / "checkpoints" / "step-2" / "rng_state.pt", weights_only=True)
    assert sorted(rng["routing"]) == [0, 1, 2, 3] and {"torch", "routing"} <= set(rng)
    no_jitter = tmp_path / "plain"
    train(moe_store("mixtral"), no_jitter, data=str(text), steps=2, save_every=2, eval_every=2)
    assert torch.load(no_jitter / "checkpoints" / "step-2" / "rng_state.pt", weights_only=True)["routing"] == {}


def test_a_run_puts_the_process_wide_state_back(moe_store, text, tmp_path):
    """torch's global RNG, deterministic algorithms and transformers' progress bars are as they were after a run."""
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()
    torch.manual_seed(1234)
    rng = torch.get_rng_state()
    out = tmp_path / "run"
    train(moe_store("mixtral"), out, data=str(text), steps=2, save_every=2, eval_every=2, deterministic=True)
    assert torch.equal(torch.get_rng_state(), rng)
    assert not torch.are_deterministic_algorithms_enabled()
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ or os.environ["CUBLAS_WORKSPACE_CONFIG"] != ":4096:8"
    assert hf_logging.is_progress_bar_enabled()


# --- faults (issue 20) ----------------------------------------------------------------------------------


def _args(model: Path, text: Path, out: Path, steps: int, *extra: str) -> list[str]:
    base = ["train", str(model), "--data", str(text), "--out", str(out), "--steps", str(steps)]
    base += ["--seq-len", "32", "--micro-batch", "2", "--save-every", "2", "--eval-every", "2", "--log-every", "1"]
    return [*base, *extra]


def test_resume_finishes_a_missing_final(moe_store, text, tmp_path, capsys):
    """Killed after its last checkpoint but before final/ was complete: --resume writes final/ (fault 3)."""
    out = tmp_path / "run"
    train(moe_store("mixtral"), out, data=str(text), steps=4, save_every=2, micro_batch=2)
    expected = tensors(out / "final")
    shutil.rmtree(out / "final")
    (out / ".final.tmp-1@host-x").mkdir()  # what a kill during the export leaves
    code, _, err = cli([*_args(moe_store("mixtral"), text, out, 4), "--resume"], capsys)
    assert code == 0, err
    got = tensors(out / "final")
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    assert not any(p.name.startswith(".final.tmp-") for p in out.iterdir())
    code, _, err = cli([*_args(moe_store("mixtral"), text, out, 4), "--resume"], capsys)
    assert code == 2 and "already reached step 4" in err and err.count("\n") == 1


def test_resume_refuses_another_model(moe_store, text, tmp_path, capsys):
    """--resume naming another MODEL than the run's is refused, naming both (fault 5)."""
    out = tmp_path / "run"
    train(moe_store("mixtral"), out, data=str(text), steps=2, save_every=2, micro_batch=2)
    code, _, err = cli([*_args(moe_store("qwen2_moe"), text, out, 4), "--resume"], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert str(moe_store("mixtral").resolve()) in err and str(moe_store("qwen2_moe")) in err
    assert [s for s, _ in checkpoints(out)] == [2] and (out / "final").is_dir()


def _full_disk_at(monkeypatch, step: int, error: Exception) -> None:
    """torch.save raises `error` when it writes the optimizer state of checkpoint step-`step`."""
    original = torch.save

    def save(obj, f, *args, **kwargs):
        if f".step-{step}.tmp-" in str(f) and str(f).endswith("optimizer.pt"):
            raise error
        return original(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError(
            "[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file data/0: "
            "file write failed"
        ),
        OSError(28, "No space left on device"),
    ],
)
def test_a_full_disk_during_a_checkpoint_is_one_line_exit_3(error, moe_store, text, tmp_path, monkeypatch, capsys):
    """A full disk while writing step-4 (fault 4): one line, exit 3, step-2 intact, nothing half-written; the resume
    after freeing space continues from step 2."""
    out = tmp_path / "run"
    original = torch.save
    _full_disk_at(monkeypatch, 4, error)
    code, _, err = cli(_args(moe_store("mixtral"), text, out, 6), capsys)
    assert code == 3, err
    assert err.strip().splitlines()[-1].startswith("error:") and "no space left" in err and "step-4" in err
    assert "Traceback" not in err
    assert [s for s, _ in checkpoints(out)] == [2]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    monkeypatch.setattr(torch, "save", original)
    code, _, err = cli([*_args(moe_store("mixtral"), text, out, 6), "--resume"], capsys)
    assert code == 0, err
    assert [r["step"] for r in train_records(out)] == list(range(1, 7))


def test_too_little_free_space_is_refused_before_a_checkpoint(moe_store, text, tmp_path, monkeypatch, capsys):
    from upcycle.train import checkpoint as ckpt_module

    real, model = shutil.disk_usage, moe_store("mixtral")  # converted before the disk looks full
    monkeypatch.setattr(ckpt_module.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    out = tmp_path / "run"
    code, _, err = cli(_args(model, text, out, 4), capsys)
    last = err.strip().splitlines()[-1]
    assert code == 3 and last.startswith("error:") and "step-2" in last and "no space left" in last, err
    assert "Traceback" not in err
    assert checkpoints(out) == []


def test_stop_messages_say_what_is_true(tmp_path):
    """The interrupted/terminated line names what RUN_DIR really holds (fault 9)."""
    from upcycle.train.checkpoint import stop_note

    out = tmp_path / "run"
    assert "was not kept" in stop_note(out) and "--resume" not in stop_note(out)
    out.mkdir()
    assert "nothing to resume" in stop_note(out)
    (out / "checkpoints" / "step-3").mkdir(parents=True)
    (out / "checkpoints" / "step-3" / "trainer_state.json").write_text("{}")
    assert "step-3" in stop_note(out) and "--resume" in stop_note(out)


def test_a_second_process_on_a_live_run_dir_is_refused(moe_store, text, tmp_path, capsys):
    """A live run's RUN_DIR is locked: a fresh run, --force and --resume are refused naming the holder; a lock
    left by a dead process is taken over with a note (fault 1)."""
    from upcycle.train.lock import lock_path, run_lock

    out, model = tmp_path / "run", moe_store("mixtral")
    train(model, out, data=str(text), steps=2, save_every=2, micro_batch=2)
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    with run_lock(out, note=lambda _: None):  # another open file: flock conflicts as with another process
        for extra in ([], ["--force"], ["--resume"]):
            code, _, err = cli([*_args(model, text, out, 4), *extra], capsys)
            assert code == 2 and err.count("\n") == 1, err
            assert f"process {os.getpid()}@" in err and "in use" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before and (out / "final").is_dir()
    assert not lock_path(out).exists()
    lock_path(out).write_text("999999999@elsewhere\n")  # what a SIGKILLed run leaves
    code, _, err = cli([*_args(model, text, out, 4), "--resume"], capsys)
    assert code == 0, err
    assert "took over the lock" in err and "999999999@elsewhere" in err
    assert not lock_path(out).exists()


def test_resume_notes_options_that_change_the_curve_and_checkpoints_are_fsynced(
    moe_store, text, tmp_path, monkeypatch, capsys
):
    """--resume with another --warmup or --clip says so (fault 11); each checkpoint's files and folders are fsynced
    before the rename publishes them."""
    out, model = tmp_path / "run", moe_store("mixtral")
    synced: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    code, _, err = cli(_args(model, text, out, 2), capsys)
    assert code == 0, err
    tmp_files = [p for p in synced if ".step-2.tmp-" in p]
    assert any(p.endswith("optimizer.pt") for p in tmp_files)
    assert any(p.endswith("trainer_state.json") for p in tmp_files)
    assert str(out / "checkpoints") in synced
    code, _, err = cli([*_args(model, text, out, 4), "--resume", "--warmup", "1", "--clip", "0.5"], capsys)
    assert code == 0, err
    notes = [line for line in err.splitlines() if "curve will not match" in line]
    assert len(notes) == 2 and "--warmup is 1" in notes[0] and "--clip is 0.5" in notes[1]


@pytest.mark.parametrize("loss", [800.0, float("nan")])
def test_an_eval_loss_that_overflows_or_is_nan_finishes_the_run(loss, moe_store, text, tmp_path, monkeypatch, capsys):
    """An eval loss of 800 (exp overflows) or NaN is recorded as it is, the run finishes and resumes (fault 2)."""
    from upcycle.train import evaluate as evaluating

    real = evaluating.evaluate

    def huge(run, step):
        got = real(run, step)
        if got is None:
            return None
        return type(got)(got.step, loss, evaluating.perplexity_of(loss), got.eval_tokens, got.counts)

    monkeypatch.setattr(loop, "evaluate", huge)
    out, model = tmp_path / "run", moe_store("mixtral")
    code, stdout, err = cli([*_args(model, text, out, 2), "--json", "-"], capsys)
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["perplexity"] is None and (summary["eval_loss"] == loss or math.isnan(loss))
    evals = [r for r in read_metrics(out) if r["kind"] == "eval"]
    assert [r["perplexity"] for r in evals] == [None]
    code, stdout, err = cli([*_args(model, text, out, 4), "--resume", "--json", "-"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["steps"] == 4 and (out / "final" / "config.json").is_file()


def _overwrite_tail(folder: Path) -> None:
    weights = next(folder.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-64:] = b"\xff" * 64  # NaN floats, the header still valid
    weights.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage",
    [
        lambda f: next(f.glob("model*.safetensors")).write_bytes(b""),
        lambda f: (f / "rng_state.pt").write_bytes(b"garbage"),
        lambda f: (f / "trainer_state.json").write_text(json.dumps({"step": 4})),
        _overwrite_tail,
    ],
    ids=["empty-weights", "garbage-rng", "state-missing-fields", "overwritten-tail"],
)
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(damage, moe_store, text, tmp_path, capsys):
    """Checksums written at save and verified on resume: a damaged newest checkpoint is named and the run resumes
    from the one before it; with none intact, one line (fault 6)."""
    out, model = tmp_path / "run", moe_store("mixtral")
    code, _, err = cli(_args(model, text, out, 4), capsys)
    assert code == 0, err
    damage(out / "checkpoints" / "step-4")
    shutil.rmtree(out / "final")
    code, _, err = cli([*_args(model, text, out, 6), "--resume"], capsys)
    assert code == 0, err
    assert "step-4 is damaged" in err and "resuming from step-2" in err and "after step 2" in err
    records = train_records(out)
    assert [r["step"] for r in records] == list(range(1, 7)) and all(math.isfinite(r["loss"]) for r in records)
    damage(out / "checkpoints" / "step-6")
    damage(out / "checkpoints" / "step-4")
    code, _, err = cli([*_args(model, text, out, 8), "--resume"], capsys)
    assert code == 2 and err.count("\n") == 1 and "no intact checkpoint" in err, err

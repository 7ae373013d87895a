"""Data parallelism: one process is the plain path; full state dicts resume exactly; torchrun + FSDP2 on CPU (gloo)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from upcycle.convert.pipeline import convert
from upcycle.convert.spec import build_spec
from upcycle.train.distributed import (
    DistEnv,
    all_reduce_sum,
    full_model_state,
    full_optimizer_state,
    init_distributed,
    load_full_model_state,
    load_full_optimizer_state,
    wrap_model,
)
from upcycle.train.metrics import read_metrics
from upcycle.train.spec import TrainSpec
from upcycle_cli.main import run


def test_one_process_is_the_plain_path(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    env = init_distributed(device="cpu")
    assert env == DistEnv(world_size=1, rank=0, local_rank=0, device=torch.device("cpu"))
    assert env.is_main and not env.distributed
    model = torch.nn.Linear(3, 2)
    assert wrap_model(model, env, TrainSpec()) is model
    t = torch.tensor([1.5, 2.0])
    assert all_reduce_sum(t, env) is t and t.tolist() == [1.5, 2.0]


def _step(model, opt, ids):
    loss = model(ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def test_full_states_resume_exactly_through_safe_files(dense, tmp_path):
    """Model via save_pretrained(state_dict=full) (safetensors), AdamW via torch.save, both read back safely."""
    from transformers import AutoModelForCausalLM

    moe = tmp_path / "moe"
    convert(str(dense("llama")), moe, build_spec(experts=4, top_k=2))
    env = DistEnv()
    torch.manual_seed(0)
    batches = [torch.randint(0, 128, (2, 16)) for _ in range(3)]

    def fresh():
        model = AutoModelForCausalLM.from_pretrained(moe, dtype=torch.float32)
        model.train()
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2)

    model, opt = fresh()
    for ids in batches[:2]:
        _step(model, opt, ids)
    model.save_pretrained(tmp_path / "ckpt", state_dict=full_model_state(model, env))
    torch.save(full_optimizer_state(model, opt, env), tmp_path / "ckpt" / "optimizer.pt")
    expected = _step(model, opt, batches[2])

    resumed, opt2 = fresh()
    state = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).state_dict()
    load_full_model_state(resumed, state, env)
    load_full_optimizer_state(resumed, opt2, torch.load(tmp_path / "ckpt" / "optimizer.pt", weights_only=True), env)
    assert _step(resumed, opt2, batches[2]) == expected


# --- torchrun: 2 processes, gloo, FSDP2 on CPU ------------------------------------------------------------------

STEPS = 6
ARGS = ["--steps", str(STEPS), "--seq-len", "32", "--lr", "3e-3", "--log-every", "1", "--eval-every", "3"]
ARGS += ["--save-every", "3", "--keep-last", "2"]
TERMS = ("loss", "lm", "balance", "z", "grad_norm", "lr")


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    return subprocess.run([*cmd, "-m", "upcycle_cli.main", "train", *args], capture_output=True, text=True, env=env)


def records(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in read_metrics(run_dir) if r["kind"] == kind]


@pytest.fixture(scope="module")
def runs(dense_store, jargon_text, tmp_path_factory):
    """A tiny Mixtral (4 experts, top-2) trained 6 steps on real text: in one process with micro-batch 4, and
    under torchrun in 2 processes with micro-batch 2 (the same global batch)."""
    root = tmp_path_factory.mktemp("dist")
    text = root / "jargon.txt"
    head = jargon_text.read_text()[:60_000]
    text.write_text(head[: head.rindex("\n\n")] + "\n")
    moe = root / "moe"
    convert(str(dense_store("llama")), moe, build_spec(experts=4, top_k=2))
    common = [str(moe), "--data", str(text), *ARGS]
    assert run(["train", *common, "--micro-batch", "4", "--out", str(root / "one")]) == 0
    two = torchrun(*common, "--micro-batch", "2", "--out", str(root / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    return {"root": root, "common": common, "one": root / "one", "two": root / "two", "stdout": two.stdout}


@pytest.mark.slow
def test_two_processes_match_one_process(runs):
    one, two = records(runs["one"], "train"), records(runs["two"], "train")
    assert [r["step"] for r in two] == list(range(1, STEPS + 1))
    for a, b in zip(one, two, strict=True):
        for key in TERMS:
            assert abs(a[key] - b[key]) <= 1e-5, (a["step"], key, a[key], b[key])
        for la, lb in zip(a["layers"], b["layers"], strict=True):  # expert load counted over both ranks
            assert la["load"] == lb["load"]
    evals = zip(records(runs["one"], "eval"), records(runs["two"], "eval"), strict=True)
    assert all(abs(a["eval_loss"] - b["eval_loss"]) <= 1e-5 for a, b in evals)
    assert runs["stdout"].count("Trained ") == 1  # only rank 0 reports


@pytest.mark.slow
def test_two_process_final_loads_natively_with_the_same_logits(runs):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(runs["one"] / "final")
    got, info = AutoModelForCausalLM.from_pretrained(runs["two"] / "final", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert type(got).__name__ == "MixtralForCausalLM"
    ids = torch.randint(0, ref.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        diff = (ref(ids).logits - got(ids).logits).abs().max().item()
    assert diff <= 1e-5
    assert sorted(p.name for p in (runs["two"] / "checkpoints").iterdir()) == ["step-3", "step-6"]


@pytest.mark.slow
def test_two_process_run_resumes_exactly(runs):
    """From its step-3 checkpoint (full states gathered by rank 0), a torchrun run continues bit for bit."""
    resumed = runs["root"] / "resumed"
    shutil.copytree(runs["two"], resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-6")
    shutil.rmtree(resumed / "final")
    done = torchrun(*runs["common"], "--micro-batch", "2", "--out", str(resumed), "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming after step 3" in done.stderr
    expected, got = records(runs["two"], "train"), records(resumed, "train")
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for key in TERMS:
        assert [r[key] for r in got] == [r[key] for r in expected], key


@pytest.mark.slow
def test_torchrun_with_one_process_shards_with_fsdp2_and_matches_the_plain_run(runs):
    """torchrun --nproc-per-node 1 takes the FSDP2 path (the only way to run it on one GPU), with the same losses."""
    import json

    dry = torchrun(*runs["common"], "--micro-batch", "4", "--dry-run", "--json", "-", nproc=1)
    assert dry.returncode == 0, dry.stderr[-3000:]
    plan = json.loads(dry.stdout)  # stdout is the JSON alone
    assert plan["sharding"] == "FSDP2 over gloo, 1 process" and plan["world_size"] == 1
    plain = run(["train", *runs["common"], "--micro-batch", "4", "--dry-run", "--json", str(runs["root"] / "p.json")])
    assert plain == 0 and json.loads((runs["root"] / "p.json").read_text())["sharding"] is None
    out = runs["root"] / "torchrun-one"
    done = torchrun(*runs["common"], "--micro-batch", "4", "--out", str(out), nproc=1)
    assert done.returncode == 0, done.stderr[-3000:]
    one, got = records(runs["one"], "train"), records(out, "train")
    for a, b in zip(one, got, strict=True):
        for key in TERMS:
            assert abs(a[key] - b[key]) <= 1e-5, (a["step"], key, a[key], b[key])


def test_two_processes_with_the_lm_loss_in_chunks_follow_the_models_own_loss(runs):
    """--lm-loss chunked under FSDP2 (2 processes): the head's weight is gathered inside the root's forward, where
    the chunked loss runs, and its gradient is reduced with the rest; the losses follow the model's own loss."""
    out = runs["root"] / "two-chunked"
    done = torchrun(*runs["common"], "--micro-batch", "2", "--lm-loss", "chunked", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    own, chunked = records(runs["two"], "train"), records(out, "train")
    assert [r["step"] for r in own] == [r["step"] for r in chunked]
    for a, b in zip(own, chunked, strict=True):
        for key in TERMS:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key, a[key], b[key])


SYNC_RECORDER = """
import os
import sys
from pathlib import Path

from upcycle.train import step

calls = Path(os.environ["SYNC_CALLS"]) / f"rank{os.environ.get('RANK', '0')}.txt"
original = step.set_gradient_sync


def recorded(model, env, sync):
    with calls.open("a") as f:
        f.write(str(int(sync)))
    original(model, env, sync)


step.set_gradient_sync = recorded

from upcycle_cli.main import run

sys.exit(run(sys.argv[1:]))
"""


@pytest.mark.slow
def test_grad_accum_under_fsdp_reduces_gradients_on_the_last_micro_batch_only(runs):
    """2 processes × grad-accum 2: FSDP reduce-scatters once per step (sync off for micro-batch 0, on for 1) when the
    unsharded gradients fit, after every micro-batch when they do not (--gpu-mem says so); both match one process."""
    root, common = runs["root"], runs["common"]
    script = root / "record_sync.py"
    script.write_text(SYNC_RECORDER)
    one = root / "accum-one"
    assert run(["train", *common, "--micro-batch", "2", "--grad-accum", "2", "--out", str(one)]) == 0
    got = {}
    for name, extra in (("last", []), ("every", ["--gpu-mem", "0.0001", "--force-memory"])):  # too small: forced
        calls, out = root / f"calls-{name}", root / f"accum-{name}"
        calls.mkdir()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)]
        cmd += ["train", *common, "--micro-batch", "1", "--grad-accum", "2", "--out", str(out), *extra]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "SYNC_CALLS": str(calls)}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        got[name] = (records(out, "train"), {p.name: p.read_text() for p in calls.iterdir()})
    assert got["last"][1] == {"rank0.txt": "01" * STEPS, "rank1.txt": "01" * STEPS}
    assert got["every"][1] == {}  # FSDP's default: every backward reduce-scatters
    expected = records(one, "train")
    for name, (train_records, _) in got.items():
        assert [r["step"] for r in train_records] == list(range(1, STEPS + 1))
        for a, b in zip(expected, train_records, strict=True):
            for key in TERMS:
                assert abs(a[key] - b[key]) <= 1e-5, (name, a["step"], key, a[key], b[key])


@pytest.mark.slow
def test_torchrun_router_checkpoints_hold_the_trained_tensors_and_resume_exactly(runs):
    """Under FSDP2 a --train router checkpoint holds the router tensors only (taken from the gathered state), and a
    run resumed from it repeats every loss and writes the same final/ bit for bit."""
    from safetensors import safe_open

    from upcycle.arch import targets
    from upcycle.train.frozen import TRAINABLE

    root = runs["root"]
    common = [*runs["common"], "--micro-batch", "2", "--train", "router"]
    done = torchrun(*common, "--out", str(root / "router"))
    assert done.returncode == 0, done.stderr[-3000:]
    with safe_open(root / "router" / "checkpoints" / "step-3" / TRAINABLE, "pt") as fh:
        stored = sorted(fh.keys())
    router = targets()["mixtral"].modules["router"]  # the loaded model's router module of each layer
    assert len(stored) == 4 and all(key.startswith(router.format(layer=i)) for i, key in enumerate(stored))
    resumed = root / "router-resumed"
    shutil.copytree(root / "router", resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-6")
    shutil.rmtree(resumed / "final")
    again = torchrun(*common, "--out", str(resumed), "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    expected, got = records(root / "router", "train"), records(resumed, "train")
    for key in TERMS:
        assert [r[key] for r in got] == [r[key] for r in expected], key
    from safetensors.torch import load_file

    a = {k: v for f in sorted((root / "router" / "final").glob("*.safetensors")) for k, v in load_file(f).items()}
    b = {k: v for f in sorted((resumed / "final").glob("*.safetensors")) for k, v in load_file(f).items()}
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_torchrun_writes_the_selection_bias_slot_in_float32(dense_store, jargon_text, tmp_path):
    """--balance bias under FSDP2 into a bfloat16 final/: the generic wrapper's correction bias stays float32 (as in
    one process: the routing adds it to float32 probabilities) and holds the run's biases exactly; the rest is bf16."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    moe, text, out = tmp_path / "moe", tmp_path / "jargon.txt", tmp_path / "run"
    head = jargon_text.read_text()[:30_000]
    text.write_text(head[: head.rindex("\n\n")] + "\n")
    convert(str(dense_store("llama")), moe, build_spec(target="generic", experts=4, top_k=2))
    args = [str(moe), "--data", str(text), "--steps", "4", "--seq-len", "32", "--micro-batch", "2", "--lr", "3e-3"]
    args += ["--save-every", "4", "--eval-every", "4", "--balance", "bias", "--balance-rate", "0.02"]
    done = torchrun(*args, "--save-dtype", "bfloat16", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    trained = load_file(out / "checkpoints" / "step-4" / "trainer_state.safetensors")  # balance_bias.{layer}, fp32
    dtypes, slots = {}, {}
    for path in sorted((out / "final").glob("*.safetensors")):
        with safe_open(path, "pt") as fh:
            for key in fh.keys():
                tensor = fh.get_tensor(key)
                dtypes[key] = tensor.dtype
                if key.endswith("e_score_correction_bias"):
                    slots[key] = tensor
    assert len(slots) == len(trained) == 4
    for layer in range(4):
        (key,) = [k for k in slots if f".layers.{layer}." in k]
        assert slots[key].dtype == torch.float32
        assert torch.equal(slots[key], trained[f"balance_bias.{layer}"])  # ±0.02 steps: not exact in bf16
    assert max(float(t.abs().max()) for t in slots.values()) >= 0.02  # the run moved them
    assert {dtypes[k] for k in dtypes if k not in slots} == {torch.bfloat16}

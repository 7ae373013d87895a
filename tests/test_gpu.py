"""The CUDA path of `upcycle train`, run only where torch sees a GPU (`pytest -m gpu`; skipped elsewhere).

What only a GPU shows: transformers' grouped_mm kernel against the eager per-expert loop in bf16 and fp32, our
autocast rule for `_grouped_mm`, the refusal of a silent eager fallback, torchrun with NCCL and FSDP2, resume after
a SIGKILL, and `--dry-run`'s memory plan against torch.cuda.max_memory_allocated. `benchmarks/gpu/run.sh` runs
these on the GPU machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_train import moe_store, tensors, text, train, train_records  # noqa: F401  (fixtures)
from transformers import AutoModelForCausalLM

from upcycle.convert.pipeline import convert
from upcycle.convert.spec import build_spec
from upcycle.errors import UpcycleError
from upcycle.train import loop
from upcycle.train import model as train_model
from upcycle.train.distributed import DistEnv
from upcycle.train.metrics import read_metrics
from upcycle.train.spec import TrainSpec, build_train_spec

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
CUDA = torch.device("cuda")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.fixture(scope="module")
def routed(dense_store, tmp_path_factory):
    """routed(name) -> a tiny MoE whose routing matters (experts made different by N(1, 0.2) noise, router std 1):
    "mixtral" (4 experts, top-2, every layer) or "qwen2_moe" (dense layers between: mlp_only_layers = [0, 2])."""
    root = tmp_path_factory.mktemp("gpu-moe")
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            family, every = ("llama", 1) if name == "mixtral" else ("qwen2", 2)
            made[name] = root / name
            spec = build_spec(experts=4, top_k=2, every=every, noise=0.2, router_std=1.0)
            convert(str(dense_store(family)), made[name], spec)
            config = json.loads((made[name] / "config.json").read_text())
            assert config["model_type"] == name and config.get("mlp_only_layers", [0, 2]) == [0, 2]
        return made[name]

    return get


def _fwd_bwd(folder: Path, impl: str, mode: str, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and parameter gradients of one forward + backward on the GPU. mode: fp32 (weights and compute),
    bf16 (weights loaded in bf16), autocast (fp32 weights, bf16 compute: what `upcycle train --dtype bf16` runs)."""
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, experts_implementation=impl).to(CUDA)
    assert train_model.experts_implementation(model) == impl  # no silent fallback on this GPU
    model.train()
    if mode == "autocast":
        ctx = train_model.compute_context(DistEnv(device=CUDA), TrainSpec(dtype="bf16"), torch.bfloat16)
    else:
        ctx = torch.autocast("cuda", enabled=False)
    with ctx:
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach().float().cpu(), grads


# bf16 rounds each product's inputs to 8 bits of mantissa: the two kernels sum in different orders, so they differ
# by a few bf16 roundings; fp32 differs only by summation order (cuBLAS and grouped_mm, TF32 off).
TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2, "autocast": 3e-2}


@pytest.mark.parametrize("mode", ["fp32", "bf16", "autocast"])
@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_grouped_mm_matches_the_eager_loop_forward_and_backward(name, mode, routed):
    folder = routed(name)
    ids = torch.randint(3, 128, (4, 48), generator=torch.Generator().manual_seed(0)).to(CUDA)
    torch.backends.cuda.matmul.allow_tf32 = False
    logits_g, grads_g = _fwd_bwd(folder, "grouped_mm", mode, ids)
    logits_e, grads_e = _fwd_bwd(folder, "eager", mode, ids)
    tol = TOLERANCE[mode]
    assert torch.isfinite(logits_g).all()
    assert rel(logits_g, logits_e) <= tol, rel(logits_g, logits_e)
    assert grads_g.keys() == grads_e.keys()
    experts = [n for n in grads_g if ".experts." in n]
    assert experts  # the expert weights got gradients through both kernels
    worst = max(grads_g, key=lambda n: rel(grads_g[n], grads_e[n]))
    print(f"{name} {mode}: logits rel {rel(logits_g, logits_e):.2e}, worst grad {worst} "
          f"{rel(grads_g[worst], grads_e[worst]):.2e}")  # fmt: skip
    for n in grads_g:
        assert rel(grads_g[n], grads_e[n]) <= 5 * tol, (n, rel(grads_g[n], grads_e[n]))


def test_autocast_runs_grouped_mm_in_bf16_on_cuda():
    """What transformers' grouped_mm experts call, under `upcycle train --dtype bf16`'s context: bf16 out."""
    from transformers.integrations import moe

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 64, generator=gen).to(CUDA)  # (S, H) fp32 from the residual stream
    w = torch.randn(4, 64, 128, generator=gen).to(CUDA)  # (E, H, I) fp32 master weights
    offs = torch.tensor([10, 30, 41, 64], dtype=torch.int32, device=CUDA)
    with train_model.compute_context(DistEnv(device=CUDA), TrainSpec(dtype="bf16"), torch.bfloat16):
        y = moe._grouped_mm(x, w, offs=offs)  # (S, I)
    how = train_model.enable_grouped_mm_autocast("cuda", torch.bfloat16)
    print(f"grouped_mm follows autocast on CUDA through: {how}")
    assert how in ("dispatcher", "transformers")
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, F.grouped_mm(x.bfloat16(), w.bfloat16(), offs=offs))
    assert moe._grouped_mm(x, w, offs=offs).dtype == torch.float32  # outside autocast nothing changes


@pytest.mark.parametrize("impl", ["grouped_mm", "eager"])
def test_bf16_run_on_cuda_keeps_fp32_masters_and_loss_falls(impl, moe_store, text, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    options = dict(data=str(text), steps=20, lr=3e-3, experts_impl=impl, save_every=20)
    result = train(moe_store("mixtral"), out, **options, save_dtype="bfloat16")  # final/ defaults to MODEL's fp32
    assert result.plan["device"] == "cuda" and result.plan["dtype"] == "bfloat16"  # auto: bf16 on a GPU
    assert result.summary["experts_implementation"] == impl
    records = train_records(out)
    first, last = sum(r["lm"] for r in records[:4]) / 4, sum(r["lm"] for r in records[-4:]) / 4
    assert last < first - 0.3, (first, last)
    masters, final = tensors(out / "checkpoints" / "step-20"), tensors(out / "final")
    assert {t.dtype for t in masters.values()} == {torch.float32}
    assert {t.dtype for t in final.values()} == {torch.bfloat16}
    assert all(torch.equal(final[k], masters[k].bfloat16()) for k in masters)
    state = torch.load(out / "checkpoints" / "step-20" / "optimizer.pt", weights_only=True)
    moments = [t for s in state["state"].values() for k, t in s.items() if k in ("exp_avg", "exp_avg_sq")]
    assert moments and {t.dtype for t in moments} == {torch.float32}


def test_a_cuda_step_waits_on_the_gpu_once(moe_store, text, tmp_path, monkeypatch):  # noqa: F811
    """torch's sync debug mode on the real device (tests/test_train_syncs.py counts the same on a CPU): a step that is
    neither logged, evaluated nor saved synchronizes once, for its means and gradient norm; the forward builds no
    mask for text (attention.py), so none for transformers' packed-sequence check; capacity and accumulation add
    nothing."""
    import warnings

    marks: list[tuple[str, int]] = []
    original = loop.train_step
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")

        def step(run, n):
            marks.append((f"step {n}", len(caught)))
            return original(run, n)

        monkeypatch.setattr(loop, "train_step", step)
        options = dict(data=str(text), steps=8, log_every=4, eval_every=0, save_every=8, grad_accum=2)
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train(moe_store("mixtral"), tmp_path / "run", **options, capacity_factor=1.0)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    ends = [m[1] for m in marks[1:]] + [len(caught)]
    reads = {
        name: [f"{Path(w.filename).name}:{w.lineno}" for w in caught[start:end] if "synchroniz" in str(w.message)]
        for (name, start), end in zip(marks, ends, strict=True)
    }
    for n in (2, 3, 5, 6, 7):  # not logged (every 4, and the first), no evaluation, saved at 8 only
        assert len(reads[f"step {n}"]) == 1, reads  # the step's read-back


def test_a_silent_eager_fallback_is_refused_on_cuda(moe_store, monkeypatch):  # noqa: F811
    folder = moe_store("mixtral")
    spec = TrainSpec()
    model = train_model.load_model(folder, torch.float32, spec, CUDA)  # the real kernel: grouped_mm, accepted
    assert train_model.experts_implementation(model) == "grouped_mm"
    assert next(model.parameters()).device.type == "cuda"
    del model
    monkeypatch.setattr(train_model, "experts_implementation", lambda model: "eager")  # as if transformers fell back
    with pytest.raises(UpcycleError, match="fell back to the eager"):
        train_model.load_model(folder, torch.float32, spec, CUDA)
    train_model.load_model(folder, torch.float32, TrainSpec(experts_impl="eager"), CUDA)  # asked for: accepted


# --- in child processes: torchrun + NCCL + FSDP2, SIGKILL and resume ---------------------------------------------

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "PYTHONUNBUFFERED": "1"}
COMMON = ["--seq-len", "64", "--micro-batch", "4", "--lr", "3e-3", "--log-every", "1", "--eval-every", "4"]


def cli(*args: str, torchrun: bool = False) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1"]
    return [*(launcher if torchrun else [sys.executable]), "-m", "upcycle_cli.main", "train", *args]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["kind"] == "train"}


def test_torchrun_nccl_fsdp2_trains_checkpoints_resumes_and_writes_bf16_final(moe_store, text, tmp_path):  # noqa: F811
    args = [str(moe_store("mixtral")), "--data", str(text), "--steps", "8", "--save-every", "4", "--dtype", "bf16"]
    args += [*COMMON, "--save-dtype", "bfloat16"]  # final/ defaults to MODEL's float32
    run = tmp_path / "run"
    done = subprocess.run(cli(*args, "--out", str(run), "--json", "-", torchrun=True), capture_output=True,
                          text=True, env=ENV, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    dry = subprocess.run(cli(*args, "--dry-run", "--json", "-", torchrun=True), capture_output=True, text=True,
                         env=ENV, timeout=300)  # fmt: skip
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert json.loads(dry.stdout)["sharding"] == "FSDP2 over nccl, 1 process"
    full = losses(run)
    assert sorted(full) == list(range(1, 9))
    # resume from step 4 as if the run had died after writing it
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-8")
    shutil.rmtree(resumed / "final")
    again = subprocess.run(cli(*args, "--out", str(resumed), "--resume", torchrun=True), capture_output=True,
                           text=True, env=ENV, timeout=300)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming after step 4" in again.stderr
    got = losses(resumed)
    worst = max(abs(got[s] - full[s]) for s in range(5, 9))
    print(f"torchrun resume: max |loss difference| over steps 5-8 = {worst:.3g}")
    assert worst <= 2e-3, worst  # bf16 compute without --deterministic: reduction order may differ
    model, info = AutoModelForCausalLM.from_pretrained(run / "final", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert type(model).__name__ == "MixtralForCausalLM"
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert json.loads((run / "final" / "config.json").read_text())["dtype"] == "bfloat16"
    masters = tensors(run / "checkpoints" / "step-8")
    final = tensors(run / "final")
    assert masters.keys() == final.keys()
    assert all(torch.equal(final[k], masters[k].bfloat16()) for k in masters)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:] if proc.stderr else "the run ended early"
        assert time.monotonic() < end, f"{path} did not appear"
        time.sleep(0.05)


def test_sigkill_and_resume_on_cuda_repeats_the_losses_bit_for_bit(moe_store, text, tmp_path):  # noqa: F811
    """--deterministic: the killed-and-resumed run's losses after the checkpoint equal the uninterrupted run's."""
    args = [str(moe_store("mixtral")), "--data", str(text), "--steps", "12", "--save-every", "4", *COMMON]
    args += ["--deterministic", "--jitter", "0.01"]
    full_dir, killed = tmp_path / "full", tmp_path / "killed"
    done = subprocess.run(cli(*args, "--out", str(full_dir)), capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    proc = subprocess.Popen(cli(*args, "--out", str(killed)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=ENV)  # fmt: skip
    try:
        _wait_for(killed / "checkpoints" / "step-8", proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    again = subprocess.run(cli(*args, "--out", str(killed), "--resume"), capture_output=True, text=True, env=ENV,
                           timeout=300)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    full, got = losses(full_dir), losses(killed)
    assert sorted(got) == list(range(1, 13))
    resumed_at = int(again.stderr.split("resuming after step ")[1].split()[0])
    assert resumed_at in (4, 8)
    diffs = {s: got[s] - full[s] for s in range(resumed_at + 1, 13)}
    print(f"SIGKILL resume after step {resumed_at}: loss differences {diffs}")
    assert all(d == 0.0 for d in diffs.values()), diffs


def test_dry_run_memory_plan_is_within_25_percent_of_the_cuda_peak(dense_store, text, tmp_path):  # noqa: F811
    """A model big enough that the step, not the CUDA context, is the memory: hidden 512, 8 layers, 8 experts."""
    dense = dense_store("llama", hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                        num_attention_heads=8, num_key_value_heads=4, vocab_size=8192)  # fmt: skip
    moe = tmp_path / "moe"
    convert(str(dense), moe, build_spec(experts=8, top_k=2))
    spec = build_train_spec(data=str(text), steps=3, seq_len=256, micro_batch=16, save_every=3, eval_every=3)
    plan = loop.train(str(moe), None, spec, dry_run=True).plan
    estimate = plan["memory"]["total"]
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loop.train(str(moe), tmp_path / "run", spec)
    peak = torch.cuda.max_memory_allocated() - base
    print(f"memory plan {estimate / 2**20:,.0f} MiB, measured peak {peak / 2**20:,.0f} MiB ({estimate / peak:.3f}x)")
    assert 0.75 <= estimate / peak <= 1.25, (estimate, peak)


def _attention_kernels(model: torch.nn.Module, ids: torch.Tensor) -> set[str]:
    """The SDPA kernels one bf16 training forward and backward ran, by their aten names."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, labels=ids, use_cache=False).loss
        loss.backward()
    torch.cuda.synchronize()
    return {e.key for e in prof.key_averages() if "scaled_dot_product" in e.key}


def test_text_attention_takes_sdpas_flash_kernel_eager_and_compiled(moe_store):  # noqa: F811
    """Text runs attend with SDPA and no mask (upcycle/train/attention.py): eager and under torch.compile the
    attention runs a causal kernel with no mask (flash, or cuDNN where torch prefers it), never the
    memory-efficient kernel that a materialised (B, 1, S, S) mask would force."""
    from upcycle.train.attention import CAUSAL_SDPA, causal_attention_without_mask

    model = AutoModelForCausalLM.from_pretrained(moe_store("mixtral")).to(CUDA)
    model.train()
    ids = torch.randint(3, model.config.vocab_size, (2, 64), device=CUDA)
    assert causal_attention_without_mask(model, 64) == CAUSAL_SDPA
    kernels = {"eager": _attention_kernels(model, ids)}
    torch._dynamo.reset()
    model.compile()
    _attention_kernels(model, ids)  # compiles
    kernels["compiled"] = _attention_kernels(model, ids)
    print(kernels)  # the GPU check's log keeps what each ran
    for mode, names in kernels.items():
        assert any("flash" in n or "cudnn" in n for n in names), (mode, names)
        assert not any("efficient" in n for n in names), (mode, names)


def _lm_loss_step(model: torch.nn.Module, ids: torch.Tensor, chunk: int | None) -> tuple[torch.Tensor, dict, int]:
    """test_train_lm_loss's bf16-autocast step (the model's own loss for chunk None, else --lm-loss chunked's), and
    its peak bytes above the start on a GPU (0 elsewhere)."""
    from test_train_lm_loss import _step

    model.zero_grad(set_to_none=True)  # the last step's gradients out of the start
    on_cuda = ids.device.type == "cuda"
    if on_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated() if on_cuda else 0
    loss, grads = _step(model, ids, ids, chunk, autocast=True)
    peak = torch.cuda.max_memory_allocated() - start if on_cuda else 0
    return loss, grads, peak


def test_the_chunked_lm_loss_on_cuda_agrees_in_bf16_and_takes_less_memory(device: torch.device = CUDA):
    """--lm-loss chunked under bf16 autocast on the GPU: the loss and gradients of the model's own loss to bf16
    rounding, and a smaller peak: a 32,000-entry vocabulary at 4 × 2,048 tokens holds 1 GiB of fp32 logits, and the
    model's loss several times that."""
    from transformers import AutoConfig

    from upcycle.train.lm_loss import chunk_tokens

    config = AutoConfig.for_model(
        "llama", vocab_size=32000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(device)
    ids = torch.randint(3, 32000, (4, 2048), generator=torch.Generator().manual_seed(1)).to(device)
    own_loss, own_grads, own_peak = _lm_loss_step(model, ids, None)
    loss, grads, peak = _lm_loss_step(model, ids, chunk_tokens(32000))
    assert abs(loss.item() - own_loss.item()) <= 2e-3 * own_loss.item()
    for name, grad in own_grads.items():
        assert rel(grads[name], grad) < 3e-2, name
    if device.type == "cuda":
        assert peak < 0.5 * own_peak, (peak, own_peak)

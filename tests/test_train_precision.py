"""`upcycle train --dtype bf16` in one process: float32 master weights and AdamW states, bf16 matmuls under
autocast (the experts' grouped_mm included), final/ written in bf16."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
import torch.nn.functional as F
from test_train import moe_store, tensors, text, train, train_records  # noqa: F401  (fixtures)
from transformers import AutoModelForCausalLM

from upcycle.train.distributed import DistEnv
from upcycle.train.model import compute_context
from upcycle.train.spec import TrainSpec

BF16 = TrainSpec(dtype="bf16")


def test_grouped_mm_runs_in_bf16_under_autocast():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(24, 32, generator=gen)  # (S, H) fp32, as the experts get it from the fp32 residual stream
    w = torch.randn(4, 32, 64, generator=gen)  # (E, H, I) fp32 master weights
    offs = torch.tensor([5, 11, 20, 24], dtype=torch.int32)
    with compute_context(DistEnv(), BF16, torch.bfloat16):
        y = F.grouped_mm(x, w, offs=offs)  # (S, I)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, F.grouped_mm(x.bfloat16(), w.bfloat16(), offs=offs))
    assert F.grouped_mm(x, w, offs=offs).dtype == torch.float32  # outside autocast nothing changes


def test_one_process_on_a_gpu_runs_under_autocast_and_fsdp_casts_under_torchrun(monkeypatch):
    """Found on an H200: a one-process GPU run took FSDP2's mixed-precision policy as its bf16 path, but nothing is
    wrapped in one process, so the whole step ran in float32 (2-4x slower, and beyond the memory plan)."""
    from upcycle.train import model as train_model
    from upcycle.train.distributed import mixed_precision

    asked: list[str] = []
    monkeypatch.setattr(train_model, "enable_grouped_mm_autocast", lambda device_type, dtype: asked.append(device_type))
    gpu = torch.device("cuda", 0)
    one = DistEnv(device=gpu)
    assert mixed_precision(one, BF16) is None  # one process: no FSDP, so no policy to rely on
    ctx = compute_context(one, BF16, torch.bfloat16)
    assert isinstance(ctx, torch.autocast) and ctx.device == "cuda" and ctx.fast_dtype == torch.bfloat16
    assert asked == ["cuda"]  # and grouped_mm follows it
    launched = DistEnv(device=gpu, launched=True)  # torchrun, even with one process: FSDP2 casts the weights
    assert mixed_precision(launched, BF16).param_dtype == torch.bfloat16
    assert isinstance(compute_context(launched, BF16, torch.bfloat16), contextlib.nullcontext)
    assert mixed_precision(DistEnv(device=torch.device("cpu"), launched=True), BF16) is None  # gloo: autocast


def test_fp32_compute_has_no_autocast():
    with compute_context(DistEnv(), TrainSpec(dtype="fp32"), torch.float32):
        assert not torch.is_autocast_enabled("cpu")


def test_grouped_mm_and_eager_experts_agree_under_autocast(moe_store):  # noqa: F811
    ids = torch.tensor([[1, 5, 9, 14, 3, 22, 7, 30, 11, 2, 19, 25]])
    logits = {}
    for impl in ("grouped_mm", "eager"):
        model = AutoModelForCausalLM.from_pretrained(moe_store("mixtral"), experts_implementation=impl)
        assert next(model.parameters()).dtype == torch.float32
        with torch.no_grad():
            with compute_context(DistEnv(), BF16, torch.bfloat16):
                logits[impl] = model(ids).logits.float()
            logits[f"{impl}-fp32"] = model(ids).logits
    scale = logits["eager-fp32"].abs().max()
    bf16_error = (logits["eager"] - logits["eager-fp32"]).abs().max()
    assert bf16_error > 1e-4 * scale  # autocast really ran the model in bf16
    # grouped_mm's experts in bf16 as well: the two kernels agree far below bf16's error (here exactly; with the
    # experts left in float32 the gap was 2.0e-3 against a bf16 error of 1.6e-3)
    assert (logits["grouped_mm"] - logits["eager"]).abs().max() <= 0.1 * bf16_error


@pytest.mark.parametrize("impl", ["grouped_mm", "eager"])
def test_bf16_run_keeps_fp32_masters_and_loss_falls(impl, moe_store, text, tmp_path):  # noqa: F811
    src = moe_store("mixtral")
    out = tmp_path / "run"
    options = dict(data=str(text), steps=20, lr=3e-3, dtype="bf16", experts_impl=impl, save_every=20)
    result = train(src, out, **options, save_dtype="bfloat16")  # final/ defaults to MODEL's float32
    assert result.plan["dtype"] == "bfloat16" and result.summary["experts_implementation"] == impl
    records = train_records(out)
    first, last = sum(r["lm"] for r in records[:4]) / 4, sum(r["lm"] for r in records[-4:]) / 4
    assert last < first - 0.3, (first, last)
    masters = tensors(out / "checkpoints" / "step-20")  # what a resumed run continues from: float32
    final = tensors(out / "final")  # the published model: in --save-dtype bfloat16
    assert masters.keys() == final.keys()
    assert {t.dtype for t in masters.values()} == {torch.float32}
    assert {t.dtype for t in final.values()} == {torch.bfloat16}
    assert json.loads((out / "final" / "config.json").read_text())["dtype"] == "bfloat16"
    for key in masters:
        assert torch.equal(final[key], masters[key].bfloat16())
    state = torch.load(out / "checkpoints" / "step-20" / "optimizer.pt", weights_only=True)
    moments = [t for s in state["state"].values() for k, t in s.items() if k in ("exp_avg", "exp_avg_sq")]
    assert moments and {t.dtype for t in moments} == {torch.float32}


def test_an_update_below_bf16_resolution_still_moves_the_masters(moe_store, text, tmp_path):  # noqa: F811
    src = moe_store("mixtral")
    out = tmp_path / "run"
    train(src, out, data=str(text), steps=1, lr=1e-6, warmup=0, dtype="bf16", save_every=1)
    before, after = tensors(src), tensors(out / "checkpoints" / "step-1")
    key = next(k for k in before if ".experts." in k)
    old, new = before[key].float(), after[key]
    moved = old != new
    assert moved.float().mean() > 0.5, key  # AdamW's first step moves nearly every element by ~lr
    assert (new - old).abs().max() < 1e-5
    # in bf16 the same update would round away: almost every moved element rounds back to its old bf16 value
    lost = (new.bfloat16() == old.bfloat16()) & moved
    assert lost.sum() > 0.9 * moved.sum()


def _bf16_copy(src, folder):
    """SRC with every floating tensor in bfloat16 and config.json saying so: a MODEL stored in bf16."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(src, folder)
    for file in folder.glob("*.safetensors"):
        state = tensors(file.parent)
        save_file({k: v.bfloat16() for k, v in state.items() if k in _keys(file)}, file, metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["dtype"] = "bfloat16"
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def _keys(file) -> set[str]:
    from safetensors import safe_open

    with safe_open(file, "pt") as fh:
        return set(fh.keys())


@pytest.mark.parametrize("save_dtype", ["source", "float32", "float16"])
def test_final_is_written_in_the_source_dtype_unless_asked(save_dtype, moe_store, text, tmp_path):  # noqa: F811
    """final/ takes MODEL's dtype (bf16 here) by default, --save-dtype otherwise; checkpoints keep fp32 masters,
    and the frozen tensors come back as MODEL's own values in the dtype asked."""
    from upcycle.train.model import source_dtype

    src = _bf16_copy(moe_store("mixtral"), tmp_path / "bf16")
    assert source_dtype(src) == "bfloat16" and source_dtype(moe_store("mixtral")) == "float32"
    out = tmp_path / "run"
    train(src, out, data=str(text), steps=2, lr=1e-2, train="experts", save_every=2, eval_every=2,
          save_dtype=save_dtype)  # fmt: skip
    want = {"source": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[save_dtype]
    source, final = tensors(src), tensors(out / "final")
    assert final.keys() == source.keys() and {t.dtype for t in final.values()} == {want}
    assert json.loads((out / "final" / "config.json").read_text())["dtype"] == str(want).removeprefix("torch.")
    final_bytes = sum(f.stat().st_size for f in (out / "final").glob("*.safetensors"))
    source_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    assert final_bytes == pytest.approx(source_bytes * want.itemsize / 2, rel=0.02)  # headers differ a little
    experts = [k for k in source if ".experts." in k]
    frozen = [k for k in source if ".experts." not in k]
    assert all(torch.equal(final[k], source[k].to(want)) for k in frozen)  # bf16 -> fp32 -> want: exact
    assert not all(torch.equal(final[k], source[k].to(want)) for k in experts)
    from safetensors import safe_open

    with safe_open(out / "checkpoints" / "step-2" / "trainable.safetensors", "pt") as fh:
        assert {fh.get_tensor(k).dtype for k in fh.keys()} == {torch.float32}

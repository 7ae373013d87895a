"""Data parallelism: one process is the plain path; full state dicts resume exactly; torchrun + FSDP2 on CPU (gloo)."""

from __future__ import annotations

import torch

from upcycle.convert.pipeline import convert
from upcycle.convert.spec import build_spec
from upcycle.train.distributed import (
    DistEnv,
    all_reduce_sum,
    broadcast_object,
    full_model_state,
    full_optimizer_state,
    gather_objects,
    init_distributed,
    load_full_model_state,
    load_full_optimizer_state,
    mean_over_ranks,
    wrap_model,
)
from upcycle.train.spec import TrainSpec


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
    assert mean_over_ranks({"lm": 2.5, "z": 0.25}, env) == {"lm": 2.5, "z": 0.25}
    assert gather_objects({"a": 1}, env) == [{"a": 1}]
    assert broadcast_object("x", env) == "x"


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

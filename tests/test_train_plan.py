"""The TrainPlan: `upcycle train --dry-run --json -` is an interface, so its keys and their order are pinned."""

from __future__ import annotations

import json

from test_train import moe_store, text  # noqa: F401  (fixtures)

from upcycle.train import loop
from upcycle.train.plan import TrainPlan
from upcycle.train.spec import build_train_spec
from upcycle_cli.main import run

PLAN_KEYS = [
    "model",
    "architecture",
    "moe_layers",
    "layers",
    "experts",
    "top_k",
    "params_total",
    "params_trainable",
    "train",
    "world_size",
    "sharding",
    "device",
    "dtype",
    "experts_impl",
    "seq_len",
    "micro_batch",
    "grad_accum",
    "tokens_per_step",
    "steps",
    "tokens",
    "lr",
    "min_lr",
    "warmup",
    "eval_every",
    "save_every",
    "memory",
]
MEMORY_KEYS = [
    "precision",
    "world_size",
    "tokens",
    "grad_checkpointing",
    "weights",
    "grads",
    "optimizer",
    "working",
    "optimizer_step",
    "activations",
    "activations_checkpointed",
    "logits",
    "optimizer_name",
    "lm_loss",
    "logits_chunked",
    "runtime",
    "mapped",
    "load_extra",
    "save_extra",
    "states",
    "load_peak",
    "step_peak",
    "save_peak",
    "phase",
    "total",
    "total_without_checkpointing",
    "total_with_checkpointing",
    "available",
    "available_what",
    "fits",
    "fits_with_checkpointing",
    "options",
]


def test_dry_run_json_keys_are_pinned(moe_store, text, capsys):  # noqa: F811
    args = ["train", str(moe_store("qwen2_moe")), "--data", str(text), "--steps", "10", "--seq-len", "32"]
    capsys.readouterr()
    assert run([*args, "--dry-run", "--gpu-mem", "8", "--json", "-"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert list(plan) == PLAN_KEYS
    assert list(plan["memory"]) == MEMORY_KEYS
    assert plan["moe_layers"] == [1, 3] and plan["sharding"] is None and plan["memory"]["available"] == 8 << 30


def test_the_typed_plan_is_its_json(moe_store, text):  # noqa: F811
    spec = build_train_spec(data=str(text), steps=10, seq_len=32, micro_batch=2)
    plan = loop.train(str(moe_store("mixtral")), None, spec, dry_run=True).plan
    assert isinstance(plan, TrainPlan)
    as_json = plan.to_dict()
    assert list(as_json) == PLAN_KEYS and json.loads(json.dumps(as_json)) == as_json
    assert plan["steps"] == plan.steps == 10 and plan["moe_layers"] == list(plan.moe_layers) == [0, 1, 2, 3]
    assert plan.memory is not None and plan["memory"] == plan.memory.to_dict()


def test_fsdp_with_grad_accum_reduces_once_a_step_when_the_unsharded_gradients_fit(moe_store):  # noqa: F811
    import torch

    from upcycle.source import read_config
    from upcycle.train.distributed import DistEnv
    from upcycle.train.model import moe_target
    from upcycle.train.plan import make_plan

    folder = moe_store("mixtral")
    config = read_config(folder)
    target = moe_target(config, str(folder))
    params = (1_000_000, 600_000)

    def plan(world_size: int, grad_accum: int, available: int):
        spec = build_train_spec(data="unused.txt", steps=4, seq_len=32, micro_batch=2, grad_accum=grad_accum)
        env = DistEnv(world_size=world_size)
        return make_plan(
            str(folder), config, target, spec, env, layers=[0, 1, 2, 3], params=params, dtype=torch.float32,
            experts_impl="grouped_mm", available=(available, "test"), dry_run=True,
        )  # fmt: skip

    roomy, tight = 1 << 40, 1 << 20
    last = plan(2, 2, roomy)
    assert last.sync_last_micro_batch_only and "sync_last_micro_batch_only" not in last.to_dict()
    assert last.memory.estimate.grads == 600_000 * 4  # every rank holds full fp32 gradients between micro-batches
    every = plan(2, 2, tight)
    assert not every.sync_last_micro_batch_only and every.memory.estimate.grads == 300_000 * 4  # sharded
    assert not plan(2, 1, roomy).sync_last_micro_batch_only  # one micro-batch: nothing to save
    assert not plan(1, 2, roomy).sync_last_micro_batch_only  # one process: nothing to reduce

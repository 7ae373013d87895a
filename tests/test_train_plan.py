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
    "states",
    "total",
    "total_without_checkpointing",
    "total_with_checkpointing",
    "available",
    "available_what",
    "fits",
    "fits_with_checkpointing",
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

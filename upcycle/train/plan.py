"""What a run is, decided before its first step: the TrainPlan, which `--dry-run` prints (as a table, or as JSON
with `--json`), and its memory estimate.

Frozen and built once: setup.py makes it (from a meta-device model for --dry-run, from the loaded model for a
run), the loop, the export and the CLI read it. `to_dict()` is the plan's JSON; its keys and their order are an
interface (tests/test_train_plan.py pins them).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .distributed import DistEnv, sharding
from .memory import MemoryEstimate, estimate
from .spec import TrainSpec, TrainWhat

if TYPE_CHECKING:
    import torch

    from ..arch import Target


def public_name(value: str) -> str:
    """A data source or model as the card and upcycle.json may name it: a local path by its last part only."""
    path = Path(value).expanduser()
    return path.resolve().name if path.exists() else value


def model_identity(value: str) -> str:
    """MODEL as a resumed run compares it: a local folder by its absolute path, a Hub id as given."""
    path = Path(value).expanduser()
    return str(path.resolve()) if path.exists() else value


def moe_shape(config: dict[str, Any], target: Target) -> tuple[int, int, bool]:
    """(experts, top-k, renormalise kept weights) from the target's config fields."""
    experts = int(config[target.config["experts"]])
    top_k = int(config[target.config["top_k"]])
    renorm = target.renormalize == "always" or bool(config.get(target.renormalize))
    return experts, top_k, renorm


@dataclass(frozen=True)
class MemoryPlan:
    """The memory estimate per process (upcycle/train/memory.py) against what is available."""

    estimate: MemoryEstimate
    available: int  # bytes
    available_what: str  # where `available` comes from: --gpu-mem, the GPU, or RAM

    def to_dict(self) -> dict[str, Any]:
        return self.estimate.to_dict() | {
            "available": self.available,
            "available_what": self.available_what,
            "fits": self.estimate.fits(self.available),
            "fits_with_checkpointing": self.estimate.fits(self.available, checkpointed=True),
        }


def memory_plan(
    config: dict[str, Any],
    params: tuple[int, int],
    spec: TrainSpec,
    env: DistEnv,
    available: tuple[int, str],
    *,
    unsharded_grads: bool = False,
) -> MemoryPlan:
    """Memory per process (weights, gradients, AdamW states, activations with and without grad checkpointing) and
    whether it fits `available` (memory.available_memory: --gpu-mem, the GPU present, or on CPU the RAM)."""
    est = estimate(
        config,
        spec,
        trainable_params=params[1],
        total_params=params[0],
        world_size=env.world_size,
        on_gpu=env.device.type == "cuda",
        sharded=env.distributed,
        unsharded_grads=unsharded_grads,
    )
    return MemoryPlan(est, *available)


def grad_sync_on_last_micro_batch(env: DistEnv, spec: TrainSpec, with_unsharded_grads: MemoryPlan) -> bool:
    """Whether FSDP skips the gradient reduce-scatter on all but the last micro-batch of a step.

    It pays only under FSDP with --grad-accum > 1 (one reduce-scatter per step instead of one per micro-batch), and
    it costs memory: between micro-batches each rank holds the unsharded (full-size, float32) gradients of every
    trainable parameter instead of its shard. So it is taken only when the estimate with those gradients still
    fits the memory available (--gpu-mem decides when given); else gradients are reduced after every micro-batch,
    as FSDP does by default."""
    if not env.distributed or spec.grad_accum < 2:
        return False
    return with_unsharded_grads.estimate.fits(with_unsharded_grads.available)


@dataclass(frozen=True)
class TrainPlan:
    """What the run is. Field order is the JSON's key order."""

    model: str  # public_name of MODEL
    architecture: str
    moe_layers: tuple[int, ...]
    layers: int  # decoder layers, MoE or not
    experts: int
    top_k: int
    params_total: int
    params_trainable: int
    train: TrainWhat
    world_size: int
    sharding: str | None  # e.g. "FSDP2 over nccl, 2 processes"; None in one plain process
    device: str  # "cpu" or "cuda"
    dtype: str  # the compute dtype: "float32" or "bfloat16"
    experts_impl: str  # asked for in --dry-run; what transformers settled on in a run
    seq_len: int
    micro_batch: int
    grad_accum: int
    tokens_per_step: int
    steps: int
    tokens: int
    lr: float
    min_lr: float
    warmup: int
    eval_every: int
    save_every: int
    memory: MemoryPlan | None = None  # in --dry-run only
    # Under FSDP with --grad-accum > 1: reduce-scatter the gradients on the last micro-batch of a step only
    # (grad_sync_on_last_micro_batch); the memory plan then counts unsharded gradients. Not in the JSON.
    sync_last_micro_batch_only: bool = field(default=False, metadata={"json": False})

    def to_dict(self) -> dict[str, Any]:
        """The plan as `--dry-run --json` writes it."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.metadata.get("json", True):
                value = getattr(self, f.name)
                if isinstance(value, tuple):
                    value = list(value)
                elif isinstance(value, MemoryPlan):
                    value = value.to_dict()
                out[f.name] = value
        return out

    def __getitem__(self, key: str) -> Any:
        """plan["steps"]: the JSON view, key by key."""
        return self.to_dict()[key]

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.dtype)


def make_plan(
    model_name: str,
    config: dict[str, Any],
    target: Target,
    spec: TrainSpec,
    env: DistEnv,
    *,
    layers: list[int],
    params: tuple[int, int],
    dtype: torch.dtype,
    experts_impl: str,
    available: tuple[int, str],
    dry_run: bool,
) -> TrainPlan:
    """The plan of training `model_name` (its config and target) with `spec` on `env`: MoE `layers`, (total,
    trainable) `params`, the compute `dtype`, the experts kernel and the memory `available` (measured before the
    model is loaded). With dry_run it carries the memory estimate; a run only uses it to choose the gradient sync."""
    total = spec.total_steps(env.world_size)
    experts, top_k, _ = moe_shape(config, target)
    deferred = memory_plan(config, params, spec, env, available, unsharded_grads=True)
    last_only = grad_sync_on_last_micro_batch(env, spec, deferred)
    memory = deferred if last_only else memory_plan(config, params, spec, env, available)
    return TrainPlan(
        model=public_name(model_name),
        architecture=target.architecture,
        moe_layers=tuple(layers),
        layers=int(config.get("num_hidden_layers", 0)),
        experts=experts,
        top_k=top_k,
        params_total=params[0],
        params_trainable=params[1],
        train=spec.train,
        world_size=env.world_size,
        sharding=sharding(env),
        device=env.device.type,
        dtype=str(dtype).removeprefix("torch."),
        experts_impl=experts_impl,
        seq_len=spec.seq_len,
        micro_batch=spec.micro_batch,
        grad_accum=spec.grad_accum,
        tokens_per_step=spec.tokens_per_step(env.world_size),
        steps=total,
        tokens=total * spec.tokens_per_step(env.world_size),
        lr=spec.lr,
        min_lr=spec.final_lr(),
        warmup=spec.warmup_steps(total),
        eval_every=spec.every("eval_every", total),
        save_every=spec.every("save_every", total),
        memory=memory if dry_run else None,
        sync_last_micro_batch_only=last_only,
    )

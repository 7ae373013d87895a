"""What a run is, decided before its first step: the TrainPlan, which `--dry-run` prints (as a table, or as JSON
with `--json`), and its memory estimate.

Frozen and built once: setup.py makes it (from a meta-device model for --dry-run, from the loaded model for a
run), the loop, the export and the CLI read it. `to_dict()` is the plan's JSON; its keys and their order are an
interface (tests/test_train_plan.py pins them).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..source import public_name
from .distributed import DistEnv, sharding
from .lm_loss import chunked_available
from .memory import DTYPE_BYTES, GiB, MemoryEstimate, estimate
from .optim import eight_bit_available
from .spec import TrainSpec, TrainWhat

if TYPE_CHECKING:
    import torch

    from ..arch import Target


def model_identity(value: str) -> str:
    """MODEL as a resumed run compares it: a local folder by its absolute path, a Hub id as given."""
    path = Path(value).expanduser()
    return str(path.resolve()) if path.exists() else value


def moe_shape(config: dict[str, Any], target: Target | None) -> tuple[int, int, bool]:
    """(experts, top-k, renormalise kept weights) from the target's config fields; (0, 0, False) for a dense model."""
    if target is None:
        return 0, 0, False
    experts = int(config[target.config["experts"]])
    top_k = int(config[target.config["top_k"]])
    renorm = target.renormalize == "always" or bool(config.get(target.renormalize))
    return experts, top_k, renorm


def architecture(config: dict[str, Any], target: Target | None) -> str:
    """The class a run trains: the MoE target's, or a dense model's own (config.json's `architectures`)."""
    if target is not None:
        return target.architecture
    names = config.get("architectures") or [f"{config.get('model_type')} causal LM"]
    return str(names[0])


@dataclass(frozen=True)
class Footprint:
    """What the memory estimate reads from the model itself, for every choice of --train and --optimizer (so that a
    run which does not fit can say which choices would): counted on a meta-device model before any weight is read."""

    params: dict[str, tuple[int, int]]  # --train choice -> (total, trainable) parameters
    optimizer_state: dict[str, dict[str, int]]  # --train choice -> --optimizer -> bytes of optimizer state
    biggest: dict[str, int]  # --train choice -> elements of the largest trainable tensor
    source_bytes: int = 0  # the weight files loaded
    source_cast: bool = False  # they hold another dtype than float32
    source_dtype: str = "float32"  # the dtype of most of their weights (final/'s with --save-dtype source)
    source_restacked: int = 0  # bytes of float32 parameters the loader builds from several stored tensors

    def estimate_args(self, spec: TrainSpec) -> dict[str, Any]:
        total, trainable = self.params[spec.train]
        return dict(
            trainable_params=trainable,
            total_params=total,
            optimizer_state=self.optimizer_state[spec.train][spec.optimizer],
            biggest_param=self.biggest[spec.train],
            source_bytes=self.source_bytes,
            source_cast=self.source_cast,
            source_restacked=self.source_restacked,
            save_param_bytes=DTYPE_BYTES[self.source_dtype if spec.save_dtype == "source" else spec.save_dtype],
        )


@dataclass(frozen=True)
class FitOption:
    """A change of options that makes the run fit, and the peak it would have."""

    flags: str  # e.g. "--optimizer adafactor --grad-checkpointing"
    total: int  # bytes

    def __str__(self) -> str:
        return f"{self.flags} ({self.total / GiB:.2f} GiB)"


@dataclass(frozen=True)
class MemoryPlan:
    """The memory estimate per process (upcycle/train/memory.py) against what is available, and when it does not
    fit, the options that would."""

    estimate: MemoryEstimate
    available: int  # bytes
    available_what: str  # where `available` comes from: --gpu-mem, the GPU, or RAM
    options: tuple[FitOption, ...] = ()  # empty when the run fits (or when nothing was tried)

    @property
    def fits(self) -> bool:
        return self.estimate.fits(self.available)

    def to_dict(self) -> dict[str, Any]:
        return self.estimate.to_dict() | {
            "available": self.available,
            "available_what": self.available_what,
            "fits": self.fits,
            "fits_with_checkpointing": self.estimate.fits(self.available, checkpointed=True),
            "options": [{"flags": o.flags, "total": o.total} for o in self.options],
        }

    def refusal(self) -> str:
        """The one line that refuses a run which does not fit."""
        est = self.estimate
        return (
            f"this run needs about {est.total / GiB:.2f} GiB at its peak ({est.phase()}) and {self.available / GiB:.2f}"
            f" GiB is available ({self.available_what}); {self.advice()}, or pass --force-memory to start anyway"
        )

    def advice(self) -> str:
        if not self.options:
            return "no change of --train, --optimizer, --lm-loss, --grad-checkpointing or --micro-batch makes it fit"
        return "it fits with " + "; or ".join(str(o) for o in self.options)


def memory_plan(
    config: dict[str, Any],
    params: tuple[int, int],
    spec: TrainSpec,
    env: DistEnv,
    available: tuple[int, str],
    *,
    unsharded_grads: bool = False,
    footprint: Footprint | None = None,
) -> MemoryPlan:
    """Memory per process (weights, gradients, optimizer states, activations with and without grad checkpointing,
    and on CPU the load and save peaks) and whether it fits `available` (memory.available_memory: --gpu-mem, the
    GPU present, or on CPU the RAM). With a footprint, the estimate counts the optimizer's real state, and a run
    that does not fit carries the options that would make it fit."""
    est = _estimate(config, params, spec, env, unsharded_grads, footprint)
    plan = MemoryPlan(est, *available)
    if footprint is None or plan.fits:
        return plan
    return replace(plan, options=fit_options(config, spec, env, available[0], footprint, unsharded_grads))


def _estimate(
    config: dict[str, Any],
    params: tuple[int, int],
    spec: TrainSpec,
    env: DistEnv,
    unsharded_grads: bool,
    footprint: Footprint | None,
) -> MemoryEstimate:
    counts = (
        footprint.estimate_args(spec)
        if footprint is not None
        else dict(trainable_params=params[1], total_params=params[0])
    )
    return estimate(
        config,
        spec,
        world_size=env.world_size,
        on_gpu=env.device.type == "cuda",
        sharded=env.distributed,
        unsharded_grads=unsharded_grads,
        **counts,
    )


def _variants(
    spec: TrainSpec, eight_bit: bool = False, chunked_lm_loss: bool = False
) -> list[tuple[str, dict[str, Any]]]:
    """Single changes that lower the peak, each as (flags, TrainSpec fields), lightest change first; `eight_bit`:
    --optimizer adamw8bit can run (bitsandbytes installed, one process); `chunked_lm_loss`: --lm-loss chunked can
    (lm_loss.CHUNKED_TYPES)."""
    out: list[tuple[str, dict[str, Any]]] = []
    if spec.lm_loss == "model" and chunked_lm_loss:
        out.append(("--lm-loss chunked", {"lm_loss": "chunked"}))
    if not spec.grad_checkpointing:
        out.append(("--grad-checkpointing", {"grad_checkpointing": True}))
    if spec.optimizer == "adamw" and eight_bit:
        out.append(("--optimizer adamw8bit", {"optimizer": "adamw8bit"}))
    if spec.optimizer in ("adamw", "adamw8bit"):
        out.append(("--optimizer adafactor", {"optimizer": "adafactor"}))
    micro = spec.micro_batch // 2
    while micro >= 1:  # the same tokens per step
        accum = spec.grad_accum * spec.micro_batch // micro if spec.micro_batch % micro == 0 else None
        if accum is not None:
            out.append((f"--micro-batch {micro} --grad-accum {accum}", {"micro_batch": micro, "grad_accum": accum}))
        micro //= 2
    smaller = {"all": ("experts", "router"), "non-experts": ("router",), "experts": ("router",), "router": ()}
    out += [(f"--train {what}", {"train": what}) for what in smaller[spec.train]]
    return out


def fit_options(
    config: dict[str, Any],
    spec: TrainSpec,
    env: DistEnv,
    available: int,
    footprint: Footprint,
    unsharded_grads: bool = False,
    most: int = 5,  # room for both lighter optimizers beside the other changes
) -> tuple[FitOption, ...]:
    """Up to `most` changes of --lm-loss, --grad-checkpointing, --optimizer, --micro-batch (same tokens per step) or
    --train that make the run fit, each alone; when none does alone, the first combination that does (the changes
    added in order). Empty when nothing tried fits."""

    def total(fields_: dict[str, Any]) -> int:
        return _estimate(config, (0, 0), replace(spec, **fields_), env, unsharded_grads, footprint).total

    eight_bit = not env.distributed and eight_bit_available()
    variants = _variants(spec, eight_bit, chunked_available(config))
    variants = [v for v in variants if v[1].get("train", spec.train) in footprint.params]  # dense: all only
    single = [FitOption(flags, t) for flags, change in variants if (t := total(change)) <= available]
    if single:
        return tuple(sorted(single, key=lambda o: -o.total)[:most])
    flags: list[str] = []
    merged: dict[str, Any] = {}
    for flag, change in variants:
        if "train" in change and "train" in merged:
            continue  # one --train at a time: experts before router
        if "micro_batch" in change and "micro_batch" in merged:
            merged.update(change)
            flags[-1] = flag
        else:
            merged.update(change)
            flags.append(flag)
        t = total(merged)
        if t <= available:
            return (FitOption(" ".join(flags), t),)
    return ()


def grad_sync_on_last_micro_batch(env: DistEnv, spec: TrainSpec, with_unsharded_grads: MemoryPlan) -> bool:
    """Whether FSDP skips the gradient reduce-scatter on all but the last micro-batch of a step.

    It pays only under FSDP with --grad-accum > 1 (one reduce-scatter per step instead of one per micro-batch), and
    it costs memory: between micro-batches each rank holds the unsharded (full-size, float32) gradients of every
    trainable parameter instead of its shard. So it is taken only when the estimate with those gradients still
    fits the memory available (--gpu-mem decides when given); else gradients are reduced after every micro-batch,
    as FSDP does by default."""
    if not env.distributed or spec.grad_accum < 2:
        return False
    return with_unsharded_grads.fits


@dataclass(frozen=True)
class TrainPlan:
    """What the run is. Field order is the JSON's key order."""

    model: str  # public_name of MODEL
    architecture: str
    moe_layers: tuple[int, ...]
    layers: int  # decoder layers, MoE or not
    experts: int  # 0 for a dense model
    top_k: int  # 0 for a dense model
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

    @property
    def dense(self) -> bool:
        """A model with no MoE layer: no routers, so no router loss terms and no load."""
        return not self.moe_layers

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
    target: Target | None,
    spec: TrainSpec,
    env: DistEnv,
    *,
    layers: list[int],
    params: tuple[int, int],
    dtype: torch.dtype,
    experts_impl: str,
    available: tuple[int, str],
    dry_run: bool,
    footprint: Footprint | None = None,
) -> TrainPlan:
    """The plan of training `model_name` (its config and target) with `spec` on `env`: MoE `layers`, (total,
    trainable) `params`, the compute `dtype`, the experts kernel and the memory `available` (measured before the
    model is loaded); `footprint` (counted before loading) makes the estimate exact for the optimizer and the load.
    With dry_run it carries the memory estimate; a run only uses it to choose the gradient sync."""
    total = spec.total_steps(env.world_size)
    experts, top_k, _ = moe_shape(config, target)
    deferred = memory_plan(config, params, spec, env, available, unsharded_grads=True, footprint=footprint)
    last_only = grad_sync_on_last_micro_batch(env, spec, deferred)
    memory = deferred if last_only else memory_plan(config, params, spec, env, available, footprint=footprint)
    return TrainPlan(
        model=public_name(model_name),
        architecture=architecture(config, target),
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

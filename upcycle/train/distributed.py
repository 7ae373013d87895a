"""Data parallelism for `upcycle train` under torchrun: FSDP2, collectives, and full (gathered) state dicts.

One process (no torchrun) is the same code path with world_size 1: nothing is wrapped and every collective is a
no-op. Under `torchrun --nproc-per-node N` each rank gets its own slice of the data; `wrap_model` shards every
decoder layer and then the root with `fully_shard` (FSDP2), so parameters, gradients and AdamW states are split
across ranks (transformers keeps experts as 3-D [E, ...] parameters, so Shard(0) puts whole experts on ranks).

Checkpoints: not torch.distributed.checkpoint. DCP's FileSystemReader.read_metadata (torch 2.13) reads the
`.metadata` file with plain `pickle.load`, and its default planner loads non-tensor items with
`torch.load(weights_only=False)`: loading a checkpoint folder would run whatever code it contains. Instead the
model and optimizer states are gathered to rank 0 as plain full tensors (`full_state_dict=True, cpu_offload=True`),
written there like a one-process checkpoint (safetensors for the model, `torch.save` of tensors and numbers for
the optimizer), read back on rank 0 with `weights_only=True`, and broadcast into the sharded model
(`broadcast_from_rank0=True`). The same files serve 1 or N processes, so a run may resume on another world size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..errors import UpcycleError
from .spec import TrainSpec


@dataclass(frozen=True)
class DistEnv:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    launched: bool = False  # started by torchrun: a process group and FSDP2 even with one process

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or self.launched


def init_distributed(device: str | None = None) -> DistEnv:
    """Read torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK) and join the process group: nccl on GPU, gloo on CPU.

    Under torchrun the group is joined and the model sharded with FSDP2 whatever the world size, so that
    `torchrun --nproc-per-node 1` runs the same code as N processes (on one GPU that is the only way to run it).
    device: "cpu" or "cuda" to force one; by default CUDA when it is available.
    """
    launched = "TORCHELASTIC_RUN_ID" in os.environ  # set by torchrun (torch.distributed.run) for every worker
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device is None else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise UpcycleError("CUDA was asked for but torch sees no GPU; run on CPU or check the CUDA install")
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise UpcycleError(
                f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                "give torchrun --nproc-per-node at most the number of GPUs"
            )
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if (world_size > 1 or launched) and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return DistEnv(world_size=world_size, rank=rank, local_rank=local_rank, device=dev, launched=launched)


def sharding(env: DistEnv) -> str | None:
    """How the model is spread over processes, for the plan (e.g. "FSDP2 over nccl, 1 process"); None: one process."""
    if not env.distributed:
        return None
    backend = dist.get_backend() if dist.is_initialized() else "no process group"
    return f"FSDP2 over {backend}, {env.world_size} process{'es' if env.world_size > 1 else ''}"


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks, through transformers' own accessor (every supported class has `get_decoder().layers`)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UpcycleError(f"cannot find the decoder layers of {type(model).__name__} to shard them")
    return layers


def mixed_precision(env: DistEnv, spec: TrainSpec) -> Any:
    """FSDP2's bf16 compute with fp32 gradient reduction, under torchrun on GPUs when --dtype is bf16 (or auto);
    None elsewhere: in one process (nothing is wrapped, so nothing would cast: autocast does it, see
    loop.compute_context), on CPU, or with fp32.

    The model itself stays fp32 (load it so): FSDP2 casts the gathered parameters for forward and backward and
    keeps the fp32 shards as the optimizer's master weights.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if not env.distributed or env.device.type != "cuda" or spec.dtype == "fp32":
        return None
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def wrap_model(model: nn.Module, env: DistEnv, spec: TrainSpec) -> nn.Module:
    """FSDP2 under torchrun: `fully_shard` each decoder layer, then the root (embeddings, final norm, head).

    Call after the model is on env.device, after freezing (frozen parameters are sharded too, they just get no
    gradient), after enabling gradient checkpointing and after installing hooks, and before building the
    optimizer (which must see the sharded parameters). One process: the model unchanged.
    """
    if not env.distributed:
        return model
    from torch.distributed.fsdp import fully_shard

    kwargs: dict[str, Any] = {}
    policy = mixed_precision(env, spec)
    if policy is not None:
        kwargs["mp_policy"] = policy
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def set_gradient_sync(model: nn.Module, env: DistEnv, sync: bool) -> None:
    """Whether the next backward reduce-scatters the gradients (FSDP2's set_requires_gradient_sync). Off for all but
    the last micro-batch of a step: the same result with one reduce-scatter per step, at the cost of holding
    unsharded gradients in between (see plan.grad_sync_on_last_micro_batch, which decides)."""
    if env.distributed:
        model.set_requires_gradient_sync(sync)


# --- collectives (no-ops on one process) ----------------------------------------------------------------


def all_reduce_sum(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum `tensor` over ranks, in place; returns it. It must live on env.device (nccl needs GPU tensors)."""
    if env.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def full_tensor(norm: torch.Tensor) -> torch.Tensor:
    """clip_grad_norm_ returns a DTensor under FSDP2: the full value, the same on every rank (still on the device)."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def destroy(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


# --- full state dicts: gathered to rank 0 to save, broadcast from rank 0 to load -------------------------


def _options(**kwargs: bool) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def full_model_state(model: nn.Module, env: DistEnv) -> dict[str, torch.Tensor]:
    """Every parameter and buffer as a plain CPU tensor on rank 0 (native names); {} on the other ranks.

    Collective under FSDP: every rank must call it.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(cpu_offload=True))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv) -> dict[str, Any]:
    """The optimizer state keyed by parameter name (not position), full tensors on rank 0's CPU; {} elsewhere.

    Keyed by name, so it loads into a model sharded over any number of ranks. Collective under FSDP.
    """
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))


def load_full_model_state(
    model: nn.Module, state: dict[str, torch.Tensor], env: DistEnv, *, from_rank0: bool = True
) -> None:
    """Load a full state dict into the (sharded) model. from_rank0: only rank 0 read it (the others pass {}) and
    broadcasts it; False: every rank holds the whole dict and keeps its own shard. Collective under FSDP."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state, options=_options(broadcast_from_rank0=from_rank0 and env.distributed))


def load_full_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], env: DistEnv, *, from_rank0: bool = True
) -> None:
    """Load an optimizer state written from full_optimizer_state; from_rank0 as in load_full_model_state."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    options = _options(broadcast_from_rank0=from_rank0 and env.distributed)
    set_optimizer_state_dict(model, optimizer, state, options=options)

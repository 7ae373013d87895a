"""Where the run happens: one process, or one of several started by torchrun.

The loop only asks four things of this module: who am I (`DistEnv`), sum this over ranks (`all_reduce_sum`),
wait for everyone (`barrier`), and wrap the model for data parallelism (`wrap_model`). With one process each
of them is a no-op, so a laptop run never touches torch.distributed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .spec import TrainSpec


@dataclass(frozen=True)
class DistEnv:
    world_size: int
    rank: int
    local_rank: int
    device: torch.device
    is_main: bool  # rank 0: the only rank that logs and writes files


def init_distributed() -> DistEnv:
    """Read torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK); without it, a single process on cuda:0 or CPU."""
    import torch

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if world_size > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(backend=backend)
    return DistEnv(world_size=world_size, rank=rank, local_rank=local_rank, device=device, is_main=rank == 0)


def all_reduce_sum(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum `tensor` over ranks, in place; returns it. One process: the tensor itself."""
    if env.world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier(env: DistEnv) -> None:
    if env.world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def destroy(env: DistEnv) -> None:
    if env.world_size > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def wrap_model(model: nn.Module, env: DistEnv, spec: TrainSpec) -> nn.Module:
    """The model as the optimizer should see it. One process: unchanged (FSDP2 over several ranks comes here)."""
    if env.world_size > 1:
        from ..errors import UpcycleError

        raise UpcycleError(
            f"this build of upcycle trains in one process only (torchrun started {env.world_size}); "
            "run without torchrun"
        )
    return model

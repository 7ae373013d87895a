"""Router initialisation: the gate weight [experts, hidden] of each new MoE layer."""

from __future__ import annotations

import torch

from .. import seeds


def layer_generator(seed: int, layer: int) -> torch.Generator:
    """One generator per layer, so a layer's router depends on (seed, layer) only (the one scheme: seeds.py)."""
    return seeds.generator(seed, "router", layer)


def init_router(
    method: str,
    experts: int,
    hidden: int,
    *,
    std: float,
    seed: int,
    layer: int,
    dtype: torch.dtype,
    group: int = 1,
) -> torch.Tensor:
    """[experts, hidden]; with `group` > 1 each run of `group` consecutive experts shares one row (fine-grained
    upcycling's virtual groups: the parts of one FFN replica always get the same routing weight)."""
    if method == "zero":
        return torch.zeros(experts, hidden, dtype=dtype)
    if method == "random":
        weight = torch.empty(experts // group, hidden, dtype=torch.float32)
        weight.normal_(0.0, std, generator=layer_generator(seed, layer))
        return weight.repeat_interleave(group, dim=0).to(dtype)  # [E/G, H] -> [E, H]
    raise ValueError(f"unknown router init {method!r}")

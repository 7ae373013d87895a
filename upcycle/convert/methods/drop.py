"""Drop-Upcycling (Nakamura et al. 2025, arXiv:2502.19261): clone the dense FFN, then in each expert
re-initialise a random fraction r of the intermediate neurons (their rows of gate/up and column of down)
from a normal with the dense matrix's mean and std. The experts start diverse but keep most of the dense
knowledge; the MoE no longer computes the dense FFN.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..ops import Drop
from .base import Layout, expert, generator
from .clone import routed_scale

if TYPE_CHECKING:
    import torch

    from ..spec import ConvertSpec


def layout(spec: ConvertSpec, hidden: int, intermediate: int) -> Layout:
    r, scale = spec.drop, routed_scale(spec, "drop")
    experts = tuple(
        expert(hidden, intermediate, Drop(e, r, 1.0), Drop(e, r, scale)) for e in range(spec.experts)
    )
    shared = expert(hidden, intermediate, None, None) if spec.shared_experts else None
    why = f"each expert has {r:g} of its neurons re-initialised at random, so the MoE differs from the dense FFN"
    return Layout(intermediate, experts, False, why, intermediate if shared else 0, shared)


def dropped(neurons: int, ratio: float, seed: int, layer: int, expert_index: int) -> torch.Tensor:
    """The neurons re-initialised in one expert: round(ratio * neurons) of them (at least one), sorted."""
    import torch

    count = min(neurons - 1, max(1, round(ratio * neurons)))
    return torch.randperm(neurons, generator=generator(seed, "drop", layer, expert_index))[:count].sort().values


def stats(dense: torch.Tensor) -> tuple[float, float]:
    """Mean and std of the whole dense matrix, the distribution re-initialised neurons are drawn from."""
    w = dense.float()
    return w.mean().item(), w.std().item()


def reinit(
    dense: torch.Tensor,
    role: str,
    idx: torch.Tensor,
    moments: tuple[float, float],
    seed: int,
    layer: int,
    expert_index: int,
    scale: float,
) -> torch.Tensor:
    """The dense tensor with neurons `idx` drawn anew from N(mean, std) = `moments` of the dense matrix."""
    import torch

    w = dense.float().clone()
    mean, std = moments
    shape = (w.shape[0], len(idx)) if role == "down" else (len(idx), w.shape[1])
    fresh = torch.empty(shape).normal_(mean, std, generator=generator(seed, "drop", layer, expert_index, role))
    if role == "down":
        w[:, idx] = fresh  # [H, I]: a neuron is a column
    else:
        w[idx] = fresh  # [I, H]: a neuron is a row
    return w * scale

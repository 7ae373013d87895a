"""Multiplicative noise on cloned experts (`--init clone --noise σ`): each weight times an independent
N(1, σ) draw, seeded per (seed, layer, expert, role), so identical copies start apart and routing gradients
differ from the first step. Not exact: every expert is a perturbed dense FFN.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import generator

if TYPE_CHECKING:
    import torch


def perturb(dense: torch.Tensor, role: str, sigma: float, seed: int, layer: int, expert_index: int, scale: float):
    import torch

    w = dense.float()
    factor = torch.empty(w.shape).normal_(1.0, sigma, generator=generator(seed, "noise", layer, expert_index, role))
    return w * factor * scale

"""Multiplicative noise on cloned experts (`--init clone --noise σ`): each weight times an independent
N(1, σ) draw, seeded per (seed, layer, expert, role), so identical copies start apart and routing gradients
differ from the first step. Not exact: every expert is a perturbed dense FFN.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import generator

if TYPE_CHECKING:
    import torch


def factors(
    shape: tuple[int, ...],
    sigma: float,
    seed: int,
    layer: int,
    expert_index: int,
    role: str,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The N(1, sigma) factors (float32, SHAPE), drawn in one block with the generator of (seed, layer, expert,
    role). OUT: a float32 tensor of SHAPE to draw into (the values do not depend on what it held)."""
    import torch

    out = torch.empty(shape) if out is None else out
    return out.normal_(1.0, sigma, generator=generator(seed, "noise", layer, expert_index, role))


def perturb(dense: torch.Tensor, role: str, sigma: float, seed: int, layer: int, expert_index: int, scale: float):
    """The dense tensor times its factors, times `scale` (float32)."""
    factor = factors(tuple(dense.shape), sigma, seed, layer, expert_index, role)
    return dense.float() * factor * scale


def perturb_written(
    dense: torch.Tensor, factor: torch.Tensor, scale: float, dtype: torch.dtype, out: torch.Tensor | None = None
) -> torch.Tensor:
    """`perturb(...).to(dtype)` byte for byte, given the draw FACTOR (`factors`, which it overwrites): the same
    float32 products (w x factor, then x scale) computed in place in FACTOR, so the only float32 tensor is the draw.
    Every value changes, so there is nothing to copy. The result goes into OUT when given, else a new tensor (in
    float32: FACTOR itself)."""
    w = factor.mul_(dense)  # float32(dense) x factor: the product perturb computes, without a float32 copy of dense
    if scale != 1.0:  # x 1.0 changes no value that is not a NaN
        w.mul_(scale)
    return w.to(dtype) if out is None else out.copy_(w)

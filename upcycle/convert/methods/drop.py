"""Drop-Upcycling (Nakamura et al. 2025, arXiv:2502.19261): clone the dense FFN, then in each expert
re-initialise a random fraction r of the intermediate neurons (their rows of gate/up and column of down)
from a normal with the dense matrix's mean and std. The experts start diverse but keep most of the dense
knowledge; the MoE no longer computes the dense FFN.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ..ops import Drop
from .base import Layout, expert, generator, scaled
from .clone import routed_scale

if TYPE_CHECKING:
    import torch

    from ..spec import ConvertSpec


def layout(spec: ConvertSpec, hidden: int, intermediate: int) -> Layout:
    r, scale = spec.drop, routed_scale(spec, "drop")
    experts = tuple(expert(hidden, intermediate, Drop(e, r, 1.0), Drop(e, r, scale)) for e in range(spec.experts))
    shared = expert(hidden, intermediate, None, None) if spec.shared_experts else None
    why = f"each expert has {r:g} of its neurons re-initialised at random, so the MoE differs from the dense FFN"
    return Layout(intermediate, experts, False, why, intermediate if shared else 0, shared)


def dropped(neurons: int, ratio: float, seed: int, layer: int, expert_index: int) -> torch.Tensor:
    """The neurons re-initialised in one expert: round(ratio * neurons) of them (at least one), sorted."""
    import torch

    count = min(neurons - 1, max(1, round(ratio * neurons)))
    return torch.randperm(neurons, generator=generator(seed, "drop", layer, expert_index))[:count].sort().values


STATS_CHUNK = 1 << 16  # values per partial sum in `stats` (512 KB of float64: stays in the core's cache)


def stats(dense: torch.Tensor) -> tuple[float, float]:
    """Mean and std (n - 1) of the whole dense matrix, the distribution re-initialised neurons are drawn from.

    Summed by numpy in float64 (one thread, pairwise), chunk after chunk in a fixed order, so the result is the same
    whatever torch's thread count. torch's own float32 `mean()`/`std()` split a whole-tensor reduction over its
    threads and differ by an ulp between thread counts (1, 2 and 8 threads gave three different means of one
    5632 x 2048 bf16 matrix), which moved a few dozen drawn bf16 values per tensor: a seed's bytes depended on the
    machine, and `verify --layerwise` under another thread count failed.

    One pass over the deviations from a shift K (the first chunk's mean): the mean is K + sum(x - K) / n and the
    variance (sum (x - K)^2 - (sum (x - K))^2 / n) / (n - 1); K is near the mean, so nothing cancels."""
    import numpy as np

    flat, as_float64 = _numpy_values(dense)
    n = len(flat)
    if n < 2:
        return (float(as_float64(flat)[0]) if n else math.nan), math.nan
    shift = float(as_float64(flat[:STATS_CHUNK]).mean())
    total = squares = 0.0
    for start in range(0, n, STATS_CHUNK):
        dev = as_float64(flat[start : start + STATS_CHUNK])  # [<= STATS_CHUNK] float64, a copy
        dev -= shift
        total += float(dev.sum())
        squares += float(np.square(dev, out=dev).sum())
    return shift + total / n, math.sqrt(max(squares - total * total / n, 0.0) / (n - 1))


def _numpy_values(t: torch.Tensor):
    """T's values as a flat numpy array (a view where numpy has the dtype; bfloat16 as its 16-bit patterns) and the
    function that makes a float64 copy of a slice of it: numpy only, so no torch op (nor torch thread) runs."""
    import numpy as np
    import torch

    flat = t.detach().contiguous().reshape(-1)
    if flat.dtype == torch.bfloat16:  # a bfloat16 is the top half of the float32 of the same value
        bits = flat.view(torch.int16).numpy()
        return bits, lambda a: (a.view(np.uint16).astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    if flat.dtype not in (torch.float16, torch.float32, torch.float64):
        flat = flat.float()
    return flat.numpy(), lambda a: a.astype(np.float64)


def fresh(
    shape: tuple[int, int],
    moments: tuple[float, float],
    seed: int,
    layer: int,
    expert_index: int,
    role: str,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The re-initialised neurons' weights (float32, SHAPE), drawn in one block from N(mean, std) = `moments` with
    the generator of (seed, layer, expert, role): the draw that fixes the bytes for a seed. OUT: a float32 tensor
    of SHAPE to draw into (the values do not depend on what it held)."""
    import torch

    mean, std = moments
    out = torch.empty(shape) if out is None else out
    return out.normal_(mean, std, generator=generator(seed, "drop", layer, expert_index, role))


def fresh_shape(dense: torch.Tensor, role: str, count: int) -> tuple[int, int]:
    """The shape of the fresh block: COUNT columns of down [H, I], COUNT rows of gate/up [I, H]."""
    return (dense.shape[0], count) if role == "down" else (count, dense.shape[1])


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
    """The dense tensor with neurons `idx` drawn anew from N(mean, std) = `moments` of the dense matrix (float32)."""
    w = dense.float().clone()
    new = fresh(fresh_shape(dense, role, len(idx)), moments, seed, layer, expert_index, role)
    if role == "down":
        w[:, idx] = new  # [H, I]: a neuron is a column
    else:
        w[idx] = new  # [I, H]: a neuron is a row
    return w * scale


def reinit_written(
    dense: torch.Tensor,
    role: str,
    idx: torch.Tensor,
    new: torch.Tensor,
    scale: float,
    dtype: torch.dtype,
    spare: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`reinit(...).to(dtype)` byte for byte, given the draw NEW (`fresh`, float32, scaled in place): the kept
    neurons are the dense bytes (times `scale` in DTYPE where base.scaled finds that exact), only the fresh block
    is cast from float32. SPARE: a DTYPE tensor of NEW's shape to cast into (else one is made); OUT: the DTYPE
    tensor of DENSE's shape to write the result into (else one is made).

    A fresh value goes through the same float32 multiply and one rounding as before; the kept ones are copied
    (or scaled) in DTYPE: the whole tensor once, then the fresh rows of gate/up or columns of down written over it
    (index_copy_, in DTYPE), so no float32 copy of the tensor is ever made.
    """
    out = scaled(dense, scale, dtype, out)
    if out is dense:
        out = dense.clone()
    if scale != 1.0:  # x 1.0 changes no drawn value
        new.mul_(scale)
    cast = new if dtype == new.dtype else spare.copy_(new) if spare is not None else new.to(dtype)
    out.index_copy_(1 if role == "down" else 0, idx, cast)
    return out

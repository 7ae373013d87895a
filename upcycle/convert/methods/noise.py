"""Multiplicative noise on cloned experts (`--init clone --noise σ`): each weight times an independent
N(1, σ) draw, seeded per (seed, layer, expert, role), so identical copies start apart and routing gradients
differ from the first step. Not exact: every expert is a perturbed dense FFN.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import generator

if TYPE_CHECKING:
    from collections.abc import Iterator

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


# Values drawn, multiplied and cast at a time by perturb_written: a multiple of 16 whose spans (at most DRAW_CHUNK + 15
# values) stay within torch's GRAIN_SIZE (32,768), so the multiply and the casts run on the worker's own thread.
# Larger spans made each of those ops an OpenMP parallel region: every worker thread its own team, on 2 cores
# beside the writer, whose spin-waits cost CPU (a --noise conversion's workers spent ~3 s of system time on them at
# the ~0.5B shape: issue 27, benchmarks/README.md). The buffers (128 KB each) also stay in the core's cache.
DRAW_CHUNK = 32752


def spans(n: int, chunk: int | None = None) -> Iterator[tuple[int, int]]:
    """[start, stop) spans covering N values in order, such that drawing them one after another with `normal_`
    from one generator gives the values one `normal_` of all N gives: CHUNK (default DRAW_CHUNK, a multiple of 16)
    values each, the last one 16 to CHUNK + 15 values (all N where N < CHUNK + 16). torch draws a float32 tensor
    of n >= 16 values by filling n uniforms in order, turning them into normals 16 at a time, and, when 16 does
    not divide n, drawing 16 more uniforms for the last 16 values; spans that start at multiples of 16 repeat
    exactly that (tests/test_methods_written.py checks it)."""
    chunk = chunk or DRAW_CHUNK
    assert chunk % 16 == 0
    start = 0
    while n - start >= chunk + 16:
        yield start, start + chunk
        start += chunk
    yield start, n


def perturb_written(
    dense: torch.Tensor,
    sigma: float,
    seed: int,
    layer: int,
    expert_index: int,
    role: str,
    scale: float,
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
    work: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """`perturb(...).to(dtype)` byte for byte, made DRAW_CHUNK values at a time (`spans`): each span's factors are
    drawn into a small float32 buffer, multiplied by that span of the dense tensor (converted into a second buffer
    first: a mixed-dtype multiply would allocate a float32 copy of its bf16 operand on every call) and by SCALE,
    then cast into OUT. The same float32 products as `perturb` (factor x dense, then x scale), one rounding, no
    tensor-sized float32 buffer. OUT: a contiguous DTYPE tensor of DENSE's shape (else one is made); WORK: two
    float32 buffers of at least min(numel, DRAW_CHUNK + 15) values (else made here)."""
    import torch

    out = torch.empty(dense.shape, dtype=dtype) if out is None else out
    src, dst = dense.reshape(-1), out.view(-1)  # [n] each
    n, chunk = src.numel(), DRAW_CHUNK
    if work is None:
        need = min(n, chunk + 15)
        work = (torch.empty(need), torch.empty(need))
    factor_buf, dense_buf = work
    full_f, full_d = factor_buf[:chunk], dense_buf[:chunk]  # the buffers of every span but the last
    in_place, cast_dense = dtype == torch.float32, src.dtype != torch.float32
    gen = generator(seed, "noise", layer, expert_index, role)  # the stream `factors` draws from
    bounds = [start for start, _ in spans(n, chunk)][1:]
    for d, o in zip(src.tensor_split(bounds), dst.tensor_split(bounds), strict=True):  # one span each, [m]
        m = d.numel()
        f = o if in_place else full_f if m == chunk else factor_buf[:m]  # [m] float32
        f.normal_(1.0, sigma, generator=gen)
        f.mul_((full_d if m == chunk else dense_buf[:m]).copy_(d) if cast_dense else d)  # factor x float32(dense)
        if scale != 1.0:  # x 1.0 changes no value that is not a NaN
            f.mul_(scale)
        if not in_place:
            o.copy_(f)
    return out

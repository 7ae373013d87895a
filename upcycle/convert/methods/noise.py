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


# Values multiplied and cast by one op of perturb_written (a span): a multiple of 16 whose spans (at most
# DRAW_CHUNK + 15 values) stay within torch's GRAIN_SIZE (32,768), so the multiply and the casts run on the worker's
# own thread. Larger spans made each of those ops an OpenMP parallel region: every worker thread its own team, on 2
# cores beside the writer, whose spin-waits cost CPU (a --noise conversion's workers spent ~3 s of system time on
# them at the ~0.5B shape: issue 27, benchmarks/README.md).
DRAW_CHUNK = 32752
# Spans drawn by one `normal_` (torch draws on the calling thread whatever the size) and handled by one
# `torch._foreach_*` call per op: a block (perturb_written). 16 spans: 2 MB per float32 buffer.
DRAW_SPANS = 16


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
    """`perturb(...).to(dtype)` byte for byte, made a block of DRAW_SPANS spans (`spans`, DRAW_CHUNK values each) at
    a time: a block's factors are drawn by one `normal_` into a small float32 buffer, then multiplied by that block
    of the dense tensor (converted into a second buffer first: a mixed-dtype multiply would allocate a float32 copy
    of its bf16 operand on every call) and by SCALE, then cast into OUT, each of these one `torch._foreach_*` call
    over the block's spans. The same float32 products as `perturb` (factor x dense, then x scale), one rounding, no
    tensor-sized float32 buffer. OUT: a contiguous DTYPE tensor of DENSE's shape (else one is made); WORK: two
    float32 buffers of at least `work_size(numel)` values (else made here).

    Why blocks of spans: a span (at most 32,767 values) stays within torch's grain size, so its multiply and cast
    run on the calling worker's own thread (no OpenMP team per worker); one `_foreach_*` call runs every span's op
    of a block in C++ with the GIL released once, where a Python loop over spans released and took back the GIL
    about 1,400 times per 5632 x 2048 tensor (4 calls a span), against the writer and the other worker."""
    import torch

    out = torch.empty(dense.shape, dtype=dtype) if out is None else out
    src, dst = dense.reshape(-1), out.view(-1)  # [n] each
    n = src.numel()
    bounds = [start for start, _ in spans(n, DRAW_CHUNK)]  # every span's start, [0, ...]
    if work is None:
        work = (torch.empty(work_size(n)), torch.empty(work_size(n)))
    factor_buf, dense_buf = work
    in_place, cast_dense = dtype == torch.float32, src.dtype != torch.float32
    src_views, dst_views = src.tensor_split(bounds[1:]), dst.tensor_split(bounds[1:])  # one per span
    gen = generator(seed, "noise", layer, expert_index, role)  # the stream `factors` draws from
    for first in range(0, len(bounds), DRAW_SPANS):  # a block: spans first .. last - 1, values [lo, hi)
        last = min(first + DRAW_SPANS, len(bounds))
        lo, hi = bounds[first], bounds[last] if last < len(bounds) else n
        cuts = [b - lo for b in bounds[first + 1 : last]]  # the spans' starts within the block
        f = dst[lo:hi] if in_place else factor_buf[: hi - lo]  # [hi - lo] float32
        f.normal_(1.0, sigma, generator=gen)  # one draw of the block: the spans' draws one after another
        fs = f.tensor_split(cuts)  # [m] per span
        if cast_dense:  # the spans of dense converted into the second buffer: float32(dense)
            ds = dense_buf[: hi - lo].tensor_split(cuts)
            torch._foreach_copy_(ds, src_views[first:last])
        else:  # float32 already: the source's own views
            ds = src_views[first:last]
        torch._foreach_mul_(fs, ds)  # factor x float32(dense)
        if scale != 1.0:  # x 1.0 changes no value that is not a NaN
            torch._foreach_mul_(fs, scale)
        if not in_place:
            torch._foreach_copy_(dst_views[first:last], fs)
    return out


def work_size(n: int) -> int:
    """Values each of `perturb_written`'s two float32 buffers needs for a tensor of N values: one block."""
    return min(n, DRAW_SPANS * DRAW_CHUNK + 15)

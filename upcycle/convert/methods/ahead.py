"""Expert tensors made ahead: while the writer writes one computed expert tensor, worker threads make the next few.

Drawing random numbers (Drop-Upcycling, --noise) costs more than writing the bytes, and each tensor's draw has its
own generator, so the tensors can be made in parallel and in any order: a tensor is a pure function of (dense FFN,
seed, layer, transform), and its bytes do not depend on which thread made it or when.

The window runs over the whole conversion's SEQUENCE of computed tensors, not one layer's: near the end of a layer
the workers start on the next layer's first tensors (loading that layer's dense FFN in a worker thread), so they
draw while the writer writes the last tensors of the layer and the next layer's attention weights, instead of
waiting for the writer to ask (issue 27: --noise at the ~0.5B shape left both workers idle at every layer start).

Memory stays flat: at most AHEAD tensors wait beside the one being written, and the drawn tensors are written
into recycled buffers (handed back with `release` once their bytes are written), so the allocator is not asked
for (and does not keep) a new block of tens of MB per expert tensor.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from ..ops import Drop, Noise, Transform

if TYPE_CHECKING:
    import torch

AHEAD = 3  # tensors made ahead of the one being written
WORKERS = 2  # threads that make them (the writer's thread writes meanwhile)

Tensor = tuple[int, int, str, Transform]  # (layer, source, role, transform): one computed tensor of the conversion
Key = tuple[int, int, str, Transform, "torch.dtype"]  # ... in a written dtype
Make = Callable[[Key, "torch.Tensor | None"], "torch.Tensor"]  # (key, OUT buffer or None) -> the tensor


class Ahead:
    """Makes the computed tensors of SEQUENCE (in the order they will be asked for, each with its shape) with MAKE,
    the next AHEAD ones after the one asked for in worker threads, into the next layer but not beyond it (so at
    most two layers' dense FFNs are wanted at a time)."""

    def __init__(self, make: Make, sequence: Iterable[tuple[Tensor, tuple[int, ...]]]) -> None:
        self._make = make
        self._sequence: list[tuple[Tensor, tuple[int, ...]]] = []
        self._place: dict[Tensor, int] = {}
        self._span: list[int] = []  # per place: where the window ends (the window never reaches a third layer)
        layers: list[int] = []  # per place: how many layer changes precede it
        for tensor, shape in sequence:
            if tensor not in self._place:  # asked for once: an equal tensor later is the same bytes
                self._place[tensor] = len(self._sequence)
                changed = bool(self._sequence) and self._sequence[-1][0][0] != tensor[0]
                layers.append((layers[-1] + changed) if layers else 0)
                self._sequence.append((tensor, tuple(shape)))
        for i, n in enumerate(layers):
            end = min(i + 1 + AHEAD, len(layers))
            while end > i + 1 and layers[end - 1] > n + 1:
                end -= 1
            self._span.append(end)
        self._pending: dict[Key, tuple[Future, torch.Tensor | None]] = {}  # started: (job, its output buffer)
        self._free: dict[tuple[int, torch.dtype], list[torch.Tensor]] = {}  # (numel, dtype) -> flat buffers
        self._lent: dict[int, torch.Tensor] = {}  # data_ptr -> the buffer of a tensor handed out, not yet released
        self._pool: ThreadPoolExecutor | None = None

    def start(self, dtype: torch.dtype, count: int = AHEAD) -> None:
        """Start the first COUNT tensors of the sequence in DTYPE (before the writer reaches them)."""
        for tensor, shape in self._sequence[: min(count, self._span[0]) if self._span else 0]:
            key = (*tensor, dtype)
            if key not in self._pending:
                self._pending[key] = self._start(key, shape)

    def get(self, tensor: Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """MAKE's TENSOR in DTYPE, with the next AHEAD tensors of the sequence started meanwhile (in DTYPE). The
        result is valid until it is released (`release`) or the next tensor after it is asked for."""
        key = (*tensor, dtype)
        job, buf = self._pending.pop(key, None) or self._start(key, tuple(shape))
        place = self._place.get(tensor)
        following = [] if place is None else self._sequence[place + 1 : self._span[place]]
        ahead = {(*t, dtype): s for t, s in following}
        self._cancel(ahead.keys())
        for k, s in ahead.items():
            if k not in self._pending:
                self._pending[k] = self._start(k, s)
        result = job.result()
        if buf is not None and result.data_ptr() == buf.data_ptr():
            self._lent[buf.data_ptr()] = buf
        return result

    def release(self, t: torch.Tensor) -> None:
        """T's bytes are written: its buffer may take a later tensor."""
        buf = self._lent.pop(t.data_ptr(), None)
        if buf is not None:
            self._keep(buf)

    def _start(self, key: Key, shape: tuple[int, ...]) -> tuple[Future, torch.Tensor | None]:
        import torch

        transform, dtype = key[3], key[4]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="upcycle-experts")
            weakref.finalize(self, self._pool.shutdown, wait=False, cancel_futures=True)
        buf = None
        if isinstance(transform, Drop | Noise):  # drawn: a tensor of its own, the dense tensor's shape
            free = self._free.get((math.prod(shape), dtype))
            buf = free.pop() if free else torch.empty(math.prod(shape), dtype=dtype)
        out = None if buf is None else buf.view(shape)
        return self._pool.submit(self._make, key, out), buf

    def _keep(self, buf: torch.Tensor) -> None:
        free = self._free.setdefault((buf.numel(), buf.dtype), [])
        if len(free) < AHEAD + 1:
            free.append(buf)

    def _cancel(self, keep: Iterable[Key]) -> None:
        """Forget the tensors started but for KEEP (no longer wanted: asked for out of order, or skipped)."""
        for k in self._pending.keys() - set(keep):
            job, buf = self._pending.pop(k)
            if job.cancel() and buf is not None:  # never started: its buffer is free (else it goes with the job)
                self._keep(buf)

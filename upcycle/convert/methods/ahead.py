"""Expert tensors made ahead: while the writer writes one computed expert tensor, worker threads make the next few.

Drawing random numbers (Drop-Upcycling, --noise) costs more than writing the bytes, and each tensor's draw has its
own generator, so the tensors of a layer can be made in parallel and in any order: a tensor is a pure function of
(dense FFN, seed, layer, transform), and its bytes do not depend on which thread made it or when.

Memory stays flat: at most AHEAD tensors wait beside the one being written, and the drawn tensors are written
into recycled buffers (handed back with `release` once their bytes are written), so the allocator is not asked
for (and does not keep) a new block of tens of MB per expert tensor.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from ..ops import Drop, Noise, Transform

if TYPE_CHECKING:
    import torch

    from . import LayerBuilder

AHEAD = 3  # tensors made ahead of the one being written
WORKERS = 2  # threads that make them (the writer's thread writes meanwhile)

Order = dict[tuple[str, Transform], tuple[int, tuple[int, ...]]]  # (role, transform) -> (place in the layer, shape)
Key = tuple[str, Transform, "torch.dtype"]


class Ahead:
    """Makes one layer's computed tensors in the layer's ORDER, the next AHEAD ones in worker threads."""

    def __init__(self) -> None:
        self._builder: LayerBuilder | None = None
        self._pending: dict[Key, tuple[Future, torch.Tensor | None]] = {}  # started: (job, its output buffer)
        self._free: dict[tuple[int, torch.dtype], list[torch.Tensor]] = {}  # (numel, dtype) -> flat buffers
        self._lent: dict[int, torch.Tensor] = {}  # data_ptr -> the buffer of a tensor handed out, not yet released
        self._pool: ThreadPoolExecutor | None = None

    def get(self, builder: LayerBuilder, order: Order, role: str, transform: Transform, shape, dtype) -> torch.Tensor:
        """`builder.written(role, transform, dtype)`, with the next AHEAD tensors of ORDER started meanwhile. The
        result is valid until it is released (`release`) or the next tensor after it is asked for."""
        if builder is not self._builder:  # another layer: what was made ahead for the last one is not wanted
            self._cancel(())
            self._builder = builder
        key = (role, transform, dtype)
        job, buf = self._pending.pop(key, None) or self._start(key, tuple(shape))
        place = order.get((role, transform), (len(order), ()))[0]
        ahead = {(r, t, dtype): s for (r, t), (i, s) in order.items() if place < i <= place + AHEAD}
        self._cancel(ahead.keys())
        for k in ahead.keys() - self._pending.keys():
            self._pending[k] = self._start(k, ahead[k])
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
        import math

        import torch

        role, transform, dtype = key
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="upcycle-experts")
            weakref.finalize(self, self._pool.shutdown, wait=False, cancel_futures=True)
        buf = None
        if isinstance(transform, Drop | Noise):  # drawn: a tensor of its own, the dense tensor's shape
            free = self._free.get((math.prod(shape), dtype))
            buf = free.pop() if free else torch.empty(math.prod(shape), dtype=dtype)
        out = None if buf is None else buf.view(shape)
        return self._pool.submit(self._builder.written, role, transform, dtype, out), buf

    def _keep(self, buf: torch.Tensor) -> None:
        free = self._free.setdefault((buf.numel(), buf.dtype), [])
        if len(free) < AHEAD + 1:
            free.append(buf)

    def _cancel(self, keep: Iterable[Key]) -> None:
        """Forget the tensors started but for KEEP (no longer wanted: another layer, or asked for out of order)."""
        for k in self._pending.keys() - set(keep):
            job, buf = self._pending.pop(k)
            if job.cancel() and buf is not None:  # never started: its buffer is free (else it goes with the job)
                self._keep(buf)

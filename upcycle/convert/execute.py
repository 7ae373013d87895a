"""The one interpreter of the plan: `produce(op, sources)` yields the bytes of any op, in order.

`convert` writes what it produces (pipeline.write_weights); `verify --layerwise` produces again and compares the
bytes with the MoE's (report/verify_layerwise.py), so converter and check cannot drift apart. Bytes come as
buffers, or as `Placed` byte ranges of a file that the writer copies in the kernel and the check reads in
pieces. A new kind of op is one dataclass in ops.py and one `@handles` function here.

Memory stays flat: copies stream in CHUNK_BYTES pieces, and the expert methods hold one layer's dense FFN at a
time, two while the next layer's first tensors are made ahead (`LayerFFNs`), which is why ops must be produced in
plan order.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from ..dtypes import DTYPE_BYTES, lossy, torch_dtype
from ..source import Checkpoint, RangeReader, TensorInfo
from .methods import LayerBuilder
from .methods.ahead import Ahead
from .ops import CastCheck, Copy, Expert, Fused, Mean, Parts, Plan, Router, TensorOp, ValueChange, Zeros
from .router_init import init_router
from .writer import Placed

if TYPE_CHECKING:
    import torch

    from .spec import ConvertSpec
    from .writer import ShardedWriter

CHUNK_BYTES = 16 << 20  # large enough to amortise Python, small enough for fast writes

Chunk = memoryview | bytes | Placed


# --- what ops are produced from --------------------------------------------------------------------------------


class LayerFFNs:
    """The dense FFN tensors of the MoE layers, for the methods that compute from them, a layer or two at a time.

    A layer's gate/up/down are loaded when its first computed expert tensor is asked for or made ahead, and dropped
    once a later layer's tensor is asked for (or a third layer of the source is loaded), so memory holds one
    layer's FFN of each source, two while the next layer's first tensors are made ahead of the writer, plus a few
    expert tensors, whatever the model's size. `others` are the --expert-from models (source i is others[i - 1]; 0
    is CKPT, BASE). `written` makes the next few computed tensors of the conversion meanwhile, in worker threads,
    across layers (methods/ahead.py); `start` begins the first ones before the writer reaches them. Safe to call
    from several threads.
    """

    KEEP = 2  # layers held per source at most: the one being written and the next, whose tensors are made ahead

    def __init__(self, ckpt: Checkpoint, plan: Plan, seed: int, partitions: dict | None = None, others: tuple = ()):
        self.ckpts = (ckpt, *others)
        self.seed, self.partitions = seed, partitions or {}
        self.keys: dict[int, dict[str, str]] = {}  # layer -> role -> source key
        sequence = []  # every computed tensor, in plan order: ((layer, source, role, transform), shape)
        self._first: Expert | None = None  # the first computed tensor (`start`)
        for op in plan.expert_ops():
            if op.role is not None:
                self.keys.setdefault(op.layer, {})[op.role] = op.src
                if op.transform is not None:
                    sequence.append(((op.layer, op.source, op.role, op.transform), op.shape))
                    self._first = self._first or op
        self._lock = threading.Lock()
        self._held: dict[tuple[int, int], Future] = {}  # (source, layer) -> its LayerBuilder, oldest first
        me = weakref.ref(self)  # not self._make: the pool's jobs must not keep this (and its FFNs) alive in a cycle
        self._ahead = Ahead(lambda key, out: LayerFFNs._make(me(), key, out), sequence)

    @property
    def ckpt(self) -> Checkpoint:
        return self.ckpts[0]

    def builder(self, layer: int, source: int = 0) -> LayerBuilder:
        """The builder of LAYER's dense FFN of SOURCE, loaded once (another thread asking meanwhile waits for it)."""
        key = (source, layer)
        with self._lock:
            held = self._held.get(key)
            mine = held is None
            if mine:
                of_source = [k for k in self._held if k[0] == source]
                for old in of_source[: max(0, len(of_source) + 1 - self.KEEP)]:
                    del self._held[old]  # the oldest first (a job still using it keeps it until it ends)
                held = self._held[key] = Future()
        if mine:  # loaded outside the lock: a thread using another layer's builder does not wait for this one
            try:
                dense = {role: self.ckpts[source].load(k) for role, k in self.keys[layer].items()}
                partitions = self.partitions.get(layer) if source == 0 else None  # may wait for the pass (beside.py)
                held.set_result(LayerBuilder(dense, self.seed, layer, partitions))
            except BaseException as exc:
                with self._lock:
                    if self._held.get(key) is held:
                        del self._held[key]  # asked again, it is loaded again
                held.set_exception(exc)
                raise
        return held.result()

    def _make(self, key: tuple, out: torch.Tensor | None) -> torch.Tensor:
        layer, source, role, transform, dtype = key
        return self.builder(layer, source).written(role, transform, dtype, out)

    def start(self) -> None:
        """Begin making the first computed tensors (in their written dtype) before the writer asks for them; not
        where the writer makes them itself, in float32, to measure a lossy cast (`_expert`)."""
        op = self._first
        if op is not None and not lossy(self.ckpts[op.source].tensors[op.src].dtype, op.dtype):
            self._ahead.start(torch_dtype(op.dtype))

    def written(self, op: Expert, dtype: torch.dtype) -> torch.Tensor:
        """OP's computed tensor in DTYPE (`LayerBuilder.written`); `release` it once its bytes are written."""
        t = self._ahead.get((op.layer, op.source, op.role, op.transform), op.shape, dtype)
        with self._lock:  # the writer has gone past the earlier layers of this source: their FFNs are not needed
            for k in [k for k in self._held if k[0] == op.source and k[1] < op.layer]:
                del self._held[k]
        return t

    def release(self, t: torch.Tensor) -> None:
        self._ahead.release(t)


@dataclass(frozen=True)
class RouterInit:
    """How router weights are made: rows computed beforehand (--router-init kmeans/hidden), else drawn."""

    method: str  # --router-init
    experts: int
    std: float
    seed: int
    rows: dict[int, Any] | None = None  # layer -> [E, H] float32

    @classmethod
    def of(cls, spec: ConvertSpec, rows: dict | None = None) -> RouterInit:
        return cls(spec.router_init, spec.experts, spec.router_std, spec.seed, rows)


class Reuse:
    """Expert tensors already written: an equal one (same model, source tensor, transform and dtype) copies those
    bytes again. `folders[i]` is source i's folder, so a model given twice (BASE and --expert-from) is one."""

    def __init__(self, writer: ShardedWriter, folders: tuple = ()):
        self.writer, self.folders = writer, folders
        self.seen: dict[tuple, Placed] = {}

    def key(self, op: Expert) -> tuple:
        model = self.folders[op.source] if op.source < len(self.folders) else op.source
        return (model, op.src, op.transform, op.dtype)

    def remember(self, op: Expert, placed: Placed) -> None:
        self.seen.setdefault(self.key(op), placed)

    def chunks(self, op: Expert, make: Callable[[], Iterator[Chunk]]) -> Iterator[Chunk]:
        if self.key(op) in self.seen:
            yield self.seen[self.key(op)]
            return
        here = self.writer.tell()  # runs inside the writer's put: where this tensor's first byte lands
        yield from make()
        self.remember(op, Placed(here.path, here.offset, op.nbytes))


@dataclass
class Sources:
    """Everything an op's bytes may come from. `meter` tallies lossy casts; `reuse` lets the writer copy equal
    expert tensors from the output; `routers` is None where routers are not produced (the check skips them)."""

    ckpt: Checkpoint
    layers: LayerFFNs
    routers: RouterInit | None = None
    meter: CastMeter | None = None
    reuse: Reuse | None = None

    def model(self, source: int) -> Checkpoint:
        """Source model `source`: 0 BASE, i the i-th --expert-from."""
        return self.layers.ckpts[source]

    def info(self, op: TensorOp) -> TensorInfo:
        """The source tensor OP reads (an op with `src`)."""
        return self.model(getattr(op, "source", 0)).tensors[op.src]


# --- the interpreter --------------------------------------------------------------------------------------------

HANDLERS: dict[type[TensorOp], Callable[[Any, Sources], Iterator[Chunk]]] = {}


def handles(kind: type[TensorOp]) -> Callable:
    """Register the function that produces the bytes of ops of this type (and of its subclasses)."""

    def register(fn: Callable[[Any, Sources], Iterator[Chunk]]) -> Callable:
        HANDLERS[kind] = fn
        return fn

    return register


def produce(op: TensorOp, sources: Sources) -> Iterator[Chunk]:
    """The bytes of OP, in order: buffers, or `Placed` byte ranges of a file. A buffer is valid until the next
    chunk is asked for (its memory may then take other bytes): write or compare it before."""
    handler = next((HANDLERS[k] for k in type(op).__mro__ if k in HANDLERS), None)
    if handler is None:
        raise RuntimeError(f"no handler produces {type(op).__name__} ops")
    if sources.reuse is not None and isinstance(op, Expert):
        return sources.reuse.chunks(op, lambda: handler(op, sources))
    return handler(op, sources)


def in_place(op: TensorOp, sources: Sources) -> Placed | None:
    """Where all of OP's bytes already are, as one byte range: an equal expert tensor already written, or a source
    tensor copied as it is (None: they must be produced). The writer copies such a range in the kernel."""
    if sources.reuse is not None and isinstance(op, Expert) and sources.reuse.key(op) in sources.reuse.seen:
        return sources.reuse.seen[sources.reuse.key(op)]
    if isinstance(op, Expert) and op.transform is not None:
        return row_range(op, sources.info(op))
    as_is = (isinstance(op, Copy) and op.values is None) or (isinstance(op, Expert) and op.transform is None)
    info = sources.info(op) if as_is else None
    return Placed(info.file, info.offset, info.nbytes) if info is not None and info.dtype == op.dtype else None


def row_range(op: Expert, info: TensorInfo) -> Placed | None:
    """Where OP's bytes already are when it is a block of consecutive rows of its dense tensor, unscaled, in the
    source's dtype: gate/up of consecutive parts of a contiguous partition (fine-grained, split contiguous). A
    block of rows of a row-major tensor is one byte range, which the writer copies in the kernel (None: not such
    a block; down's parts are columns)."""
    t = op.transform
    if not isinstance(t, Parts) or t.by != "contiguous" or t.scale != 1.0 or op.role == "down":
        return None
    if info.dtype != op.dtype or t.chosen != tuple(range(t.chosen[0], t.chosen[0] + len(t.chosen))):
        return None
    row_bytes, size = info.nbytes // info.shape[0], info.shape[0] // t.parts
    return Placed(info.file, info.offset + t.chosen[0] * size * row_bytes, len(t.chosen) * size * row_bytes)


def with_dtype(op: TensorOp, dtype: str) -> TensorOp:
    """OP written in DTYPE instead (a fused op's parts too): the check produces what the MoE file holds."""
    if op.dtype == dtype:
        return op
    if isinstance(op, Fused):
        return replace(op, dtype=dtype, parts=tuple(replace(p, dtype=dtype) for p in op.parts))
    return replace(op, dtype=dtype)


def source_bytes(info: TensorInfo, dtype: str, meter: CastMeter | None) -> Iterator[Chunk]:
    """A source tensor written in DTYPE: its byte range as it is, or cast piece by piece."""
    if info.dtype == dtype:
        yield Placed(info.file, info.offset, info.nbytes)
    else:
        yield from cast_chunks(info, dtype, meter if lossy(info.dtype, dtype) else None)


@handles(Copy)
def _copy(op: Copy, sources: Sources) -> Iterator[Chunk]:
    info = sources.ckpt.tensors[op.src]
    if op.values is not None:  # a copied tensor the family changes element-wise (Gemma's 1+w)
        yield from transform_chunks(info, op.dtype, op.values)
    else:
        yield from source_bytes(info, op.dtype, sources.meter)


@handles(Mean)
def _mean(op: Mean, sources: Sources) -> Iterator[Chunk]:
    """The float32 mean of the sources' tensors, piece by piece (one piece of each source at a time)."""
    from .views import apply_values

    infos = [sources.model(i).tensors[op.src] for i in op.sources]
    out = torch_dtype(op.dtype)
    for pieces in zip(*(read_chunks(info, 4) for info in infos), strict=True):
        total = pieces[0].float()  # a copy: the piece's buffer is reused
        for x in pieces[1:]:
            total += x.float()
        mean = total / len(pieces)
        yield as_bytes(apply_values(mean, op.values, out) if op.values is not None else mean.to(out))


@handles(Expert)
def _expert(op: Expert, sources: Sources) -> Iterator[Chunk]:
    info = sources.info(op)
    if op.transform is None:  # the dense tensor itself
        yield from source_bytes(info, op.dtype, sources.meter)
        return
    if (rows := row_range(op, info)) is not None:  # a block of its rows, as they are
        yield rows
        return
    if sources.meter is not None and lossy(info.dtype, op.dtype):  # the cast's rounding is tallied on float32
        built = sources.layers.builder(op.layer, op.source).tensor(op.role, op.transform)  # from the layer's FFN
        written = built.to(torch_dtype(op.dtype))
        sources.meter.add(info.dtype, op.dtype, built, written)
        yield as_bytes(written)
        return
    written = sources.layers.written(op, torch_dtype(op.dtype))  # the same bytes, made in the written dtype
    try:
        yield as_bytes(written)
    finally:  # asked for what comes next (or closed): these bytes are written, their buffer may be reused
        sources.layers.release(written)


@handles(Router)
def _router(op: Router, sources: Sources) -> Iterator[Chunk]:
    r = sources.routers
    if r is None:
        raise RuntimeError(f"{op.name}: no router initialisation was given")
    dtype = torch_dtype(op.dtype)
    if r.rows is not None:
        weight = r.rows[op.layer].to(dtype)
    else:
        kw = dict(std=r.std, seed=r.seed, layer=op.layer, dtype=dtype, group=op.group)
        weight = init_router(r.method, r.experts, op.shape[1], **kw)
    yield as_bytes(weight)


@handles(Zeros)
def _zeros(op: Zeros, sources: Sources) -> Iterator[Chunk]:
    if op.value:  # a small constant tensor (a shared-expert gate row): made whole
        import torch

        yield as_bytes(torch.full(op.shape, op.value, dtype=torch_dtype(op.dtype)))
        return
    for start in range(0, op.nbytes, CHUNK_BYTES):
        yield bytes(min(CHUNK_BYTES, op.nbytes - start))


@handles(Fused)
def _fused(op: Fused, sources: Sources) -> Iterator[Chunk]:
    """Part by part (expert by expert): each part as it would be written on its own."""
    for part in op.parts:
        yield from produce(part, sources)


def same_as_produced(op: TensorOp, got: TensorInfo, sources: Sources) -> bool:
    """Are GOT's bytes exactly what `produce(op)` gives? Read in pieces, so memory stays flat."""
    done = 0
    with RangeReader(got.file) as reader:
        for chunk in produce(op, sources):
            pieces = _placed_pieces(chunk) if isinstance(chunk, Placed) else (memoryview(chunk).cast("B"),)
            for piece in pieces:
                n = len(piece)
                if done + n > got.nbytes or reader.read(got.offset + done, n, got.name) != piece:
                    return False
                done += n
    return done == got.nbytes


def _placed_pieces(place: Placed) -> Iterator[bytes]:
    with RangeReader(place.path) as reader:
        yield from reader.pieces(place.offset, place.nbytes, CHUNK_BYTES, f"{place.nbytes} bytes at {place.offset}")


# --- streaming pieces of a source tensor -------------------------------------------------------------------------


def as_bytes(t: torch.Tensor) -> memoryview:
    import torch

    return memoryview(t.contiguous().view(torch.uint8).reshape(-1).numpy())


def read_chunks(info: TensorInfo, out_item_bytes: int = 0) -> Iterator[torch.Tensor]:
    """A source tensor as flat torch tensors of at most CHUNK_BYTES each (counting the larger of the item sizes
    in and out), read through one reused buffer.

    Reads are plain file reads, not a memory map, so memory stays at a few chunks whatever the tensor's size
    (a mapped 1 GB embedding would stay resident until done). Each piece is only valid until the next one.
    """
    import torch

    src_dtype, item = torch_dtype(info.dtype), DTYPE_BYTES[info.dtype]
    numel = info.nbytes // item
    if numel == 0:
        return
    step = max(1, CHUNK_BYTES // max(item, out_item_bytes))  # row boundaries do not matter element-wise
    buf = bytearray(min(numel, step) * item)
    with RangeReader(info.file) as reader:
        for start in range(0, numel, step):
            view = memoryview(buf)[: min(step, numel - start) * item]
            reader.readinto(view, info.offset + start * item, info.name)
            yield torch.frombuffer(view, dtype=src_dtype)


def cast_chunks(info: TensorInfo, dtype: str, meter: CastMeter | None = None) -> Iterator[memoryview]:
    """The bytes of a source tensor cast to `dtype`, piece by piece; `meter` tallies what the cast changes."""
    for x in read_chunks(info, DTYPE_BYTES[dtype]):
        y = x.to(torch_dtype(dtype))
        if meter is not None:
            meter.add(info.dtype, dtype, x, y)
        yield as_bytes(y)


def transform_chunks(info: TensorInfo, dtype: str, values: ValueChange) -> Iterator[memoryview]:
    """The source tensor changed element-wise (views.apply_values) and written in `dtype`, piece by piece."""
    from .views import apply_values

    for x in read_chunks(info, max(DTYPE_BYTES[dtype], 4)):  # float32 arithmetic may be needed on the way
        yield as_bytes(apply_values(x, values, torch_dtype(dtype)))


class CastMeter:
    """Tallies, per (source dtype, written dtype), what a cast does to the values: rounding and overflow."""

    def __init__(self, pairs: Iterable[tuple[str, str]] = ()) -> None:
        # pair -> [values, largest |x|, rounded, overflow]; `pairs` get a record even if no value is cast
        self._acc: dict[tuple[str, str], list] = {pair: [0, 0.0, 0, 0] for pair in pairs}

    def add(self, src: str, dst: str, x: torch.Tensor, y: torch.Tensor) -> None:
        import torch

        finite = torch.isfinite(x)
        overflow = torch.isinf(y) & finite
        rounded = (y.to(x.dtype) != x) & finite & ~overflow
        acc = self._acc.setdefault((src, dst), [0, 0.0, 0, 0])
        acc[0] += x.numel()
        if x.numel():
            acc[1] = max(acc[1], float(x.abs().masked_fill(~finite, 0).max()))
        acc[2] += int(rounded.sum())
        acc[3] += int(overflow.sum())

    def result(self) -> dict[tuple[str, str], CastCheck]:
        return {pair: CastCheck(pair[0], pair[1], n, big, r, o) for pair, (n, big, r, o) in self._acc.items()}

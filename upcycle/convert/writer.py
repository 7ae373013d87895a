"""A streaming writer for sharded safetensors checkpoints.

The plan knows every tensor's name, dtype and shape before any byte is written, so the shard layout and
each shard's header are fixed up front. Tensors are then streamed into their shard in order: from a byte
range of another file (copied by the kernel, never through Python memory), or from buffers. Memory stays
flat whatever the model size.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..source import RangeReader, truncated

INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class Placed:
    """Where a written tensor's bytes are: lets a later tensor with the same content copy them."""

    path: Path
    offset: int
    nbytes: int


def plan_shards(entries: list[Entry], max_shard_size: int) -> list[list[Entry]]:
    """Cut the ordered entries into shards of at most max_shard_size bytes (a larger tensor sits alone)."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return shards


def _header(entries: list[Entry], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for e in entries:
        header[e.name] = {
            "dtype": e.dtype,
            "shape": list(e.shape),
            "data_offsets": [offset, offset + e.nbytes],
        }
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned, as safetensors does
    return len(raw).to_bytes(8, "little") + raw


def copy_range(src: Path, offset: int, length: int, dst_fd: int) -> None:
    """Append `length` bytes of `src` from `offset` to the file open at dst_fd.

    On Linux the kernel copies (copy_file_range: no trip through Python memory, reflinks where the file
    system has them); elsewhere, or where the file system refuses, plain reads and writes in 16 MiB pieces.
    """
    what = f"the {length} bytes at offset {offset} it copies"
    with RangeReader(src) as reader:
        done = 0
        if hasattr(os, "copy_file_range"):
            try:
                while done < length:
                    n = os.copy_file_range(reader.fd, dst_fd, length - done, offset + done)
                    if n == 0:
                        raise truncated(src, what)
                    done += n
            except OSError:
                pass  # e.g. EXDEV or EINVAL on some file systems: finish below
        for chunk in reader.pieces(offset + done, length - done, 16 << 20, what):
            _write_all(dst_fd, chunk)


# Bytes handed to one os.write. Single writes of 128 MiB were slow (benchmarks/README.md, 2026-11-23); on this
# machine's kernel (6.18, ext4) writes of 2 MiB and more still cost the kernel 3-7x the CPU of 1 MiB ones (0.7-1.6 s
# against 0.23 s of system time per 1.13 GB, alternated; 2-4 MiB sometimes one, sometimes the other): issue 27,
# benchmarks/README.md. It is what --noise and every other computed tensor pay per byte written.
WRITE_SLICE = 1 << 20


def _write_all(fd: int, data) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.write(fd, view[:WRITE_SLICE])
        view = view[n:]


class ShardedWriter:
    """Write the entries, in order, into `model-0000i-of-0000N.safetensors` files plus the index."""

    def __init__(self, folder: Path, entries: list[Entry], max_shard_size: int, metadata: dict[str, str]):
        self.folder = Path(folder)
        self.shards = plan_shards(entries, max_shard_size)
        self.metadata = metadata
        n = len(self.shards)
        self.names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._queue = [(s, e) for s, shard in enumerate(self.shards) for e in shard]
        self._pos = 0
        self._fd: int | None = None
        self._shard = -1

    def _next(self, name: str) -> Entry:
        if self._pos >= len(self._queue):
            raise RuntimeError(f"writer got {name} after the last planned tensor")
        shard, entry = self._queue[self._pos]
        if entry.name != name:
            raise RuntimeError(f"writer expected {entry.name}, got {name}")
        if shard != self._shard:
            self._close_fd()
            self._shard = shard
            path = self.folder / self.names[shard]
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            _write_all(self._fd, _header(self.shards[shard], self.metadata))
        self._pos += 1
        return entry

    def _placed(self, entry: Entry) -> Placed:
        offset = os.lseek(self._fd, 0, os.SEEK_CUR) - entry.nbytes
        return Placed(self.folder / self.names[self._shard], offset, entry.nbytes)

    def put_range(self, name: str, src: Path, offset: int, length: int) -> Placed:
        entry = self._next(name)
        if length != entry.nbytes:
            raise RuntimeError(f"{name}: {length} bytes given, {entry.nbytes} planned")
        copy_range(src, offset, length, self._fd)
        return self._placed(entry)

    def tell(self) -> Placed:
        """Where the next byte goes (called from the chunks a put is consuming: where that chunk lands)."""
        return Placed(self.folder / self.names[self._shard], os.lseek(self._fd, 0, os.SEEK_CUR), 0)

    def put(self, name: str, chunks: Iterable) -> Placed:
        """Write `name` from its chunks in order: buffers, or `Placed` byte ranges of a file (copied by the kernel)."""
        entry = self._next(name)
        written = 0
        for chunk in chunks:
            if isinstance(chunk, Placed):
                copy_range(chunk.path, chunk.offset, chunk.nbytes, self._fd)
                written += chunk.nbytes
                continue
            view = memoryview(chunk).cast("B")
            _write_all(self._fd, view)
            written += len(view)
        if written != entry.nbytes:
            raise RuntimeError(f"{name}: {written} bytes written, {entry.nbytes} planned")
        return self._placed(entry)

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def finish(self, total_parameters: int) -> None:
        self._close_fd()
        if self._pos != len(self._queue):
            raise RuntimeError(f"writer closed after {self._pos} of {len(self._queue)} tensors")
        weight_map = {e.name: self.names[s] for s, shard in enumerate(self.shards) for e in shard}
        total = sum(e.nbytes for shard in self.shards for e in shard)
        index = {
            "metadata": {"total_parameters": total_parameters, "total_size": total},
            "weight_map": weight_map,
        }
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        self._close_fd()

"""A loaded model's weight files: the pages of them that no weight is read from any more go back to the system.

transformers loads a safetensors file through a private memory mapping and keeps it mapped while any weight is a
view into it. A weight the loader had to make anew (a cast to another dtype; Mixtral's and Qwen2-MoE's per-expert
tensors stacked into one [experts, ...] parameter) leaves the file pages it was read from mapped and resident,
beside the copy: loading the SmolLM2 MoE (fp32, 2.77 GB file) left 2.55 GB of its experts' file pages in the
process's RSS for the whole run, on top of the 2.55 GB of stacked experts (benchmarks/README.md, "Weight file
pages and the heap after loading"). The memory plan (train/memory.py) counts them during loading only.

release_unread_pages drops the ranges of the model's mapped files that hold none of its tensors from this
process (madvise MADV_DONTNEED). They stay in the kernel's page cache, reclaimable and shared, so the next
command that reads the same files (verify after train, a test after a test) finds them there rather than on
disk; MADV_PAGEOUT would have evicted them from it. On a private file mapping DONTNEED would also discard a page
this process had written (copy on write), which is why only ranges that back no tensor are dropped: nothing
writes there, and a later read faults the file's own bytes in again, so no value changes. Linux only.
"""

from __future__ import annotations

import ctypes
import mmap
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from upcycle.heap import libc_function

if TYPE_CHECKING:
    from torch import nn

MADV_DONTNEED = 4  # linux/mman.h: unmap these pages from this process (file pages stay in the page cache)
MAPS = Path("/proc/self/maps")


@dataclass(frozen=True)
class Mapping:
    """One mapping of a file in this process's address space: [start, end) and the file's path."""

    start: int
    end: int
    path: str


def mapped_files(folder: Path, maps: Path = MAPS) -> list[Mapping]:
    """This process's mappings of FOLDER's `*.safetensors` files, matched by the files' real paths (in the Hub's
    cache they are links to blobs elsewhere, which is what the kernel names); none where there is no /proc."""
    try:
        lines = maps.read_text().splitlines()
    except OSError:
        return []
    files = {str(f.resolve()) for f in Path(folder).glob("*.safetensors")}
    found = []
    for line in lines:
        fields = line.split(maxsplit=5)  # address perms offset dev inode [path, which may hold spaces]
        if len(fields) < 6 or fields[5] not in files:
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        found.append(Mapping(start, end, fields[5]))
    return found


def unread_ranges(mapping: Mapping, live: list[tuple[int, int]], page: int = mmap.PAGESIZE) -> list[tuple[int, int]]:
    """The page-aligned [start, end) ranges of MAPPING that hold no byte of the LIVE [start, end) ranges (each live
    range widened to whole pages, so a page shared with a live tensor is kept)."""
    held = sorted(
        (max(a, mapping.start) // page * page, -(-min(b, mapping.end) // page) * page)
        for a, b in live
        if a < mapping.end and b > mapping.start and b > a
    )
    free, at = [], mapping.start
    for a, b in held:
        if a > at:
            free.append((at, a))
        at = max(at, b)
    if at < mapping.end:
        free.append((at, mapping.end))
    return free


def live_ranges(model: nn.Module) -> list[tuple[int, int]]:
    """The [start, end) address ranges of the storages behind MODEL's CPU parameters and buffers (a view keeps
    its whole storage alive, so the storage is what counts)."""
    ranges = []
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.device.type != "cpu":
            continue
        storage = tensor.untyped_storage()
        if storage.nbytes():
            ranges.append((storage.data_ptr(), storage.data_ptr() + storage.nbytes()))
    return ranges


def release_unread_pages(model: nn.Module, folder: Path) -> int:
    """Drop from this process the ranges of FOLDER's mapped weight files that hold none of MODEL's tensors; the
    bytes of address space advised (0 off Linux, or where nothing is mapped)."""
    mappings = mapped_files(folder)
    madvise = libc_function("madvise") if mappings else None
    if madvise is None:
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    live = live_ranges(model)
    advised = 0
    for mapping in mappings:
        for start, end in unread_ranges(mapping, live):
            if madvise(start, end - start, MADV_DONTNEED) != 0:
                return advised  # refused: the pages stay, nothing is lost
            advised += end - start
    return advised

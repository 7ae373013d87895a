"""The C heap's policy for large buffers: given back when freed in conversion, kept for reuse in training.

Conversion (the calibration pass) holds the mmap threshold low (hold_mmap_threshold), for its peak:

glibc serves a freed buffer's memory again from its heap when the buffer was below its mmap threshold, and after
each large buffer it frees it raises that threshold (up to 32 MiB). So the layer after layer of 10–30 MB weights
and activations of the calibration pass land in the heap, which fragments and is not given back: on a ~0.45B
Llama (hidden 896, width 4,864, 24 layers) `convert --router-init hidden` peaked at 1.2–1.6 GB against 0.48 GB
with the threshold held at 4 MiB (benchmarks/README.md, "The ~0.45B Llama shape"). Holding it there gives every
buffer of 4 MiB and more its own mapping, returned to the system when freed; the time measured the same.

Training on a CPU does the opposite (keep_buffers_for_reuse). Every step makes and frees the same activations and
gradients, and an MoE's are large: at batch 16 x 256 tokens, hidden 512 and width 1,536 the experts' [tokens x
top-k, width] buffers are 50 MB. Past glibc's 32 MiB limit each is a fresh mapping, zero-filled page by page on
first touch and unmapped when freed, and the top of the heap is given back (trimmed) and faulted in again: in a
one-thread profile of that step, the MoE's element-wise ops (silu, mul, fill_) took 10-25x their time at batch 4 per
token. With both thresholds out of the way the heap reaches its size in the first step and is reused after:
+32% tokens/s for that MoE step, +8% at batch 4, its dense parent within its spread; the peak RSS 0.5-1% higher at
batch 4 and 9% at batch 16 (benchmarks/README.md, "The C heap in training"). Before a checkpoint or final/ is
written the free pages go back to the system (give_back_free_memory), so the save peak is what the memory plan
counts. The policy starts once the model is loaded (train/setup.py), after the pages loading freed have gone back:
set before loading, it kept a bf16 checkpoint's cast copies in the heap for the whole run, +11-31% peak RSS on a
12-layer Qwen2.5-0.5B shape (benchmarks/README.md, "Weight file pages and the heap after loading").
"""

from __future__ import annotations

import ctypes
import sys

MMAP_THRESHOLD = 4 << 20  # bytes: buffers this large and larger get their own mapping
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h); setting it also stops the threshold's adjustment
M_TRIM_THRESHOLD = -1  # ... free memory at the heap's top beyond this is given back to the system
REUSE_THRESHOLD = 1 << 30  # bytes: training's buffers below this come from the heap and stay there when freed
NEVER_TRIM = (1 << 31) - 1  # the largest trim threshold mallopt's int takes: the heap's free top is kept


def libc_function(function: str):
    """glibc's FUNCTION for this process, or None off glibc (musl and others have their own allocators)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL("libc.so.6"), function, None)
    except OSError:
        return None


def _mallopt(param: int, value: int) -> bool:
    """glibc's mallopt(PARAM, VALUE) for this process; False (nothing done) off glibc or where it refuses."""
    mallopt = libc_function("mallopt")
    return bool(mallopt is not None and mallopt(param, value) == 1)


def hold_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Hold glibc's mmap threshold at THRESHOLD for this process; False (nothing done) off glibc."""
    return _mallopt(M_MMAP_THRESHOLD, threshold)


def keep_buffers_for_reuse(threshold: int = REUSE_THRESHOLD) -> bool:
    """Serve buffers below THRESHOLD from the heap and never give its free top back, for a process that makes and
    frees the same large buffers step after step (training on a CPU); False where glibc is not there to ask."""
    return _mallopt(M_MMAP_THRESHOLD, threshold) and _mallopt(M_TRIM_THRESHOLD, NEVER_TRIM)


def give_back_free_memory() -> bool:
    """Return the heap's free pages to the system now (glibc's malloc_trim): a training run kept them for its steps,
    and its save peak is planned without them (train/memory.py); False off glibc."""
    trim = libc_function("malloc_trim")
    if trim is None:
        return False
    trim(0)
    return True

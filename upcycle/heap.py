"""The C heap's policy for large buffers, for the passes that make and free many of them (the calibration pass).

glibc serves a freed buffer's memory again from its heap when the buffer was below its mmap threshold, and after
each large buffer it frees it raises that threshold (up to 32 MiB). So the layer after layer of 10–30 MB weights
and activations of the calibration pass land in the heap, which fragments and is not given back: on a ~0.45B
Llama (hidden 896, width 4,864, 24 layers) `convert --router-init hidden` peaked at 1.2–1.6 GB against 0.48 GB
with the threshold held at 4 MiB (benchmarks/README.md, "The ~0.45B Llama shape"). Holding it there gives every
buffer of 4 MiB and more its own mapping, returned to the system when freed; the time measured the same.
"""

from __future__ import annotations

import ctypes
import sys

MMAP_THRESHOLD = 4 << 20  # bytes: buffers this large and larger get their own mapping
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h); setting it also stops the threshold's adjustment


def hold_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Hold glibc's mmap threshold at THRESHOLD for this process; False (nothing done) off glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # musl and others: their own allocators
        return False
    mallopt = getattr(libc, "mallopt", None)
    return bool(mallopt is not None and mallopt(M_MMAP_THRESHOLD, threshold) == 1)

"""upcycle/heap.py: glibc's mmap threshold held, so that the calibration pass's large buffers go back to the system
(the peak it saves is measured in benchmarks/README.md, not asserted here)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from upcycle import heap


def test_holds_the_threshold_on_glibc_and_does_nothing_elsewhere(monkeypatch):
    if sys.platform.startswith("linux") and "glibc" in " ".join(__import__("platform").libc_ver()):
        assert heap.hold_mmap_threshold() is True
    monkeypatch.setattr(heap.sys, "platform", "darwin")
    assert heap.hold_mmap_threshold() is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_large_buffers_leave_the_process():
    """In a fresh process with the threshold held, 8 MiB buffers made and freed between small long-lived ones
    (the calibration pass's pattern) leave its anonymous memory where it was."""
    code = """
import ctypes, sys
from upcycle.heap import hold_mmap_threshold
assert hold_mmap_threshold()
libc = ctypes.CDLL("libc.so.6"); libc.malloc.restype = ctypes.c_void_p; libc.free.argtypes = [ctypes.c_void_p]
def anon():
    return int(next(l for l in open("/proc/self/status") if l.startswith("RssAnon")).split()[1])
before, keep = anon(), []
for _ in range(64):
    big = libc.malloc(8 << 20)
    ctypes.memset(big, 1, 8 << 20)  # touched: resident
    keep.append(libc.malloc(4096))  # a small buffer outliving it, as a layer's outputs do
    libc.free(big)
print(anon() - before)
"""
    grown_kib = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert grown_kib < 1024  # 0 here; with the threshold above 8 MiB one freed buffer stays (8,440 KiB seen)

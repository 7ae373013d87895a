"""upcycle/heap.py: glibc's mmap threshold held, so that the calibration pass's large buffers go back to the system
(the peak it saves is measured in benchmarks/README.md, not asserted here); and training's policy on a CPU, the
opposite: a buffer freed after a step is served again from the heap on the next, with no new page faults, where
glibc's defaults map and zero-fill it afresh every time."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest
from test_train import moe_store, text, train  # noqa: F401  (fixtures)

from upcycle import heap
from upcycle.train import loop, setup

GLIBC = pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt policy"
)


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


PROBE = """
import json, resource, sys
import torch
from upcycle.heap import keep_buffers_for_reuse
kept = keep_buffers_for_reuse() if sys.argv[1] == "reuse" else None
faults = []
for _ in range(6):  # a step's activations, of three sizes: made, written, freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    xs = [torch.ones(mb << 18) for mb in (50, 64, 200)]
    del xs
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"kept": kept, "faults": faults}))
"""


def _faults(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@GLIBC
def test_buffers_kept_for_reuse_stop_faulting_where_glibc_maps_them_afresh_every_step():
    pages = ((50 + 64 + 200) << 20) // 4096  # 80,384 pages of 4 KiB a step
    default, reuse = _faults("default"), _faults("reuse")
    assert default["kept"] is None and reuse["kept"] is True
    assert all(f >= pages * 0.95 for f in default["faults"]), default  # fresh zero-filled mappings every step
    # the heap grows in the first steps (glibc's best fit settles within two or three here)...
    assert reuse["faults"][0] >= pages * 0.95, reuse
    assert sum(reuse["faults"][3:]) < pages * 0.02, reuse  # ...and is reused from then on


def test_cpu_training_keeps_buffers_and_gives_them_back_to_save(monkeypatch, moe_store, text, tmp_path):  # noqa: F811
    """upcycle train on a CPU keeps its steps' buffers in the heap from after loading (what loading freed goes back
    first) and gives the free pages back before every checkpoint and before final/, whose peaks the memory plan
    counts without them."""
    calls: list[str] = []
    monkeypatch.setattr(setup, "load_model", _recording(setup.load_model, calls, "load"))
    monkeypatch.setattr(setup, "give_back_free_memory", lambda: calls.append("give back") or True)
    monkeypatch.setattr(setup, "keep_buffers_for_reuse", lambda: calls.append("keep") or True)
    monkeypatch.setattr(loop, "give_back_free_memory", lambda: calls.append("give back") or True)
    monkeypatch.setattr(loop.ckpt, "save_checkpoint", _recording(loop.ckpt.save_checkpoint, calls, "checkpoint"))
    monkeypatch.setattr(loop, "write_final", _recording(loop.write_final, calls, "final"))
    train(moe_store("mixtral"), tmp_path / "run", data=str(text), steps=4, save_every=2)
    # the policy starts after loading, whose freed buffers go back first (a bf16 checkpoint's cast copies)
    assert calls == [
        "load",
        "give back",
        "keep",
        "give back",
        "checkpoint",
        "give back",
        "checkpoint",
        "give back",
        "final",
    ]
    assert (tmp_path / "run" / "final" / "config.json").is_file()


def _recording(fn, calls: list[str], name: str):
    def wrapped(*args, **kwargs):
        calls.append(name)
        return fn(*args, **kwargs)

    return wrapped

"""Python's cyclic garbage collector during a conversion: kept off the objects that start-up makes.

Start-up (importing torch and transformers, building the dense model on the meta device to plan) leaves hundreds of
thousands of long-lived objects, and every full collection that the conversion's later allocations trigger walks
all of them again. On a ~0.5B bf16 Llama (hidden 2048, FFN 5632, 8 layers), `perf` put the collector at ~15% of
a clone conversion's CPU time (benchmarks/README.md, "Python's garbage collector in `convert`"). So `convert` runs its
start-up with the collector off, then freezes what exists (`gc.freeze`: later collections skip those objects) and
turns the collector back on for the calibration pass and the writing, whose cycles (an exception's traceback
holding a layer's tensors) must still be collected. On leaving, the frozen objects are handed back to the
collector and its state restored, so a long-lived process (a test run, a notebook) collects them again.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def quiet_start_up() -> Iterator[Callable[[], None]]:
    """The collector off until the function this yields is called (start-up done), then the objects made so far
    frozen and the collector on again (if it was); undone on leaving, whatever happened."""
    was_on = gc.isenabled()
    frozen = False

    def started() -> None:
        nonlocal frozen
        if not frozen:
            gc.freeze()  # every object alive now: out of every later collection
            frozen = True
            if was_on:
                gc.enable()

    gc.disable()
    try:
        yield started
    finally:
        if frozen:
            gc.unfreeze()  # back into the oldest generation: collected again from here on
        if was_on:
            gc.enable()

"""The calibration pass run beside the writer, not before it (issue 26).

`convert` used to run the whole calibration pass (calibrate.calibrate: the dense model layer by layer, and each
MoE layer's method) before writing the first byte, then stream the output: two long stretches one after the
other, the pass's CPU work and the writer's copying. But layer l's router rows and partition are needed only
when the writer reaches layer l's router and computed experts (the plan writes layer after layer), and every
other tensor (attention, norms, embeddings, clone experts) needs nothing from the pass. So the pass runs in a
background thread and makes each MoE layer's results in layer order while the writer streams; the writer waits
at a layer only while the pass has not reached it yet. Within the pass, the forward (stream.py) runs in a thread
of its own one layer ahead of the methods (`one_ahead`): the forward's large products and the methods' many
small serial steps (balanced assignment, Rayleigh-Ritz, k-means) share the cores instead of taking turns.

Same bytes: the pass runs the same code on the same inputs, in the same order, with the intra-op thread count
of the thread that started it (set in the worker, so that no product or reduction is split across threads
differently); tests/test_calibration_beside.py checks the output against the pass run first.

Memory: the pass's working set and the writer's now overlap instead of following each other. For clone
experts the writer copies byte ranges in the kernel and holds nothing; for split methods it holds one layer's
dense FFN (LayerFFNs), which it now loads after the layer's partition is in.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from .calibrate import Calibration

T = TypeVar("T")


class Beside:
    """Runs CALIBRATION's pass in a daemon thread. `routers` and `partitions` are read-only views of its results
    (None where the conversion wants none) whose `[layer]` and `.get(layer)` wait for that layer."""

    def __init__(self, calibration: Calibration):
        import torch

        self._cond = threading.Condition()
        self._reached = -1  # the last MoE layer whose results are in
        self._done = False
        self._error: BaseException | None = None
        self._stop = threading.Event()
        results = calibration.results
        self.routers = None if results.routers is None else LayerView(self, results.routers)
        self.partitions = None if results.partitions is None else LayerView(self, results.partitions)
        self._thread = threading.Thread(
            target=self._run,
            args=(calibration, torch.get_num_threads()),
            name="upcycle-calibration",
            daemon=True,
        )
        self._thread.start()

    def _run(self, calibration: Calibration, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)  # the starting thread's count: every product split as it would be there
        try:
            for layer in calibration.layers(ahead=True):
                with self._cond:
                    self._reached = layer
                    self._cond.notify_all()
                if self._stop.is_set():
                    return
        except BaseException as exc:  # handed to the writer's thread by wait() / finish()
            self._error = exc
        finally:
            with self._cond:
                self._done = True
                self._cond.notify_all()

    def wait(self, layer: int) -> None:
        """Block until LAYER's results are in (or the pass has ended); raise the pass's error if it failed
        before reaching LAYER."""
        with self._cond:
            self._cond.wait_for(lambda: self._done or self._reached >= layer)
            failed = self._reached < layer and self._error is not None
        if failed:
            raise self._error

    def finish(self) -> None:
        """Wait for the whole pass; raise its error, if any."""
        self._thread.join()
        if self._error is not None:
            raise self._error

    def cancel(self) -> None:
        """Stop the pass after the layer it is on (the writer failed or is done) and wait for it."""
        self._stop.set()
        self._thread.join()


class LayerView(Mapping):
    """layer -> result of a Beside's pass, each looked up once the pass has reached that layer."""

    def __init__(self, owner: Beside, data: dict[int, Any]):
        self._owner, self._data = owner, data

    def __getitem__(self, layer: int) -> Any:
        self._owner.wait(layer)
        return self._data[layer]

    def __iter__(self) -> Iterator[int]:  # the layers, once the pass is over
        self._owner.finish()
        return iter(self._data)

    def __len__(self) -> int:
        self._owner.finish()
        return len(self._data)

    def __bool__(self) -> bool:  # a view is given where results are wanted: true without waiting
        return True


def one_ahead(make: Callable[[], Iterator[T]], threads: int) -> Iterator[T]:
    """The items of the iterator MAKE() returns, made in a thread of their own at most one item ahead of the
    consumer (that thread's torch ops with THREADS intra-op threads): the calibration pass runs layer l + 1's
    forward while the caller computes layer l's method. Its errors are raised here, in order; closing this
    iterator stops that thread after the item it is on."""
    items: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        import torch

        torch.set_num_threads(threads)
        try:
            for item in make():
                if not put((item, None)):
                    return
            put((done, None))
        except BaseException as exc:  # raised in the consumer's thread
            put((done, exc))

    thread = threading.Thread(target=run, name="upcycle-calibration-pass", daemon=True)
    thread.start()
    try:
        while True:
            item, error = items.get()
            if error is not None:
                raise error
            if item is done:
                return
            yield item
            del item
    finally:
        stop.set()
        thread.join()

"""`upcycle train` reads the device back once per step (issue 21, section 4): on a GPU every read of a device value
by the host (`.item()`, `float(t)`, `.tolist()`, a boolean mask, `nonzero`, `bincount`, ...) waits for all queued
kernels, so a stray one per layer stalls the GPU once per layer. These run on the CPU, where no read waits, and count
the reads a GPU would wait on: each op that reaches the dispatcher is seen by a TorchDispatchMode, and `.tolist()`
(which reads a CPU tensor without dispatching anything) is counted where it is called."""

from __future__ import annotations

import contextlib
import sys
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from test_train import moe_store, text, train, train_records  # noqa: F401  (fixtures)
from test_train_chat import CONVERSATIONS, chat_models, write_jsonl  # noqa: F401  (fixtures)
from torch.utils._python_dispatch import TorchDispatchMode

from upcycle.train import loop

aten = torch.ops.aten
# ops whose CUDA kernels copy a device value to the host before they return (their output size or a scalar)
SYNCING = {
    aten._local_scalar_dense.default: "item",  # .item(), float(t), int(t), bool(t), `if t:`
    aten.nonzero.default: "nonzero",
    aten.masked_select.default: "masked_select",
    aten.bincount.default: "bincount",  # sizes its output by the largest index
    aten._unique2.default: "unique",
    aten.unique_consecutive.default: "unique",
    aten.unique_dim.default: "unique",
}


def _bool_index(func: Any, args: tuple) -> bool:
    """t[mask] and t[mask] = v with a boolean mask: a nonzero inside, so a sync on a GPU."""
    if func not in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default):
        return False
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None)


def _origin() -> str:
    """The file that asked for the read: the innermost caller outside torch and this test, as
    "upcycle/train/step.py" or "transformers/masking_utils.py"."""
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename.replace("\\", "/")
        if "/torch/" not in path and not path.endswith(("test_train_syncs.py", "contextlib.py")):
            for root in ("/upcycle/", "/transformers/"):
                if root in path:
                    return root[1:] + path.rsplit(root, 1)[1]
            return path.rsplit("/", 1)[-1]
        frame = frame.f_back
    return "?"


class SyncCounter(TorchDispatchMode):
    """Counts, per phase, the ops that would make the host wait on a GPU, by what asked for them and where."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = "setup"
        self.reads: dict[str, Counter[str]] = {}

    def note(self, what: str) -> None:
        self.reads.setdefault(self.phase, Counter())[f"{what} in {_origin()}"] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNCING:
            self.note(SYNCING[func])
        elif func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            self.note("repeat_interleave")  # sized by the sum of its repeats unless output_size is given
        elif _bool_index(func, args):
            self.note("boolean index")
        return func(*args, **kwargs)


@contextlib.contextmanager
def counting_reads(monkeypatch) -> Iterator[SyncCounter]:
    """Counts the step's reads: train_step's calls each open a phase ("step N"); what the loop does after a step
    (its record, the display, logging, evaluation, saving) counts in that step's phase."""
    counter = SyncCounter()
    original_step, original_tolist = loop.train_step, torch.Tensor.tolist

    def train_step(run, step):
        counter.phase = f"step {step}"
        return original_step(run, step)

    def tolist(self):
        if self.numel() > 0:
            counter.note("tolist")
        return original_tolist(self)

    monkeypatch.setattr(loop, "train_step", train_step)
    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    with counter:
        yield counter


CASES = {
    "defaults": {},
    # every path that adds routing work: capacity (dropped shares), jitter and noise (generators), grad
    # accumulation with global balancing (an all-reduce per micro-batch), the selection bias and its update
    "capacity, jitter, noise, accumulation, bias": dict(
        capacity_factor=1.0, jitter=0.01, router_noise=True, grad_accum=2, balance="both"
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_step_reads_the_device_once(case, moe_store, text, tmp_path, monkeypatch):  # noqa: F811
    """Steps 2-4 and 6-9 are neither logged, evaluated nor saved (log every 5, eval and save every 10): each reads
    back once, the `.tolist()` of its means and gradient norm. A logged step adds the per-layer load rows: one
    more read, whatever the number of layers. transformers' own forward would add one read per micro-batch (its
    check for packed sequences in the position ids it makes when given none): text blocks run attention without a
    mask (attention.py), so it has none to build and reads nothing."""
    options = dict(steps=10, log_every=5, eval_every=10, save_every=10, micro_batch=2) | CASES[case]
    with counting_reads(monkeypatch) as counter:
        train(moe_store("mixtral"), tmp_path / "run", data=str(text), **options)
    assert [r["step"] for r in train_records(tmp_path / "run")] == [1, 5, 10]  # the run's logged steps
    reads = {phase: dict(c) for phase, c in counter.reads.items()}
    ours = {"tolist in upcycle/train/step.py": 1}
    for step in (2, 3, 4, 6, 7, 8, 9):
        assert reads.get(f"step {step}") == ours, (step, reads)
    logged = {"tolist in upcycle/train/step.py": 1, "tolist in upcycle/train/metrics.py": 1}  # + the load rows
    assert reads.get("step 5") == logged, reads["step 5"]
    # the reads are there to be counted: step 10 also evaluates and saves, and reads more
    assert sum(reads["step 10"].values()) > 2, reads


def test_a_chat_step_reads_the_device_as_a_text_step(chat_models, tmp_path, monkeypatch):  # noqa: F811
    """Conversations (position ids restarting at each one, packed, the loss on the assistant's tokens): the step's
    one read, and transformers' one per micro-batch: its mask is built from the packed position ids."""
    data = write_jsonl(tmp_path / "five.jsonl", CONVERSATIONS)
    options = dict(data=str(data), steps=6, log_every=5, eval_every=6, save_every=6, micro_batch=2, seq_len=256)
    with counting_reads(monkeypatch) as counter:
        train(chat_models["moe"], tmp_path / "run", **options)
    reads = {phase: dict(c) for phase, c in counter.reads.items()}
    for step in (2, 3, 4):
        assert reads.get(f"step {step}") == {
            "tolist in upcycle/train/step.py": 1,
            "item in transformers/masking_utils.py": 1,
        }, (step, reads)

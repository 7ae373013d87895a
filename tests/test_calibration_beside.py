"""The calibration pass beside the writer (upcycle/convert/beside.py): the same bytes as the pass run first,
the writer really streams while the pass runs, and a failing pass leaves nothing behind."""

from __future__ import annotations

import json
import threading

import pytest
from test_expert_prompts import PROMPTS, write_prompts
from test_methods import shard_hashes
from test_router_init import TEXT, TOKENS

from upcycle.convert import calibrate as calibrate_module
from upcycle.convert import pipeline
from upcycle.convert.beside import one_ahead
from upcycle.convert.pipeline import convert
from upcycle.convert.spec import build_spec
from upcycle.errors import UpcycleError

CALIBRATED = {
    "kmeans": dict(experts=4, top_k=2, router_init="kmeans"),
    "hidden": dict(experts=4, top_k=2, router_init="hidden"),
    "split-ridge": dict(init="split", experts=4, top_k=2, router_init="kmeans"),
    "coactivation": dict(init="split", split_by="coactivation", experts=4, top_k=2),
    "coactivation-kmeans": dict(init="split", split_by="coactivation", experts=4, top_k=2, router_init="kmeans"),
    "kmeans-every2": dict(experts=4, top_k=2, router_init="kmeans", every=2),
}


@pytest.fixture
def inputs(tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    return calib, write_prompts(tmp_path / "experts.yaml", PROMPTS)


def spec_of(name: str, calib, prompts):
    kw = dict(CALIBRATED[name])
    if kw.get("router_init") == "hidden":
        kw["expert_prompts"] = str(prompts)
    else:
        kw |= dict(calibration=str(calib), calibration_tokens=TOKENS)
    return build_spec(**kw)


def recorded(out) -> dict:
    """upcycle.json less the time it was made."""
    found = json.loads((out / "upcycle.json").read_text())
    found.pop("created")
    return found


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("name", list(CALIBRATED))
def test_same_bytes_as_the_pass_run_first(name, family, dense_store, inputs, tmp_path, monkeypatch):
    """Every weight file byte for byte, and what upcycle.json records, as when the whole pass runs before the
    writer (the code before the pass ran beside it)."""
    src, spec = dense_store(family), spec_of(name, *inputs)
    monkeypatch.setattr(pipeline, "CALIBRATE_BESIDE", False)
    convert(str(src), tmp_path / "first", spec)
    monkeypatch.setattr(pipeline, "CALIBRATE_BESIDE", True)
    convert(str(src), tmp_path / "beside", spec)
    assert shard_hashes(tmp_path / "beside") == shard_hashes(tmp_path / "first")
    assert len(shard_hashes(tmp_path / "first")) >= 1
    a, b = recorded(tmp_path / "first"), recorded(tmp_path / "beside")
    assert a["recipe"] == b["recipe"] and a["plan"] == b["plan"]
    for key in ("calibration", "expert_prompts"):  # the text used, by name, and its tokens
        assert a.get(key) == b.get(key)
    assert a.get("calibration") or a.get("expert_prompts")


def test_writer_streams_while_the_pass_runs(dense_store, inputs, tmp_path, monkeypatch):
    """The pass holds layer 1 until the writer has written a tensor of layer 0 that comes after layer 0's router
    (its first expert): the conversion completes only if the writer streams while the pass is unfinished."""
    written = threading.Event()
    real_add, real_put = calibrate_module.LayerResults.add, pipeline.ShardedWriter.put_range

    def add(self, layer, xs, seqs):
        if layer == 1:
            assert written.wait(timeout=60), "the writer wrote nothing of layer 0 while the pass ran"
        return real_add(self, layer, xs, seqs)

    def put_range(self, name, *args, **kwargs):
        if ".layers.0." in name and ".experts." in name:
            written.set()
        return real_put(self, name, *args, **kwargs)

    monkeypatch.setattr(calibrate_module.LayerResults, "add", add)
    monkeypatch.setattr(pipeline.ShardedWriter, "put_range", put_range)
    monkeypatch.setattr(pipeline, "CALIBRATE_BESIDE", True)
    convert(str(dense_store("llama")), tmp_path / "moe", spec_of("kmeans", *inputs))
    assert written.is_set()


@pytest.mark.parametrize("where", ["method", "forward"])
@pytest.mark.parametrize("at", [0, 3])
def test_a_failing_pass_fails_the_conversion(at, where, dense_store, inputs, tmp_path, monkeypatch):
    """An error of the pass at layer AT (the first, the last), in a layer's method or in the forward (which runs
    in a thread of its own, one layer ahead), reaches the writer's thread: the conversion fails with it, OUT is
    not left behind and no thread of the pass is left running."""
    real_add, real_inputs = calibrate_module.LayerResults.add, calibrate_module.ffn_inputs

    def add(self, layer, xs, seqs):
        if layer == at:
            raise UpcycleError(f"layer {layer} failed")
        return real_add(self, layer, xs, seqs)

    def ffn_inputs(*args):
        for layer, xs in real_inputs(*args):
            if layer == at:
                raise UpcycleError(f"layer {layer} failed")
            yield layer, xs

    monkeypatch.setattr(pipeline, "CALIBRATE_BESIDE", True)
    if where == "method":
        monkeypatch.setattr(calibrate_module.LayerResults, "add", add)
    else:
        monkeypatch.setattr(calibrate_module, "ffn_inputs", ffn_inputs)
    with pytest.raises(UpcycleError, match=f"layer {at} failed"):
        convert(str(dense_store("llama")), tmp_path / "moe", spec_of("coactivation-kmeans", *inputs))
    assert not (tmp_path / "moe").exists()
    assert not [t.name for t in threading.enumerate() if t.name.startswith("upcycle-calibration")]


def test_one_ahead_keeps_order_raises_and_stops():
    """beside.one_ahead: the items in order; an error where it was raised, after the items before it; closing
    the consumer stops the producing thread."""
    made: list[int] = []

    def items(n, fail=None):
        def make():
            for i in range(n):
                if i == fail:
                    raise ValueError(f"item {i}")
                made.append(i)
                yield i

        return make

    assert list(one_ahead(items(6), 1)) == list(range(6))
    got = []
    with pytest.raises(ValueError, match="item 3"):
        for i in one_ahead(items(6, fail=3), 1):
            got.append(i)
    assert got == [0, 1, 2]
    made.clear()
    it = one_ahead(items(1000), 1)
    assert next(it) == 0
    it.close()
    assert len(made) <= 3  # one in hand, one queued, one being made: not the 1000
    assert not [t.name for t in threading.enumerate() if t.name.startswith("upcycle-calibration")]

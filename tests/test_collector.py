"""upcycle/collector.py: the collector off during a conversion's start-up, its objects frozen after, and the
process's state restored on leaving (a test run or a notebook goes on collecting them)."""

from __future__ import annotations

import gc

import pytest
from tiny import make_dense

from upcycle.collector import quiet_start_up
from upcycle.convert.pipeline import convert
from upcycle.convert.spec import build_spec


def test_off_until_started_then_frozen_then_restored():
    assert gc.isenabled() and gc.get_freeze_count() == 0
    with quiet_start_up() as started:
        assert not gc.isenabled()
        kept = [object() for _ in range(1000)]
        started()
        assert gc.isenabled() and gc.get_freeze_count() >= len(kept)
        started()  # once only
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_restored_on_error_and_when_never_started():
    with pytest.raises(ValueError), quiet_start_up():
        assert not gc.isenabled()
        raise ValueError("fails before start-up ends")
    assert gc.isenabled() and gc.get_freeze_count() == 0
    gc.disable()
    try:
        with quiet_start_up() as started:
            started()
            assert not gc.isenabled()  # it was off: it stays off
        assert not gc.isenabled() and gc.get_freeze_count() == 0
    finally:
        gc.enable()


def test_convert_leaves_the_collector_as_it_found_it(tmp_path, monkeypatch):
    """A conversion runs its plan with the collector off and writes with it on, its start-up frozen; after it,
    nothing is frozen and the collector is on."""
    from upcycle.convert import pipeline

    seen = {}
    real = pipeline.write_weights

    def spy(*args, **kwargs):
        seen["enabled"], seen["frozen"] = gc.isenabled(), gc.get_freeze_count()
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "write_weights", spy)
    src = make_dense(tmp_path / "dense", "llama")
    convert(str(src), tmp_path / "moe", build_spec(experts=4, top_k=2))
    assert seen["enabled"] and seen["frozen"] > 10_000  # torch's and transformers' objects among them
    assert gc.isenabled() and gc.get_freeze_count() == 0
    assert (tmp_path / "moe" / "config.json").is_file()

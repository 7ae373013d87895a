"""benchmarks/sft_dense_vs_moe.py --preset smoke: the dense parent, its clone MoE and the MoE with frozen experts
instruction-tuned on chatterbot-corpus conversations; the held-out assistant-token losses it records are the
training loop's own, and a rerun continues an interrupted study instead of starting again."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    pytest.importorskip("chatterbot_corpus", reason="chatterbot-corpus (the dev extra) holds the conversations")
    bench = _load("sft_dense_vs_moe")
    root = tmp_path_factory.mktemp("sft")
    log: list[str] = []
    import torch

    threads = torch.get_num_threads()
    results = bench.run_study("smoke", root / "results", root / "work", log=log.append)
    # the smoke preset runs on one thread; the test process gets its own count back (later tests compare
    # in-process runs with child processes bit for bit)
    assert torch.get_num_threads() == threads
    return bench, root, results, log


@pytest.mark.slow
def test_smoke_study_records_each_arms_gain_from_sft(study):
    bench, root, results, _ = study
    assert results == json.loads(bench.results_path(root / "results", "smoke").read_text())
    assert results["partial"] is False
    assert sorted(results["runs"]) == ["dense/seed0", "moe-frozen/seed0", "moe/seed0"]
    before = results["before"]
    assert before["dense"] > 9  # a random tiny model: about ln(49,152) = 10.8 per assistant token
    assert abs(before["dense"] - before["moe"]) < 1e-4  # the clone-upcycled MoE computes its parent's function
    runs = results["runs"]
    for key, run in runs.items():
        # the held-out loss measured here on final/ is the training loop's own last evaluation
        assert run["loop_eval"][-1]["step"] == 4
        assert abs(run["after"] - run["loop_eval"][-1]["eval_loss"]) < 1e-5, key
        start = before["dense" if run["arm"] == "dense" else "moe"]
        assert run["after"] < start - 0.05, key  # four steps at lr 3e-3 lower it
        assert run["tokens"] == 4 * 2 * 128 and run["heldout_assistant_tokens"] > 100
    assert runs["moe-frozen/seed0"]["trainable_params"] < runs["moe/seed0"]["trainable_params"]
    assert runs["moe/seed0"]["total_params"] > runs["dense/seed0"]["total_params"]
    arms = results["summary"]["arms"]
    for arm, row in arms.items():
        assert row["gains"] == [row["before"] - runs[f"{arm}/seed0"]["after"]]
    paired = results["summary"]["paired"]["moe minus dense gain"]["per_seed"]
    assert paired == [runs["dense/seed0"]["after"] - runs["moe/seed0"]["after"]]
    png = bench.results_path(root / "results", "smoke").with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000  # the plot beside the JSON


@pytest.mark.slow
def test_a_rerun_continues_with_the_runs_not_recorded(study):
    """An interrupted study (one arm missing, marked partial) is finished by the same command: the recorded arms
    are skipped, the missing one trains again with the same seed and gives the same loss."""
    bench, root, results, _ = study
    path = bench.results_path(root / "results", "smoke")
    interrupted = json.loads(path.read_text())
    missing = interrupted["runs"].pop("moe-frozen/seed0")
    interrupted["partial"] = True
    path.write_text(json.dumps(interrupted))
    log: list[str] = []
    again = bench.run_study("smoke", root / "results", root / "work", log=log.append)
    assert [line for line in log if line.endswith("skipped")] == [
        "dense/seed0: recorded, skipped",
        "moe/seed0: recorded, skipped",
    ]
    assert again["partial"] is False
    assert again["runs"]["dense/seed0"] == results["runs"]["dense/seed0"]  # untouched, finish time included
    assert abs(again["runs"]["moe-frozen/seed0"]["after"] - missing["after"]) < 1e-6
    assert json.loads(path.read_text())["partial"] is False


def test_results_of_other_settings_are_not_mixed_in(tmp_path, capsys):
    bench = _load("sft_dense_vs_moe")
    out = tmp_path / "results"
    out.mkdir()
    other = json.dumps({"settings": {"steps": 1}, "runs": {}})
    bench.results_path(out, "smoke").write_text(other)
    assert bench.main(["--preset", "smoke", "--out", str(out), "--work", str(tmp_path / "work")]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "holds another smoke preset's results; move it away" in err
    assert bench.results_path(out, "smoke").read_text() == other  # left as it was
    assert not (tmp_path / "work" / "train.jsonl").exists()

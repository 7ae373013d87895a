"""What a training run records about its experts (TensorBoard load, divergence records, load.png) and
`upcycle routing RUN_DIR` (divergence.png), on one short real run of a tiny cloned Mixtral on real text."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from upcycle.convert.pipeline import convert
from upcycle.convert.spec import build_spec
from upcycle.report.routing_run import FIGURE_SIZE, checkpoint_cosine
from upcycle.train.checkpoint import checkpoints
from upcycle.train.load_plot import DPI, figure_size
from upcycle.train.metrics import read_metrics
from upcycle_cli.main import run

STEPS, SAVE_EVERY = 8, 4
EXPERTS = 4


@pytest.fixture(scope="module")
def run_dir(dense_store, jargon_text, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("routing-run")
    moe = root / "moe"
    convert(str(dense_store("llama")), moe, build_spec(experts=EXPERTS, top_k=2))  # clone: identical experts
    head = jargon_text.read_text()[:30_000]
    text = root / "jargon.txt"
    text.write_text(head[: head.rindex("\n\n")] + "\n")
    out = root / "run"
    args = ["train", str(moe), "--data", str(text), "--out", str(out), "--steps", str(STEPS), "--seq-len", "32"]
    args += ["--micro-batch", "2", "--lr", "3e-3", "--log-every", "1", "--eval-every", str(SAVE_EVERY)]
    args += ["--save-every", str(SAVE_EVERY), "--tensorboard"]
    assert run(args) == 0
    return out


def moe_layers(run_dir: Path) -> list[int]:
    """Every layer of the tiny llama becomes an MoE layer: the layers the first train record logged."""
    return [row["layer"] for row in next(r for r in read_metrics(run_dir) if r["kind"] == "train")["layers"]]


def divergence(run_dir: Path) -> dict[int, dict[str, float]]:
    return {r["step"]: r["layers"] for r in read_metrics(run_dir) if r["kind"] == "divergence"}


def assert_not_blank(path: Path, size: tuple[int, int]) -> None:
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == size
        pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    assert pixels.std() > 20
    assert len({tuple(p) for p in pixels.reshape(-1, 3)[::5].astype(int)}) > 20  # lines, text, not a flat fill


def test_tensorboard_holds_the_per_layer_load(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    tags = events.Tags()
    train = {r["step"]: r for r in read_metrics(run_dir) if r["kind"] == "train"}
    assert sorted(train) == list(range(1, STEPS + 1))
    for layer in moe_layers(run_dir):
        for name, key in (("cv", "cv"), ("dropped", "dropped")):
            scalars = events.Scalars(f"router/{name}/layer_{layer}")
            assert [e.step for e in scalars] == list(range(1, STEPS + 1))
            for e in scalars:  # the same figures as metrics.jsonl (TensorBoard stores float32)
                row = next(r for r in train[e.step]["layers"] if r["layer"] == layer)
                assert e.value == pytest.approx(row[key], rel=1e-6, abs=1e-7)
        assert f"router/load/layer_{layer}" in tags["histograms"]
        hist = events.Histograms(f"router/load/layer_{layer}")
        assert len(hist) == STEPS
        assert hist[-1].histogram_value.num == EXPERTS  # one value per expert: its share of the load
        assert hist[-1].histogram_value.sum == pytest.approx(1.0, abs=1e-5)
        assert [e.step for e in events.Scalars(f"divergence/weight_cosine/layer_{layer}")] == [0, 4, 8]
        held_out = events.Scalars(f"eval/router/cv/layer_{layer}")  # the load over the held-out tokens, apart
        assert [e.step for e in held_out] == [SAVE_EVERY, STEPS]


def test_divergence_records_start_at_one_and_fall(run_dir):
    records = divergence(run_dir)
    assert sorted(records) == [0, SAVE_EVERY, STEPS]
    for layer in map(str, moe_layers(run_dir)):
        values = [records[step][layer] for step in sorted(records)]
        assert all(math.isfinite(v) and v <= 1.0 + 1e-12 for v in values)
        assert values[0] == pytest.approx(1.0, abs=1e-12)  # cloned experts are identical
        assert values[0] > values[1] > values[2]  # training moved them apart (real figures ~0.9999x)
    # the figure computed from the saved safetensors alone agrees with the one logged from memory
    saved = dict(checkpoints(run_dir))
    from_disk = checkpoint_cosine(saved[STEPS])
    assert sorted(from_disk) == moe_layers(run_dir)
    for layer in moe_layers(run_dir):
        assert from_disk[layer] == pytest.approx(records[STEPS][str(layer)], abs=1e-9)


def test_load_png_of_the_final_state(run_dir):
    width, height = figure_size(len(moe_layers(run_dir)), EXPERTS)
    assert_not_blank(run_dir / "load.png", (round(width * DPI), round(height * DPI)))
    assert not list(run_dir.glob(".load.png*"))  # drawn beside and renamed: no leftover


def test_routing_run_dir_writes_divergence_png(run_dir, tmp_path, capsys):
    out = tmp_path / "report"
    capsys.readouterr()
    assert run(["routing", str(run_dir), "--out", str(out), "--json", "-"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert sorted(p.name for p in out.iterdir()) == ["divergence.json", "divergence.png"]
    assert_not_blank(out / "divergence.png", (round(FIGURE_SIZE[0] * DPI), round(FIGURE_SIZE[1] * DPI)))
    logged = divergence(run_dir)
    assert data["weight_cosine_from_checkpoints"] == []
    for layer in map(str, moe_layers(run_dir)):
        assert data["weight_cosine"][layer] == [[s, logged[s][layer]] for s in sorted(logged)]
        assert [s for s, _ in data["load_cv"][layer]] == list(range(1, STEPS + 1))
    assert json.loads((out / "divergence.json").read_text()) == data


def test_routing_run_dir_computes_missing_divergence_from_checkpoints(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    kept = [line for line in (copy / "metrics.jsonl").read_text().splitlines() if '"divergence"' not in line]
    (copy / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    out = tmp_path / "report"
    assert run(["routing", str(copy), "--out", str(out), "--json", str(tmp_path / "r.json")]) == 0
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["weight_cosine_from_checkpoints"] == [SAVE_EVERY, STEPS]  # keep-last 2: both checkpoints
    logged = divergence(run_dir)
    for layer in map(str, moe_layers(run_dir)):
        steps = [s for s, _ in data["weight_cosine"][layer]]
        assert steps == [SAVE_EVERY, STEPS]
        for step, value in data["weight_cosine"][layer]:
            assert value == pytest.approx(logged[step][layer], abs=1e-9)


def test_routing_run_dir_with_text_routes_final(run_dir, jargon_text, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(jargon_text.read_text()[100_000:102_000])
    out = tmp_path / "report"
    assert run(["routing", str(run_dir), "--out", str(out), "--text", str(text), "--max-tokens", "200"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["divergence.json", "divergence.png", "load.png", "routing.json", "tokens.html"]
    data = json.loads((out / "divergence.json").read_text())
    routed = json.loads((out / "routing.json").read_text())
    assert routed["tokens"] == 200 and routed["moe_layers"] == moe_layers(run_dir)
    assert data["routing"]["model"] == "run/final"
    # final/ is the step-8 model: the routing report's weight cosine is the run's last figure
    last = divergence(run_dir)[STEPS]
    for row in routed["layers"]:
        assert row["weight_cosine"] == pytest.approx(last[str(row["layer"])], abs=1e-9)


def test_run_dir_without_checkpoints_is_refused(tmp_path, capsys):
    empty = tmp_path / "run"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    capsys.readouterr()
    assert run(["routing", str(empty), "--out", str(tmp_path / "report")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "no checkpoints and no final/" in err and "\n" not in err
    assert not (tmp_path / "report").exists()


def test_model_without_text_is_refused(run_dir, tmp_path, capsys):
    capsys.readouterr()
    assert run(["routing", str(run_dir / "final"), "--out", str(tmp_path / "report")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "--text" in err and "\n" not in err


# --- one load, over named tokens (issue 20): the summary, metrics.jsonl and `routing RUN_DIR` agree ----------


def test_summary_and_routing_run_dir_give_the_same_load_over_the_same_tokens(run_dir, tmp_path, capsys):
    trained = json.loads((run_dir / "final" / "upcycle.json").read_text())["training"]
    last_eval = [r for r in read_metrics(run_dir) if r["kind"] == "eval"][-1]
    assert last_eval["step"] == STEPS and last_eval["routed_tokens"] > last_eval["eval_tokens"] > 0
    assert f"{last_eval['routed_tokens']:,} held-out tokens at step {STEPS}" in trained["expert_load_tokens"]
    capsys.readouterr()
    assert run(["routing", str(run_dir), "--out", str(tmp_path / "report"), "--json", str(tmp_path / "r.json")]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    data = json.loads((tmp_path / "r.json").read_text())
    assert "top-k assignments" in data["load"]
    assert f"{last_eval['routed_tokens']:,} held-out tokens" in data["load_cv_eval_tokens"]
    assert "training tokens of each logged step" in data["load_cv_tokens"]
    assert f"counted over the {last_eval['routed_tokens']:,} held-out tokens" in printed
    summary = {row["layer"]: row["cv"] for row in trained["expert_load"]}
    assert sorted(summary) == moe_layers(run_dir)
    for layer, cv in summary.items():
        series = data["load_cv_eval"][str(layer)]
        assert [s for s, _ in series] == [SAVE_EVERY, STEPS]  # one point per evaluation
        assert series[-1][1] == cv  # the same number, not a training step's
        row = next(r for r in last_eval["layers"] if r["layer"] == layer)
        assert row["cv"] == cv and sum(row["load"]) == pytest.approx(1.0)
        # the CV is of the shares of top-k assignments: std / mean with the population std
        shares = np.array(row["load"])
        assert cv == pytest.approx(shares.std() / shares.mean(), rel=1e-9)


def test_divergence_png_axes_are_integers(monkeypatch, tmp_path):
    from matplotlib.figure import Figure

    from upcycle.report.routing_run import write_divergence_png

    drawn = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: drawn.append(fig))
    layers = range(0, 24, 2)  # 12 MoE layers: told apart by a colour bar, not a legend
    load = {str(layer): [[s, 0.1 * s + layer / 100] for s in (1, 2, 3)] for layer in layers}
    write_divergence_png(tmp_path / "d.png", load, {}, "run", "held-out tokens")
    (fig,) = drawn
    fig.canvas.draw()
    top, bottom, bar = fig.axes
    for axis in (bottom.xaxis, bar.yaxis):
        ticks = [t for t in axis.get_majorticklocs() if axis.get_view_interval()[0] <= t <= axis.get_view_interval()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    assert "held-out tokens" in top.get_title()

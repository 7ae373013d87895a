"""The issue-14 benchmark scripts run end to end at tiny sizes and write real results.

benchmarks/vs_mergekit.py: upcycle and `cp -r` always; the mergekit arm only where mergekit's own virtual
environment exists (it is never a project dependency, and CI has no network to build it), else that one test
skips and says why. benchmarks/upcycle_vs_dense.py --preset smoke: the whole study on Debian's text.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Read at import, before conftest points UPCYCLE_CACHE at a session folder: mergekit's venv and the Debian text
# live in the user's cache (CI points UPCYCLE_CACHE into the clone, where no mergekit venv is built).
USER_CACHE = Path(
    os.environ.get("UPCYCLE_CACHE")
    or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "upcycle")
)


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    if str(spec.origin and Path(spec.origin).parent) not in sys.path:  # spawned workers import it by name
        sys.path.insert(0, str(Path(spec.origin).parent))
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def mergekit_result(tmp_path_factory):
    vs = _load("vs_mergekit")
    tmp = tmp_path_factory.mktemp("vs_mergekit")
    result = vs.main(
        [
            "--size",
            "tiny",
            "--repeats",
            "1",
            "--work",
            str(tmp / "work"),
            "--results",
            str(tmp / "r.json"),
            "--mergekit-venv",
            str(USER_CACHE / "mergekit-venv"),
        ]
    )
    return result, json.loads((tmp / "r.json").read_text()), tmp


@pytest.mark.slow
def test_vs_mergekit_upcycle_and_cp_arms(mergekit_result):
    result, saved, tmp = mergekit_result
    assert saved["summary"] == json.loads(json.dumps(result["summary"]))
    up = saved["summary"]["upcycle"]
    assert up["ok"] and up["runs"] == 1
    run = saved["runs"]["upcycle"][0]
    assert run["rc"] == 0 and run["wall_s"] > 0 and run["cp_s"] > 0
    assert up["ratio_to_cp"] == pytest.approx(run["wall_s"] / run["cp_s"])
    # the MoE holds 8 copies of each FFN: 2 layers × 8 × 3 × 64 × 256 bf16 values dominate its bytes
    assert up["output_bytes"] > 2 * 8 * 3 * 64 * 256 * 2
    assert 50 * 2**20 < up["peak_rss_bytes"] < 4 * 2**30  # a Python process with torch, well under 4 GiB
    check = saved["verify"]["upcycle"]
    assert check["passed"] and check["logits_passed"] and check["mode"] == "layerwise"
    assert check["max_abs_diff"] < 1e-3 and check["top1_agreement"] == 1.0
    assert check["tensor_check"]["passed"] and check["moe_blocks_passed"] == check["moe_blocks"] == 2
    extras = {row["what"]: row for row in saved["only_upcycle"]}
    assert len(extras) == 5 and all(row["rc"] == 0 for row in extras.values())
    assert extras["every other layer (Qwen2-MoE)"]["exact_at_init"] is True
    assert extras["fine-grained 64, g=8, top-8"]["exact_at_init"] is True
    assert extras["Drop-Upcycling r=0.5"]["exact_at_init"] is False
    assert extras["every other layer (Qwen2-MoE)"]["output_bytes"] < up["output_bytes"]
    assert not (tmp / "work" / "out-upcycle").exists()  # outputs are removed after the check


@pytest.mark.slow
def test_vs_mergekit_mergekit_arm(mergekit_result):
    _, saved, _ = mergekit_result
    if not saved["mergekit"]["usable"]:
        pytest.skip(f"mergekit arm not run: {saved['mergekit']['why']}")
    mk, up = saved["summary"]["mergekit"], saved["summary"]["upcycle"]
    assert mk["ok"] and mk["runs"] == 1
    assert mk["output_bytes"] == pytest.approx(up["output_bytes"], rel=0.1)  # the same tensors, other names
    check = saved["verify"]["mergekit"]
    assert check["logits_passed"] and check["max_abs_diff"] < 1e-3 and check["top1_agreement"] == 1.0


@pytest.mark.slow
def test_upcycle_vs_dense_smoke(tmp_path):
    study = _load("upcycle_vs_dense")
    args = ["--preset", "smoke", "--work", str(tmp_path / "work"), "--results", str(tmp_path / "r.json")]
    args += ["--text-cache", str(USER_CACHE / "realtext" / "debian")]
    try:
        record = study.main(args)
    except study.TextUnavailable as exc:
        pytest.skip(f"Debian text not available: {exc}")
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["complete"] and saved["summary"] == json.loads(json.dumps(record["summary"]))
    assert sorted(r["arm"] for r in saved["runs"]) == sorted(study.ARMS)
    for run in saved["runs"]:
        losses = [e["eval_loss"] for e in run["evals"]]
        assert run["evals"][0]["tokens"] == 0 and len(losses) == 1 + 2  # start + the preset's 2 evals
        assert all(math.isfinite(x) and 0 < x < math.log(saved["preset"]["vocab"]) + 2 for x in losses)
        assert run["tokens"] == saved["preset"]["arm_tokens"] and run["tokens_per_s"] > 0
    start = {r["arm"]: r["evals"][0]["eval_loss"] for r in saved["runs"]}
    # the dense arm starts where the parent's pretraining ended (same weights, same held-out blocks), and the
    # clone-upcycled MoEs start exactly there too; Drop-Upcycling re-initialises half of each FFN, so it does not
    # (at this size the parent has barely learnt anything, so the re-drawn half may even lower the loss)
    assert start["dense"] == pytest.approx(saved["parent"]["evals"][-1]["eval_loss"], abs=1e-4)
    assert start["moe-all"] == pytest.approx(start["dense"], abs=1e-4)
    assert start["moe-every2"] == pytest.approx(start["dense"], abs=1e-4)
    assert abs(start["drop-r0.5"] - start["dense"]) > 1e-3
    assert saved["active_params"]["moe-all"] > saved["active_params"]["moe-every2"] > saved["active_params"]["dense"]
    summary = saved["summary"]
    assert all(math.isfinite(summary[a]["ppl_mean"]) for a in study.ARMS)
    assert "vs_dense_pct_mean" in summary["moe-all"] and "vs_dense_pct_mean" not in summary["dense"]
    parts = saved["corpus"]["parts"]
    assert parts["heldout"]["documents"] > 0 and parts["continue"]["documents"] > 0
    assert saved["data_tokens"]["continue"] >= saved["preset"]["arm_tokens"]  # no arm repeats its text
    assert saved["parent"]["tokens"] == saved["preset"]["parent_tokens"]
    # the right-hand panel: each arm against dense at the same tokens, paired by seed, from the first eval on
    runs = {r["arm"]: r for r in saved["runs"]}
    paired = zip(runs["moe-all"]["evals"], runs["dense"]["evals"], strict=True)
    expected = {e["tokens"]: 100 * (math.exp(e["eval_loss"] - d["eval_loss"]) - 1) for e, d in paired if e["tokens"]}
    got = study.vs_dense(saved, "moe-all", "tokens")
    assert sorted(got) == sorted(expected) and all(got[x] == [pytest.approx(v)] for x, v in expected.items())
    pngs = [tmp_path / "r_tokens.png", tmp_path / "r_flops.png"]
    for png in pngs:
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000
    # a preset with a `base` (as cpu-long has cpu) reuses the base's corpus, tokenizer and parent: no new pretraining
    study.PRESETS["smoke-more"] = study.replace(study.PRESETS["smoke"], arm_tokens=4096, seeds=(1,), base="smoke")
    try:
        more_args = ["--preset", "smoke-more", "--work", str(tmp_path / "work"), "--results", str(tmp_path / "m.json")]
        more = study.main([*more_args, *args[-2:], "--arms", "dense,moe-all"])
    finally:
        del study.PRESETS["smoke-more"]
    assert more["parent"] == saved["parent"] and more["corpus"] == saved["corpus"]
    runs = sorted((r["arm"], r["seed"], r["tokens"]) for r in more["runs"])
    assert runs == [("dense", 1, 4096), ("moe-all", 1, 4096)]
    assert (tmp_path / "work" / "runs" / "smoke-more" / "moe-all-s1").is_dir()
    start = {r["arm"]: r["evals"][0]["eval_loss"] for r in more["runs"]}
    assert start["dense"] == pytest.approx(saved["parent"]["evals"][-1]["eval_loss"], abs=1e-4)


def test_upcycle_vs_dense_presets_and_stale_work(tmp_path):
    study = _load("upcycle_vs_dense")
    for name, preset in study.PRESETS.items():  # a based preset differs from its base only in what the arms read
        assert study.base_mismatch(name) == [], name
        assert preset.base is None or study.PRESETS[preset.base].base is None
    cpu = study.PRESETS["cpu"]
    assert cpu.parent_tokens >= 10 * 1_100_000  # >= 10 tokens per parameter for the ~1.1M-parameter parent
    assert (cpu.continue_tokens or 0) >= study.PRESETS["cpu-long"].arm_tokens >= cpu.arm_tokens
    # a work folder made with other settings is refused (exit 2) before anything is read or written in it
    work = tmp_path / "work"
    work.mkdir()
    (work / "made_for.json").write_text(json.dumps({"hidden": 1}))
    with pytest.raises(SystemExit) as exc:
        study.main(["--preset", "smoke", "--work", str(work), "--results", str(tmp_path / "r.json")])
    assert exc.value.code == 2 and sorted(p.name for p in work.iterdir()) == ["made_for.json"]


@pytest.mark.slow
def test_gpu_check_dry_mode_runs_every_step_on_cpu(jargon_text, tmp_path):
    """benchmarks/gpu/check.py --device cpu --tiny: the GPU machine's steps at toy size, so the script cannot rot."""
    import subprocess

    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu" / "check.py"), "--out", str(out), "--device", "cpu",
           "--tiny", "--text", str(jargon_text), "--work", str(tmp_path / "work"), "--e2e-steps", "40"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "=== GPU check summary ===" in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert [k for k in summary if k != "total_s"] == ["env", "pytest", "e2e", "throughput", "compile"]
    assert all(summary[k]["ok"] for k in ("env", "pytest", "e2e", "throughput", "compile"))
    assert summary["pytest"]["passed"] == 0 and summary["pytest"]["skipped"] >= 10  # no GPU: all skip
    e2e = summary["e2e"]
    assert e2e["lm_last3"] < e2e["lm_first3"] - 0.3 and e2e["final"]["class"] == "MixtralForCausalLM"
    assert not e2e["final"]["missing"] and not e2e["final"]["unexpected"] and e2e["final"]["logits_finite"]
    for step in ("throughput", "compile"):
        rows = summary[step]["rows"]
        assert [r["model"] for r in rows] == ["dense", "moe 8x top-2"]
        assert all(r["tokens_per_s"] > 0 and r["peak_mib"] > 0 for r in rows)
        assert rows[1]["vs_dense"] == pytest.approx(rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"])
    assert all(r["compile"] for r in summary["compile"]["rows"])
    assert (out / "e2e.log").is_file() and (out / "pytest.xml").is_file()

"""The issue-14 benchmark scripts run end to end at tiny sizes and write real results.

benchmarks/vs_mergekit.py and vs_mergekit_sources.py: upcycle and `cp -r` always; the mergekit arm only where
mergekit's own virtual environment exists (it is never a project dependency, and CI has no network to build it),
else that one test skips and says why. benchmarks/upcycle_vs_dense.py --preset smoke: the whole study on Debian's text.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import re
import sys
from pathlib import Path

import pytest
import torch

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


@pytest.fixture(scope="module")
def sources_result(tmp_path_factory):
    vs = _load("vs_mergekit_sources")
    tmp = tmp_path_factory.mktemp("vs_mergekit_sources")
    argv = ["--size", "tiny", "--repeats", "1", "--work", str(tmp / "work"), "--results", str(tmp / "r.json"),
            "--mergekit-venv", str(USER_CACHE / "mergekit-venv")]  # fmt: skip
    result = vs.main(argv)
    return vs, result, json.loads((tmp / "r.json").read_text()), tmp / "work"


@pytest.mark.slow
def test_vs_mergekit_sources_upcycle_arm(sources_result):
    """benchmarks/vs_mergekit_sources.py --size tiny: every gate mode converts the recipe, measured against cp."""
    _, result, saved, work = sources_result
    assert saved["modes"] == json.loads(json.dumps(result["modes"]))
    assert list(saved["modes"]) == ["random", "hidden", "cheap_embed"] and saved["repeats"] == 1
    hidden = saved["base"]["config"]["hidden_size"]
    assert saved["base"]["size"] == "tiny" and hidden == 64
    # 2 layers × 3 experts (one per fine-tune) × gate, up, down of 64 × 256 in bf16
    expert_bytes = 2 * 3 * 3 * 64 * 256 * 2
    for mode, block in saved["modes"].items():
        up = block["summary"]["upcycle"]
        assert up["ok"] and up["runs"] == 1, mode
        run = block["runs"]["upcycle"][0]
        assert run["rc"] == 0 and run["wall_s"] > 0 and run["cp_s"] > 0, mode
        assert up["ratio_to_cp"] == pytest.approx(run["wall_s"] / run["cp_s"])
        assert expert_bytes < up["output_bytes"] < 2 * expert_bytes, mode
        assert 50 * 2**20 < up["peak_rss_bytes"] < 4 * 2**30, mode
        # the command upcycle.json records converts from OUT's copy of the YAML, with the flags given beside it
        std = ["--router-std", repr(1 / math.sqrt(hidden))] if mode != "random" else []
        assert block["upcycle_flags"] == ["--mergekit-config", "moe.yml", "OUT", *std]
        assert block["upcycle_command"].split() == ["upcycle", "convert", "--mergekit-config",
                                                    "mergekit_moe_config.yml", "out-upcycle", *std]  # fmt: skip
        assert f"gate_mode: {mode}" in (work / f"moe-{mode}.yml").read_text()
        if not saved["mergekit"]["usable"]:
            assert block["summary"]["mergekit"] == {"ok": False, "skipped": saved["mergekit"]["why"]}
            assert block["agreement"] is None
    assert not (work / "out-upcycle").exists()  # outputs are removed after each mode
    # the stand-in fine-tunes: BASE with every FFN weight perturbed, every other tensor BASE's bytes
    from safetensors.torch import load_file

    base = load_file(work / "dense-tiny" / "model.safetensors")
    fts = [load_file(work / "fine-tunes-tiny" / f"ft-{i}" / "model.safetensors") for i in (1, 2, 3)]
    for ft in fts:
        assert ft.keys() == base.keys()
        for name, x in base.items():
            assert torch.equal(ft[name], x) == (".mlp." not in name), name
    w = "model.layers.0.mlp.up_proj.weight"
    delta = (fts[0][w].float() - base[w].float()).std() / base[w].float().std()
    assert 0.05 < float(delta) < 0.2  # --ft-scale 0.1 of the tensor's std, in bf16
    assert not torch.equal(fts[0][w], fts[1][w])


@pytest.mark.slow
def test_vs_mergekit_sources_comparison(sources_result, tmp_path):
    """The comparison of the mergekit arm, checked without mergekit: upcycle's `hidden` output against a copy
    in mergekit's fused layout (routers doubled) agrees tensor by tensor, and its router rows are the
    'FFN input, every token' definition the README reports."""
    import subprocess

    from safetensors.torch import load_file, save_file

    vs, _, saved, work = sources_result
    out = tmp_path / "up"
    cmd = [str(Path(sys.executable).parent / "upcycle"), "convert", "--mergekit-config", str(work / "moe-hidden.yml"),
           str(out), *saved["modes"]["hidden"]["upcycle_flags"][3:]]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    tensors: dict[str, torch.Tensor] = {}
    for f in out.glob("*.safetensors"):
        tensors |= load_file(f)
    fused: dict[str, torch.Tensor] = {}
    for layer in range(2):
        stem = f"model.layers.{layer}.block_sparse_moe"
        ex = [{w: tensors.pop(f"{stem}.experts.{e}.{w}.weight") for w in ("w1", "w2", "w3")} for e in range(3)]
        gate_up = [torch.cat([x["w1"], x["w3"]]) for x in ex]  # mergekit's fused layout: gate rows, then up rows
        fused[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.stack(gate_up)
        fused[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack([x["w2"] for x in ex])
        fused[f"model.layers.{layer}.mlp.gate.weight"] = tensors.pop(f"{stem}.gate.weight") * 2
    mk = tmp_path / "mk"
    mk.mkdir()
    save_file(tensors | fused, str(mk / "model.safetensors"))
    agree = vs.compare(out, mk)
    assert agree["compared"] == len(vs.canonical(out)) and not agree["only_upcycle"] and not agree["only_mergekit"]
    kinds = agree["by_kind"]
    assert kinds["expert"] == {"tensors": 18, "byte_identical": 18, "max_abs_diff": 0.0}
    assert kinds["other"]["tensors"] == kinds["other"]["byte_identical"] == len(tensors)
    assert kinds["router"]["tensors"] == 2 and kinds["router"]["byte_identical"] == 0
    rows = agree["router_rows"]
    assert rows["rows"] == 6 and rows["cosine_min"] > 0.9999
    assert rows["norm_ratio_min"] == pytest.approx(0.5) and rows["norm_ratio_max"] == pytest.approx(0.5)
    # upcycle's hidden rows: the FFN input averaged over every prompt token, not mergekit's residual/last token
    found = vs.explain_hidden(work / "dense-tiny", {"upcycle": out})["upcycle"]
    assert found["ffn_input/all"]["cosine_min"] > 0.999
    assert all(found[k]["cosine_median"] < 0.99 for k in found if k != "ffn_input/all"), found


@pytest.mark.slow
def test_vs_mergekit_sources_mergekit_arm(sources_result):
    _, _, saved, _ = sources_result
    if not saved["mergekit"]["usable"]:
        pytest.skip(f"mergekit arm not run: {saved['mergekit']['why']}")
    for mode, block in saved["modes"].items():
        mk, up = block["summary"]["mergekit"], block["summary"]["upcycle"]
        assert mk["ok"] and mk["runs"] == 1, mode
        assert mk["output_bytes"] == pytest.approx(up["output_bytes"], rel=0.1)  # the same tensors, other names
        agree = block["agreement"]
        assert agree["compared"] > 0 and not agree["only_upcycle"] and not agree["only_mergekit"]
        for k in ("expert", "other"):  # experts and copied tensors: the same bytes in every gate mode
            assert agree["by_kind"][k]["byte_identical"] == agree["by_kind"][k]["tensors"] > 0, (mode, k)
    routers = saved["modes"]["cheap_embed"]["agreement"]["by_kind"]["router"]
    assert routers["byte_identical"] == routers["tensors"] == 2  # cheap_embed with --router-std 1/√hidden
    defs = saved["modes"]["hidden"]["agreement"]["definitions"]
    assert defs["mergekit"]["residual/last"]["cosine_min"] > 0.99
    assert defs["upcycle"]["ffn_input/all"]["cosine_min"] > 0.99


def _ngrams(text: str, n: int = 13) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def _check_split_is_document_disjoint(saved: dict, work: Path) -> None:
    """No held-out or validation file feeds any training (parent or arm), checked on names and on the text."""
    parts = saved["corpus"]["parts"]
    trained = set(parts["pretrain"]["file_names"]) | set(parts["continue"]["file_names"])
    for part in ("heldout", "valid"):
        assert parts[part]["files"] > 0 and set(parts[part]["file_names"]).isdisjoint(trained), part
    assert set(parts["heldout"]["file_names"]).isdisjoint(parts["valid"]["file_names"])
    corpus = work / "corpus"
    assert saved["parent"]["train_data"] == "<work>/corpus/pretrain"  # no local path in the published JSON
    for run in saved["runs"] + saved.get("sweep_runs", []):
        assert run["train_data"] == "<work>/corpus/continue", run["arm"]
    for part in ("pretrain", "continue", "heldout", "valid"):
        assert [p.name for p in (corpus / part).iterdir()] == [f"{part}.txt"]
    # the 13-word overlap, measured here on the files as written: none of the held-out text is in training text
    train = "".join((corpus / p / f"{p}.txt").read_text() for p in ("pretrain", "continue"))
    train_grams = _ngrams(train)
    for part in ("heldout", "valid"):
        text = (corpus / part / f"{part}.txt").read_text()
        assert _ngrams(text) and not _ngrams(text) & train_grams, part
        # paragraphs of 8 words or more: none equal to a training paragraph (shorter ones are markup, left alone)
        paragraphs = {" ".join(p.split()) for p in text.split("\n\n") if len(re.findall(r"\w+", p)) >= 8}
        assert paragraphs and paragraphs.isdisjoint(" ".join(p.split()) for p in train.split("\n\n")), part
    overlap = saved["corpus"]["overlap"]
    assert overlap["after"]["heldout"]["ngram13_share"] == 0 and overlap["after"]["valid"]["ngram13_share"] == 0
    assert overlap["after"]["heldout"]["verbatim_paragraphs"] == 0
    # the stdlib's boilerplate (licence headers, test scaffolding) is shared across files: there was some to remove
    assert overlap["dropped_paragraphs"] > 0 and overlap["before"]["heldout"]["ngram13_words"] >= 0


@pytest.mark.slow
def test_upcycle_vs_dense_smoke(tmp_path):
    study = _load("upcycle_vs_dense")
    work = tmp_path / "work"
    args = ["--preset", "smoke", "--work", str(work), "--results", str(tmp_path / "r.json")]
    args += ["--text-cache", str(USER_CACHE / "realtext" / "debian")]
    try:
        record = study.main(args)
    except study.TextUnavailable as exc:
        pytest.skip(f"Debian text not available: {exc}")
    text = (tmp_path / "r.json").read_text()
    assert str(work.resolve()) not in text and f"{Path.home()}/" not in text  # no local path: <work>/..., ~/...
    saved = json.loads(text)
    assert saved["complete"] and saved["summary"] == json.loads(json.dumps(record["summary"]))
    assert sorted(r["arm"] for r in saved["runs"]) == sorted(study.ARMS)
    _check_split_is_document_disjoint(saved, work.resolve())
    preset, fpt, active = saved["preset"], saved["flops_per_token"], saved["active_params"]
    sources = set(saved["corpus"]["heldout_by_source"])
    assert sources and sources <= {"python-stdlib", "python-stdlib/test", "fortunes", "jargon-text"}
    for run in saved["runs"]:
        losses = [e["eval_loss"] for e in run["evals"]]
        assert run["evals"][0]["tokens"] == 0 and len(losses) == 1 + 2  # start + the preset's 2 evals
        assert all(math.isfinite(x) and 0 < x < math.log(preset["vocab"]) + 2 for x in losses)
        assert run["tokens_per_s"] > 0 and run["flops"] == run["tokens"] * fpt[run["arm"]]
        assert set(run["heldout_by_source"]) == sources
        assert all(math.isfinite(v["start"]) and math.isfinite(v["final"]) for v in run["heldout_by_source"].values())
        final = Path(run["final"].replace("<work>", str(work.resolve())))  # kept, with its last checkpoint, hashed
        assert (final / "config.json").is_file() and (final.parent / "checkpoints").is_dir()
        assert (
            run["kept"]["final_sha256"]["model.safetensors"]
            == hashlib.sha256((final / "model.safetensors").read_bytes()).hexdigest()
        )
        # FLOPs per token: 6 · N_active + 12 · L · d · S
        assert fpt[run["arm"]] == 6 * active[run["arm"]] + 12 * preset["layers"] * preset["hidden"] * preset["seq_len"]
    runs = {r["arm"]: r for r in saved["runs"]}
    assert all(runs[a]["tokens"] == preset["arm_tokens"] for a in study.ARMS if a != "moe-all-flop")
    # the dense arms are plain Llamas, trained by `upcycle train` itself (no one-expert MoE stand-in)
    for arm in study.ARMS:
        final = Path(runs[arm]["final"].replace("<work>", str(work.resolve())))
        config = json.loads((final / "config.json").read_text())
        dense = arm in ("dense", "dense-nowarm", "dense-wide")
        assert (config["architectures"] == ["LlamaForCausalLM"]) == dense, arm
    assert runs["dense"]["train_data"] == runs["moe-all"]["train_data"]
    # the same-FLOP MoE: its own schedule, ending within one step of dense's FLOPs
    flop = runs["moe-all-flop"]
    block = preset["seq_len"] * preset["micro_batch"]
    assert flop["tokens"] < preset["arm_tokens"] and flop["steps"] * block == flop["tokens"]
    assert 0 <= runs["dense"]["flops"] - flop["flops"] < block * fpt["moe-all-flop"]
    assert "6 · N_active + 12 · L · d · S" in saved["flops_formula"]
    # learning rates: one for all without --lr-sweep; dense-nowarm continues at the parent's final lr, no warmup
    nowarm = runs.pop("dense-nowarm")
    assert nowarm["lr"] == pytest.approx(0.1 * preset["parent_lr"]) and nowarm["warmup_steps"] == 0
    assert all(r["lr"] == preset["arm_lr"] and r["warmup_steps"] >= 1 for r in runs.values())
    runs["dense-nowarm"] = nowarm
    start = {a: r["evals"][0]["eval_loss"] for a, r in runs.items()}
    # the dense arms start where the parent's pretraining ended (same weights, same held-out blocks), and so do the
    # Net2Net-widened dense model and the clone-upcycled MoEs (all function-preserving); Drop-Upcycling
    # re-initialises half of each FFN, so it does not
    assert start["dense"] == pytest.approx(saved["parent"]["evals"][-1]["eval_loss"], abs=1e-4)
    for arm in ("dense-nowarm", "dense-wide", "moe-all", "moe-all-flop", "moe-every2"):
        assert start[arm] == pytest.approx(start["dense"], abs=1e-4), arm
    assert abs(start["drop-r0.5"] - start["dense"]) > 1e-3
    assert active["moe-all"] > active["moe-every2"] > active["dense"] == active["dense-nowarm"]
    # the widened dense control has the MoE's active parameters, to the 8 neurons per layer it is rounded to
    wide = saved["net2net"]
    assert abs(active["dense-wide"] - active["moe-all"]) <= 4 * 3 * preset["hidden"] * preset["layers"]
    assert wide["intermediate"] > preset["intermediate"] and wide["max_abs_logit_diff"] < 1e-4
    summary = saved["summary"]
    assert all(math.isfinite(summary[a]["ppl_mean"]) for a in study.ARMS)
    assert "vs_dense_pct_mean" in summary["moe-all"] and "vs_dense_pct_mean" not in summary["dense"]
    assert "vs_dense_wide_pct_mean" in summary["moe-all"] and set(summary["moe-all"]["by_source"]) == sources
    assert saved["data_tokens"]["continue"] >= preset["arm_tokens"]  # no arm repeats its text
    assert saved["parent"]["tokens"] == preset["parent_tokens"]
    for part, row in saved["corpus"]["parts"].items():
        assert row["sha256"] == hashlib.sha256((work / "corpus" / part / f"{part}.txt").read_bytes()).hexdigest()
    assert saved["corpus"]["packages"]["fortunes"]["version"]  # the Debian package's version, from its .deb
    # the right-hand panel: each arm against dense at the same tokens, paired by seed, from the first eval on
    paired = zip(runs["moe-all"]["evals"], runs["dense"]["evals"], strict=True)
    expected = {e["tokens"]: 100 * (math.exp(e["eval_loss"] - d["eval_loss"]) - 1) for e, d in paired if e["tokens"]}
    got = study.vs_dense(saved, "moe-all", "tokens")
    assert sorted(got) == sorted(expected) and all(got[x] == [pytest.approx(v)] for x, v in expected.items())
    pngs = [tmp_path / "r_tokens.png", tmp_path / "r_flops.png"]
    for png in pngs:
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000
    _smoke_more_with_sweep(study, tmp_path, args, saved)
    _killed_run_resumes(study, tmp_path, work.resolve(), saved)
    _carried_corpus_and_merge(study, tmp_path, args, saved)


def _carried_corpus_and_merge(study, tmp_path: Path, args: list[str], saved: dict) -> None:
    """The GPU preset's way (issue 25): the split exported as token ids (--export-corpus) and trained on where the
    text's sources are not (--corpus) gives the same tokens, the same parent (bitwise) and the same runs as the
    text; runs of two arms each are merged into one record (--merge), and parts of different parents are refused."""
    carried = tmp_path / "carried"
    info = study.main([*args[:4], "--export-corpus", str(carried), *args[-2:]])
    files = info["carried"]["files"]
    assert files["pretrain/pretrain.parquet"]["tokens"] == saved["data_tokens"]["pretrain"]
    assert files["continue/continue.parquet"]["tokens"] == saved["data_tokens"]["continue"]
    assert (carried / "tokenizer" / "tokenizer.json").is_file() and not (carried / "pretrain" / "pretrain.txt").exists()
    assert {
        f"heldout-by-source/{Path(r['path']).stem}.parquet" for r in saved["corpus"]["heldout_by_source"].values()
    } < set(files)
    work = tmp_path / "work-carried"
    part = ["--preset", "smoke", "--corpus", str(carried), "--work", str(work)]
    one = study.main([*part, "--arms", "dense,moe-all", "--results", str(tmp_path / "p1.json")])
    two = study.main([*part, "--arms", "dense,dense-wide", "--results", str(tmp_path / "p2.json")])
    assert one["parent"]["sha256"] == two["parent"]["sha256"] == saved["parent"]["sha256"]
    assert one["data_tokens"] == saved["data_tokens"] and one["corpus"]["parts"] == saved["corpus"]["parts"]
    text_runs = {r["arm"]: r for r in saved["runs"]}
    for arm in ("dense", "moe-all"):  # the same run as on the text, to the bit
        run = next(r for r in one["runs"] if r["arm"] == arm)
        assert (
            run["evals"] == text_runs[arm]["evals"] and run["heldout_by_source"] == text_runs[arm]["heldout_by_source"]
        )
    merged = study.main(
        ["--merge", str(tmp_path / "p1.json"), str(tmp_path / "p2.json"), "--results", str(tmp_path / "m.json")]
    )
    assert sorted(r["arm"] for r in merged["runs"]) == ["dense", "dense-wide", "moe-all"]  # dense once
    assert merged["merged_from"] == ["p1.json", "p2.json"] and json.loads((tmp_path / "m.json").read_text())["complete"]
    assert merged["summary"]["moe-all"]["vs_dense_pct_mean"] == pytest.approx(
        100 * (merged["summary"]["moe-all"]["ppl_mean"] / merged["summary"]["dense"]["ppl_mean"] - 1)
    )
    assert "vs_dense_wide_pct_mean" in merged["summary"]["moe-all"] and (tmp_path / "m_tokens.png").is_file()
    _gpu_study_script(carried, tmp_path, one)
    other = json.loads((tmp_path / "p2.json").read_text())
    other["parent"]["sha256"] = "0" * 64
    (tmp_path / "p3.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="different parents"):
        study.main(
            ["--merge", str(tmp_path / "p1.json"), str(tmp_path / "p3.json"), "--results", str(tmp_path / "x.json")]
        )
    (carried / "continue" / "continue.parquet").write_bytes(b"changed")
    with pytest.raises(SystemExit, match="changed since it was exported"):
        study.main([*part, "--results", str(tmp_path / "p4.json")])


def _killed_run_resumes(study, tmp_path: Path, work: Path, saved: dict) -> None:
    """A run killed after a checkpoint continues from it on the next call (upcycle train's exact resume), so a
    long run (the parent, hours at --parent-scale 2) loses at most one eval interval; another job starts afresh."""
    import shutil

    from upcycle.train.checkpoint import checkpoints

    corpus = work / "corpus"
    job = {"arm": "dense", "seed": 0, "model": str(work / "parent"), "run_dir": str(tmp_path / "resume" / "dense-s0"),
           "train": str(corpus / "continue"), "eval": str(corpus / "heldout"), "tokens": 2048, "lr": 1e-3,
           "warmup": None, "evals": 2, "aux": 0.0, "z": 0.0, "eval_at_start": False,
           "preset": saved["preset"]}  # fmt: skip
    full = study.train_run(job)
    run_dir = Path(job["run_dir"])
    assert full["steps"] == 8 and [s for s, _ in checkpoints(run_dir)] == [4, 8] and not full["resumed_from_step"]
    shutil.rmtree(run_dir / "final")  # as if killed after step 4's checkpoint
    shutil.rmtree(run_dir / "checkpoints" / "step-8")
    again = study.train_run(job)
    assert again["resumed_from_step"] == 4 and Path(again["final"]).is_dir()
    assert [e["tokens"] for e in again["evals"]] == [e["tokens"] for e in full["evals"]] == [1024, 2048]
    assert again["evals"][-1]["eval_loss"] == pytest.approx(full["evals"][-1]["eval_loss"], rel=1e-6)
    assert len(full["part_s"]) == 1 and len(again["part_s"]) == 2  # the training time of each process
    other = study.train_run(dict(job, lr=3e-4))  # a different job: trained from the start, not resumed
    assert not other["resumed_from_step"] and other["evals"][-1]["eval_loss"] != full["evals"][-1]["eval_loss"]
    # the parent saves more often than it evaluates (job["saves"]): a kill loses 1/saves of the run, not 1/evals
    often = dict(job, run_dir=str(tmp_path / "resume" / "often-s0"), saves=4)
    first = study.train_run(often)
    often_dir = Path(often["run_dir"])
    assert [s for s, _ in checkpoints(often_dir)] == [6, 8]  # saved at 2, 4, 6, 8; the last two kept
    assert first["evals"] == full["evals"]  # the same run: saving does not change it
    shutil.rmtree(often_dir / "final")
    shutil.rmtree(often_dir / "checkpoints" / "step-8")
    assert study.train_run(often)["resumed_from_step"] == 6
    assert study.PARENT_SAVES >= 8 * 4  # the parent's 4 evals: a checkpoint at least 8 times as often


def _smoke_more_with_sweep(study, tmp_path: Path, args: list[str], saved: dict) -> None:
    """A preset with a `base` (as cpu-long has cpu) reuses the base's corpus, tokenizer and parent; --lr-sweep
    picks each arm's learning rate on the validation part; a second identical call reuses every finished run."""
    study.PRESETS["smoke-more"] = study.replace(study.PRESETS["smoke"], arm_tokens=4096, seeds=(1,), base="smoke")
    keep = tmp_path / "kept"
    more_args = ["--preset", "smoke-more", "--work", str(tmp_path / "work"), "--results", str(tmp_path / "m.json")]
    more_args += [*args[-2:], "--arms", "dense,moe-all-flop", "--lr-sweep", "--keep-checkpoints", str(keep)]
    try:
        more = study.main(more_args)
        again = study.main(more_args)
        other_jobs = study.main([*more_args, "--jobs", "2"])  # what runs at a time does not change a run
        # another --arm-tokens trains in a folder of its own: the kept runs of the preset's length stay
        shorter = study.main(
            [*more_args, "--arms", "dense", "--arm-tokens", "2048", "--results", str(tmp_path / "s.json")]
        )
        after = study.main(more_args)
    finally:
        del study.PRESETS["smoke-more"]
    assert more["parent"] == saved["parent"] and more["corpus"] == saved["corpus"]
    sweep = more["lr_sweep"]
    assert sweep["judged_on"] == "valid" and sweep["tokens"] == 4096 and sorted(sweep["arms"]) == ["dense", "moe-all"]
    assert sweep["lrs"] == [1e-4, 3e-4, 1e-3]
    for arm, row in sweep["arms"].items():
        ppl = {r["lr"]: math.exp(sum(e["eval_loss"] for e in r["evals"][-2:]) / 2)
               for r in more["sweep_runs"] if r["arm"] == arm}  # fmt: skip
        grid = {lr: v for lr, v in ppl.items() if lr in sweep["lrs"]}
        best = min(grid, key=grid.get)  # on the grid; an edge best gets one step more beyond that edge
        step = {1e-4: 3e-5, 1e-3: 3e-3}.get(best)
        assert sorted(ppl) == sorted([*sweep["lrs"], *([step] if step else [])]), arm
        assert row["extended_to"] == step and row["best_lr"] == min(ppl, key=ppl.get)
        assert row["at_edge"] == (row["best_lr"] in (min(ppl), max(ppl)))
        assert all(r["eval_data"].endswith("valid") for r in more["sweep_runs"])
    runs = {r["arm"]: r for r in more["runs"]}
    assert sorted((a, r["seed"]) for a, r in runs.items()) == [("dense", 1), ("moe-all-flop", 1)]
    assert runs["dense"]["lr"] == sweep["arms"]["dense"]["best_lr"]
    assert runs["moe-all-flop"]["lr"] == sweep["arms"]["moe-all"]["best_lr"]  # the every-layer MoE's best
    assert runs["dense"]["tokens"] == 4096 and runs["dense"]["eval_data"].endswith("heldout")
    assert (keep / "smoke-more" / "smoke-more" / "dense-s1" / "model.safetensors").is_file()
    start = runs["dense"]["evals"][0]["eval_loss"]
    assert start == pytest.approx(saved["parent"]["evals"][-1]["eval_loss"], abs=1e-4)
    assert all(r["reused"] for r in again["runs"] + again["sweep_runs"] + other_jobs["runs"] + other_jobs["sweep_runs"])
    assert again["summary"] == more["summary"] and again["lr_sweep"] == more["lr_sweep"]
    runs_root = tmp_path / "work" / "runs"
    assert [r["tokens"] for r in shorter["runs"]] == [2048] and not shorter["runs"][0]["reused"]
    for folder, tokens in (("smoke-more-2048", 2048), ("smoke-more", 4096)):
        assert json.loads((runs_root / folder / "dense-s1" / "study_run.json").read_text())["job"]["tokens"] == tokens
    assert all(r["reused"] for r in after["runs"]) and after["summary"] == more["summary"]


def _gpu_study_script(carried: Path, tmp_path: Path, one: dict) -> None:
    """benchmarks/gpu/study.sh as the GPU machine runs it, at the smoke preset on this CPU (so that it cannot rot
    between the rare GPU loans): a copy of the repository with the carried corpus in .gpu-study/, the project
    installed by install.sh into a private folder, its JSON, PNGs and log in OUT; the same runs, to the bit, as
    the study run in this process on the same corpus."""
    import shutil
    import subprocess

    repo = tmp_path / "gpu-repo"  # what the device tool carries: the tracked tree, and .gpu-study beside it
    for part in ("upcycle", "cli", "benchmarks"):  # less benchmarks' recorded results, not needed there
        skip = ("__pycache__", "*.egg-info", *(("results", "_work", ".venv-mergekit") if part == "benchmarks" else ()))
        shutil.copytree(ROOT / part, repo / part, ignore=shutil.ignore_patterns(*skip))
    for part in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / part, repo / part)
    shutil.copytree(carried, repo / ".gpu-study")
    out = tmp_path / "gpu-out"
    env = os.environ | {
        "UPCYCLE_STUDY_PRESET": "smoke",
        "UPCYCLE_STUDY_CACHE": str(tmp_path / "gpu-cache"),
        "UPCYCLE_GPU_SITE": str(tmp_path / "gpu-site"),
        "PYTHON": sys.executable,
    }
    cmd = ["bash", str(repo / "benchmarks" / "gpu" / "study.sh"), str(out), "dense,moe-all", "0"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "gpu-site" / "upcycle" / "__init__.py").is_file()  # trained by the installed copy
    record = json.loads((out / "upcycle_vs_dense_smoke_dense-moe-all_s0.json").read_text())
    assert record["complete"] and record["parent"]["sha256"] == one["parent"]["sha256"]
    assert sorted(r["arm"] for r in record["runs"]) == ["dense", "moe-all"]
    for run in record["runs"]:
        same = next(r for r in one["runs"] if r["arm"] == run["arm"])
        assert run["evals"] == same["evals"] and run["heldout_by_source"] == same["heldout_by_source"]
    assert "done runs moe-all" in (out / "study.log").read_text()
    assert all(png.read_bytes()[:8] == PNG_MAGIC for png in out.glob("*.png")) and len(list(out.glob("*.png"))) == 2
    # a machine without the carried corpus: one error line, exit 2, nothing run
    shutil.rmtree(repo / ".gpu-study")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert done.returncode == 2 and done.stderr.startswith("error: .gpu-study/ is missing")


def test_upcycle_vs_dense_presets_and_stale_work(tmp_path, monkeypatch):
    study = _load("upcycle_vs_dense")
    for name, preset in study.PRESETS.items():  # a based preset differs from its base only in what the arms read
        assert study.base_mismatch(name) == [], name
        assert preset.base is None or study.PRESETS[preset.base].base is None
    cpu = study.PRESETS["cpu"]
    assert cpu.parent_tokens >= 10 * 1_100_000  # >= 10 tokens per parameter for the ~1.1M-parameter parent
    assert (cpu.continue_tokens or 0) >= study.PRESETS["cpu-long"].arm_tokens >= cpu.arm_tokens
    long = study.PRESETS["cpu-long"]
    assert cpu.sweep_tokens < cpu.arm_tokens and long.sweep_tokens < long.arm_tokens  # sweeps at a smaller budget
    assert long.sweep_tokens == cpu.sweep_tokens  # so cpu-long reuses cpu's sweep runs (same job keys)
    assert 1e-4 in cpu.sweep_lrs and min(cpu.sweep_lrs) < 1e-4 < max(cpu.sweep_lrs)  # the optimum found inside
    # cpu runs what issue 25 asks for by default: the sweep, both dense arms, the widened dense, the MoE at equal
    # tokens and at equal FLOPs; cpu-long every arm
    assert cpu.lr_sweep and long.lr_sweep and long.arms is None
    assert set(cpu.arms) == {"dense", "dense-nowarm", "dense-wide", "moe-all", "moe-all-flop"} <= set(study.ARMS)
    # --parent-scale 2: 4x the non-embedding parameters, as many tokens per parameter; the count is the model's
    from transformers import LlamaConfig, LlamaForCausalLM

    big = study.scaled(cpu, 2)
    for preset in (cpu, big):
        cfg = LlamaConfig(vocab_size=preset.vocab, hidden_size=preset.hidden, intermediate_size=preset.intermediate,
                          num_hidden_layers=preset.layers, num_attention_heads=preset.heads,
                          num_key_value_heads=preset.kv_heads, tie_word_embeddings=True)  # fmt: skip
        with torch.device("meta"):
            assert study.dense_params(preset) == sum(p.numel() for p in LlamaForCausalLM(cfg).parameters())
    outside = {p: study.dense_params(p) - p.vocab * p.hidden for p in (cpu, big)}
    assert outside[big] / outside[cpu] == pytest.approx(4, rel=0.01)
    per_param = [p.parent_tokens / study.dense_params(p) for p in (cpu, big)]
    assert per_param[1] == pytest.approx(per_param[0], rel=1e-6)
    # the work folder (every run's model and checkpoint) lives in the user cache, never in the repository
    assert study.default_work("cpu") == Path(os.environ["UPCYCLE_CACHE"]) / "studies" / "upcycle_vs_dense" / "cpu"
    monkeypatch.delenv("UPCYCLE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert study.default_work("cpu") == tmp_path / "xdg" / "upcycle" / "studies" / "upcycle_vs_dense" / "cpu"
    monkeypatch.undo()
    for bad in (["--parent-scale", "0"], ["--arms", "dense,nope"]):
        with pytest.raises(SystemExit) as exc:
            study.main(["--preset", "smoke", "--work", str(tmp_path / "w2"), *bad])
        assert exc.value.code == 2 and not (tmp_path / "w2").exists()
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
    steps = ["env", "pytest", "e2e", "throughput", "compile", "profile", "loops"]
    assert [k for k in summary if k != "total_s"] == steps
    assert all(summary[k]["ok"] for k in steps)
    assert summary["pytest"]["passed"] == 0 and summary["pytest"]["skipped"] >= 10  # no GPU: all skip
    e2e = summary["e2e"]
    assert e2e["lm_last3"] < e2e["lm_first3"] - 0.3 and e2e["final"]["class"] == "MixtralForCausalLM"
    assert not e2e["final"]["missing"] and not e2e["final"]["unexpected"] and e2e["final"]["logits_finite"]
    for step in ("throughput", "compile", "profile"):
        rows = summary[step]["rows"]
        pairs = [rows[i : i + 2] for i in range(0, len(rows), 2)]  # (parent, MoE) per LM loss
        models = ["dense", "moe 8x top-2"] + (
            ["dense (chunked loss)", "moe 8x top-2 (chunked loss)"] * (step == "throughput")
        )
        assert [r["model"] for r in rows] == models
        assert [r["lm_loss"] for r in rows] == ["model"] * 2 + ["chunked"] * (len(rows) - 2)
        assert all(r["tokens_per_s"] > 0 and r["peak_mib"] > 0 for r in rows)
        assert all(m["vs_dense"] == pytest.approx(m["tokens_per_s"] / d["tokens_per_s"]) for d, m in pairs)
    assert all(r["compile"] and r["graph_breaks"] == 0 for r in summary["compile"]["rows"])  # hooks traced too
    assert {r["compile_backend"] for r in summary["compile"]["rows"]} == {"aot_eager"}  # inductor: on the GPU
    dense, moe = (r["profile"] for r in summary["profile"]["rows"])
    for prof in (dense, moe):  # one profiled step: its phases, and CPU time by op category
        assert list(prof["phases_ms"]) == ["forward", "losses", "backward", "clip", "optimizer"]
        assert prof["step_ms"] == pytest.approx(sum(prof["phases_ms"].values()))
        assert prof["categories_ms"]["matmul"] > 0 and prof["top_ops"][0]["self_ms"] > 0
    assert (
        dense["categories_ms"].get("routing (top-k, sort, gather, scatter)", 0)
        < moe["categories_ms"]["routing (top-k, sort, gather, scatter)"]
    )  # the MoE's token permutation
    assert "ms: forward" in done.stdout  # the summary's profile line
    loops = {r["contender"]: r for r in summary["loops"]["rows"]}  # upcycle train, the Trainer, a hand loop
    assert sorted(loops) == ["hand", "trainer", "upcycle"] and loops["trainer"]["vs_trainer"] == 1.0
    assert all(r["tokens_per_s"] > 0 for r in loops.values())
    assert loops["upcycle"]["vs_trainer"] == pytest.approx(
        loops["upcycle"]["tokens_per_s"] / loops["trainer"]["tokens_per_s"]
    )
    assert (out / "e2e.log").is_file() and (out / "pytest.xml").is_file()


def test_methods_bench_speed_rows_compare_each_code_with_its_own_clone():
    """--speed --baseline: a NAME@base row's ratios are to clone@base of the same round, a NAME row's to clone;
    the baseline's code goes first on the children's PYTHONPATH."""
    bench = _load("methods_bench")
    runs = {
        "clone": [{"round": 1, "convert_s": 10.0}, {"round": 2, "convert_s": 20.0}],
        "clone@base": [{"round": 1, "convert_s": 5.0}, {"round": 2, "convert_s": 8.0}],
        "drop-r0.5": [{"round": 1, "convert_s": 15.0}, {"round": 2, "convert_s": 20.0}],
        "drop-r0.5@base": [{"round": 1, "convert_s": 10.0}, {"round": 2, "convert_s": 24.0}],
    }
    rows = {r["method"]: r for r in bench.speed_rows(list(runs), runs)}
    assert rows["drop-r0.5"]["ratio_to_clone_same_round"] == [1.5, 1.0]
    assert rows["drop-r0.5@base"]["ratio_to_clone_same_round"] == [2.0, 3.0]
    assert rows["drop-r0.5@base"]["median_ratio_to_clone"] == 2.5 and rows["drop-r0.5"]["median"]["convert_s"] == 17.5
    assert rows["drop-r0.5@base"]["flags"] == rows["drop-r0.5"]["flags"]
    assert bench.code_env(None) is None
    assert bench.code_env(Path("/x/base"))["PYTHONPATH"].split(os.pathsep)[0] == "/x/base"


def test_rng_bench_writes_every_contender(tmp_path):
    """rng_bench.py at a tiny size: one row per contender, the reference first, a time per round."""
    import subprocess

    out = tmp_path / "rng.json"

    cmd = [sys.executable, str(ROOT / "benchmarks" / "rng_bench.py"), "--values", "4096", "--rounds", "2"]
    subprocess.run([*cmd, "--json", str(out)], check=True, capture_output=True)
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 10 and rows[0]["speedup_vs_torch"] == 1.0
    assert all(len(r["seconds"]) == 2 and r["mvalues_per_s"] > 0 for r in rows)


def _pool(submit):
    """A stand-in for the study's ProcessPoolExecutor class: each submitted job goes to SUBMIT(job) at once, in this
    process, and what it returns is the job's future."""

    class Pool:
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def submit(self, fn, job):
            return submit(job)

    return Pool


class _Done:
    """A finished future holding VALUE."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


def test_study_runner_hands_out_the_longest_runs_first(tmp_path, monkeypatch):
    """The study's Runner submits its runs longest first (tokens x FLOPs per token; given order among equals), so
    that 2 workers end close together (cpu-long's last run once ran alone for ~9 minutes)."""
    study = _load("upcycle_vs_dense")
    submitted: list[str] = []

    def record(job):  # records the submission order; runs nothing
        submitted.append(f"{job['arm']}-{job['seed']}")
        return job["arm"]

    monkeypatch.setattr(study, "ProcessPoolExecutor", _pool(record))
    monkeypatch.setattr(study, "as_completed", lambda futures: [])
    fpt = {"dense": 8, "moe-all": 10, "moe-every2": 9}
    runner = study.Runner(study.PRESETS["smoke"], {"flops_per_token": fpt}, tmp_path / "r.json", False, "smoke", 0.0)
    jobs = [
        {"arm": arm, "seed": seed, "tokens": tokens, "run_dir": str(tmp_path / f"{arm}-{seed}")}
        for seed in (0, 1)
        for arm, tokens in (("dense", 100), ("moe-all", 100), ("moe-all-flop", 70), ("moe-every2", 100))
    ]
    fpt["moe-all-flop"] = 10
    runner.run(jobs, "runs")
    assert submitted == ["moe-all-0", "moe-all-1", "moe-every2-0", "moe-every2-1", "dense-0", "dense-1",
                         "moe-all-flop-0", "moe-all-flop-1"]  # fmt: skip


def test_study_keep_checkpoints_path_sets_aside_another_jobs_copy(tmp_path):
    """--keep-checkpoints PATH copies final/ to PATH/<preset>/<parent>/<run name>; two jobs of one run name (another
    lr) no longer replace each other's copy there: the other job's copy is set aside (RUN@<digest>), the job's own
    is refreshed, and a copy is whole or absent (made beside, renamed into place)."""
    study = _load("upcycle_vs_dense")
    finals = {}
    for lr in (1, 2):
        finals[lr] = tmp_path / f"run-lr{lr}" / "final"
        finals[lr].mkdir(parents=True)
        (finals[lr] / "model.safetensors").write_bytes(f"lr {lr}".encode())
    key = {lr: {"arm": "dense", "seed": 0, "lr": lr} for lr in (1, 2)}
    dest = tmp_path / "kept" / "smoke" / "parent" / "dense-0"

    def held(folder: Path) -> bytes:
        return (folder / "model.safetensors").read_bytes()

    study.keep_copy(finals[1], dest, key[1])
    assert held(dest) == b"lr 1" and json.loads(study._stamp(dest).read_text()) == key[1]
    study.keep_copy(finals[2], dest, key[2])  # another job, the same run name
    assert held(dest) == b"lr 2" and held(study.aside_name(dest, key[1])) == b"lr 1"
    assert json.loads(study._stamp(study.aside_name(dest, key[1])).read_text()) == key[1]
    (finals[1] / "model.safetensors").write_bytes(b"lr 1, again")
    study.keep_copy(finals[1], dest, key[1])  # the first job again: its own aside copy is replaced, not kept twice
    assert held(dest) == b"lr 1, again" and held(study.aside_name(dest, key[2])) == b"lr 2"
    assert not study.aside_name(dest, key[1]).exists()
    names = sorted(p.name for p in dest.parent.iterdir())
    digest = study.aside_name(dest, key[2]).name
    assert names == sorted(["dense-0", "dense-0.job.json", digest, digest + ".job.json"])


def test_study_runner_sets_aside_another_jobs_run_and_moves_its_own_back(tmp_path, monkeypatch):
    """Two jobs that share a run folder (the same arm and seed under another learning rate, say) no longer replace
    each other's final/: the other job's run is set aside beside it, finished or not, and a job's own run set aside
    earlier is moved back, reused if finished, left to resume if not. Only jobs with no run of their own train."""
    study = _load("upcycle_vs_dense")
    trained: list[float] = []

    def fake_train(job):  # what train_run leaves behind: its stamp, final/ with the job's own bytes, a result
        run_dir = Path(job["run_dir"])
        study._stamp(run_dir).write_text(json.dumps(study._job_key(job)))
        (run_dir / "final").mkdir(parents=True, exist_ok=True)
        (run_dir / "final" / "model.safetensors").write_bytes(f"lr {job['lr']}".encode())
        trained.append(job["lr"])
        evals = [{"tokens": 0, "eval_loss": 3.0}, {"tokens": 64, "eval_loss": 2.0 + job["lr"]}]
        return {"arm": job["arm"], "seed": job["seed"], "lr": job["lr"], "tokens": 64, "evals": evals,
                "final": str(run_dir / "final"), "wall_s": 1.0}  # fmt: skip

    monkeypatch.setattr(study, "ProcessPoolExecutor", _pool(lambda job: _Done(fake_train(job))))  # in this process
    monkeypatch.setattr(study, "as_completed", lambda futures: list(futures))
    record = {"flops_per_token": {"dense": 8}, "runs": []}
    runner = study.Runner(study.PRESETS["smoke"], record, tmp_path / "r.json", False, "smoke", 0.0)
    run_dir = tmp_path / "runs" / "dense-0"
    preset = study.asdict(study.PRESETS["smoke"])

    def job(lr: float) -> dict:
        return {"arm": "dense", "seed": 0, "tokens": 64, "lr": lr, "run_dir": str(run_dir), "preset": preset}

    def kept_bytes() -> bytes:
        return (run_dir / "final" / "model.safetensors").read_bytes()

    runner.run([job(1e-3)], "sweep_runs")
    runner.run([job(2e-3)], "sweep_runs")  # another job in the same folder: the first run is set aside
    assert trained == [1e-3, 2e-3] and kept_bytes() == b"lr 0.002"
    first = study.aside_name(run_dir, study._job_key(job(1e-3)))
    assert (first / "final" / "model.safetensors").read_bytes() == b"lr 0.001"

    runner.run([job(1e-3)], "sweep_runs")  # back to the first job: its run is moved back and reused, not retrained
    runner.run([job(2e-3)], "sweep_runs")
    assert trained == [1e-3, 2e-3] and kept_bytes() == b"lr 0.002"
    assert [r["reused"] for r in runner.record["sweep_runs"]] == [False, False, True, True]
    assert [study.final_ppl(r) for r in runner.record["sweep_runs"]] == pytest.approx(
        [math.exp(2.001), math.exp(2.002)] * 2
    )
    # the second job's run went aside and came back; the first's is aside again
    assert sorted(p.name for p in run_dir.parent.iterdir()) == sorted([run_dir.name, first.name, "dense-0.job.json"])

    # a killed run of a third job (its stamp and a checkpoint, no study_run.json) is set aside unfinished, and
    # moved back for that job to resume
    third = job(4e-3)
    holder = run_dir.with_name("dense-0@partial")
    run_dir.rename(holder)  # the lr 2e-3 run out of the way for the moment
    (run_dir / "checkpoints" / "step-1").mkdir(parents=True)
    study._stamp(run_dir).write_text(json.dumps(study._job_key(third)))
    assert study.reusable_run(job(1e-3))["job"] == study._job_key(job(1e-3))  # moved back from aside
    unfinished = study.aside_name(run_dir, study._job_key(third), finished=False)
    assert (unfinished / "checkpoints" / "step-1").is_dir()
    assert study.reusable_run(third) is None  # not finished: left to resume, in its own folder again
    assert (run_dir / "checkpoints" / "step-1").is_dir() and not unfinished.exists()
    assert json.loads(study._stamp(run_dir).read_text()) == study._job_key(third)
    assert (study.aside_name(run_dir, study._job_key(job(1e-3))) / "final").is_dir()  # the finished one aside again


def test_train_throughput_rounds_alternate_and_give_medians(tmp_path, monkeypatch, capsys):
    """--rounds 2: the parent and its MoE run parent, MoE, parent, MoE; each MoE row's ratios are to the parent of
    its round, × the FLOP ceiling is × dense over the parent's FLOPs per token over the MoE's; medians per model.
    The children's measurements are stand-ins (a child really runs in the GPU check's dry mode above): this is the
    arithmetic and the order over the real models' configs."""
    bench = _load("train_throughput")
    rates = iter([400.0, 200.0, 500.0, 300.0])  # parent, MoE, parent, MoE
    jobs: list[tuple[str, str]] = []

    def child(job):
        jobs.append((job["impl"], job["name"]))
        tps = next(rates)
        return {"tokens_per_s": tps, "tokens_per_step": 512, "params": 1, "peak_mib": 1.0, "experts_impl": job["impl"]}

    monkeypatch.setattr(bench, "run_child", child)
    monkeypatch.setattr(bench, "peak_for", lambda *a: (1.0, "stand-in"))
    out = tmp_path / "r.json"
    args = ["--sizes", "tiny", "--impls", "grouped_mm", "--rounds", "2", "--work", str(tmp_path / "w")]
    assert bench.main([*args, "--results", str(out)]) == 0
    assert jobs == [("dense", "tiny"), ("grouped_mm", "tiny")] * 2
    rows = json.loads(out.read_text())["runs"]
    assert [(r["model"], r["round"]) for r in rows] == [
        ("dense", 0), ("moe 8x top-2", 0), ("dense", 1), ("moe 8x top-2", 1)
    ]  # fmt: skip
    ceiling = rows[0]["flops_per_token"] / rows[1]["flops_per_token"]
    assert 0 < ceiling < 1
    assert [r["vs_dense"] for r in rows] == [1.0, 0.5, 1.0, 0.6]
    assert [rows[1]["vs_flop_ceiling"], rows[3]["vs_flop_ceiling"]] == pytest.approx([0.5 / ceiling, 0.6 / ceiling])
    *_, line = (ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| tiny | moe 8x top-2 |"))
    assert line == f"| tiny | moe 8x top-2 | grouped_mm | 200, 300 | 250 | 0.550 | {0.55 / ceiling:.3f} |"


def test_train_throughput_fits_the_batch_to_the_memory_and_never_starts_what_cannot_fit(tmp_path, monkeypatch):
    """Without --batch each size runs at the largest of its batch, batch/2, ... whose step plan (upcycle.train.memory,
    what --dry-run prints) fits the memory for the parent and the MoE alike; a size that does not fit at batch 1 is
    recorded as a failure and no child starts for it. --batch overrides the fit."""
    bench = _load("train_throughput")
    jobs: list[tuple[str, int]] = []

    def child(job):
        jobs.append((job["impl"], job["batch"]))
        return {"tokens_per_s": 1.0, "tokens_per_step": 1, "params": 1, "peak_mib": 1.0, "experts_impl": job["impl"]}

    monkeypatch.setattr(bench, "run_child", child)
    monkeypatch.setattr(bench, "peak_for", lambda *a: (1.0, "stand-in"))
    work = tmp_path / "w"
    size = bench.SIZES["tiny"]
    dense, moe = bench.make_models(size, work)
    configs = [json.loads((f / "config.json").read_text()) for f in (dense, moe)]

    def plan_mib(batch: int) -> float:  # the larger of the two models' step plans at this batch
        trial = bench.replace(size, batch=batch)
        return max(
            bench.estimate_mib(c, trial, "fp32", "mixed", "cpu", bench.flops_per_token(c, size.seq)[2]) for c in configs
        )

    assert plan_mib(1) < plan_mib(2) < plan_mib(4)  # the tiny size's own batch is 4
    gib = (plan_mib(2) + plan_mib(4)) / 2 / 1024  # room for batch 2, not 4
    args = ["--sizes", "tiny", "--impls", "grouped_mm", "--work", str(work)]
    out = tmp_path / "fit.json"
    assert bench.main([*args, "--fit-gib", str(gib), "--results", str(out)]) == 0
    assert jobs == [("dense", 2), ("grouped_mm", 2)]
    record = json.loads(out.read_text())
    assert record["memory_budget"]["gib"] == pytest.approx(gib) and record["failures"] == []
    assert [r["shape"]["batch"] for r in record["runs"]] == [2, 2]
    assert all(r["estimate_mib"] <= gib * 1024 for r in record["runs"])

    jobs.clear()  # no room even for one sequence: refused, nothing started
    out = tmp_path / "none.json"
    assert bench.main([*args, "--fit-gib", str(plan_mib(1) / 1024 / 2), "--results", str(out)]) == 0
    record = json.loads(out.read_text())
    assert jobs == [] and record["runs"] == []
    assert [f["size"] for f in record["failures"]] == ["tiny"] and "at batch 1" in record["failures"][0]["error"]

    # --batch is taken as asked, with no fit
    assert bench.main([*args, "--batch", "3", "--fit-gib", "0.001", "--results", str(out)]) == 0
    assert jobs == [("dense", 3), ("grouped_mm", 3)] and json.loads(out.read_text())["memory_budget"] is None

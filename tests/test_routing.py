"""`upcycle routing` on tiny MoEs written by `upcycle convert`.

The hand-routed MoE: attention writes nothing (o_proj = 0) and the experts write nothing into hidden dims 0..7
(rows of down_proj zeroed), so dims 0..7 of the residual stream stay the token's embedding in every layer. Token t's
embedding holds 3 at dim a(t) and 1 at dim 4 + b(t); the router of layer l has 4 at (σ_l(a), a) and 2 at
(σ_l(b), 4 + b). Its logits are then 12s for σ_l(a(t)), 2s for σ_l(b(t)) and 0 elsewhere (s > 0, the RMSNorm
scale), so the top-1 expert is σ_l(a(t)) and the top-2 is σ_l(b(t)): every count below is known by hand.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from upcycle.arch import targets
from upcycle.convert.pipeline import convert
from upcycle.convert.spec import build_spec
from upcycle.report.routing_stats import LIFT_MIN_OCCURRENCES, routing_stats
from upcycle.train.divergence import experts_at
from upcycle.train.load_plot import DPI, figure_size
from upcycle_cli.main import run

EXPERTS, TOP_K = 4, 2
PERMS = [lambda e: e, lambda e: e, lambda e: (e + 1) % 4, lambda e: 3 - e]  # σ_l of the four layers
TEXT = "the quick brown fox jumps over the lazy dog.\n<b>A & B</b> 'quoted', tabs\tand  spaces\n" * 6


def first(t: int) -> int:  # a(t): the dimension that decides the top-1 expert
    return t % 4


def second(t: int) -> int:  # b(t) != a(t): decides the top-2 expert
    return (first(t) + 1 + (t // 4) % 3) % 4


def hand_routes(ids: list[int], layer: int) -> list[tuple[int, int]]:
    sigma = PERMS[layer]
    return [(sigma(first(t)), sigma(second(t))) for t in ids]


@pytest.fixture(scope="session")
def hand_moe(dense_store, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("routing")
    converted = root / "converted"
    convert(str(dense_store("llama")), converted, build_spec(experts=EXPERTS, top_k=TOP_K))
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight  # (V, H)
        emb[:, :8] = 0
        for t in range(emb.shape[0]):
            emb[t, first(t)] = 3.0
            emb[t, 4 + second(t)] = 1.0
        for layer, sigma in enumerate(PERMS):
            block = model.model.layers[layer]
            block.self_attn.o_proj.weight.zero_()
            block.post_attention_layernorm.weight[:8] = 1.0
            block.mlp.experts.down_proj[:, :8, :] = 0  # (E, H, I): no expert writes into dims 0..7
            router = block.mlp.gate.weight  # (E, H)
            router.zero_()
            for a in range(4):
                router[sigma(a), a] = 4.0
                router[sigma(a), 4 + a] = 2.0
    folder = root / "hand-moe"
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(converted).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "sample.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture(scope="session")
def report(hand_moe, text_file, tmp_path_factory) -> tuple[Path, dict, str]:
    """The CLI run on the hand-routed MoE: (REPORT_DIR, routing.json, what --json - wrote on stdout)."""
    out = tmp_path_factory.mktemp("report") / "rep"
    import contextlib
    import io

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = run(
            [
                "routing",
                str(hand_moe),
                "--text",
                str(text_file),
                "--out",
                str(out),
                "--json",
                "-",
                "--seq-len",
                "40",
                "--batch-size",
                "2",
            ]
        )
    assert code == 0, stderr.getvalue()
    return out, json.loads((out / "routing.json").read_text()), stdout.getvalue(), stderr.getvalue()


def text_ids(folder: Path) -> list[int]:
    return AutoTokenizer.from_pretrained(folder)(TEXT, add_special_tokens=False).input_ids


# --- routing.json says what the hand-set routers do -------------------------------------------------------


def test_loads_and_tables_equal_hand_counts(report, hand_moe):
    _out, data, _stdout, _stderr = report
    ids = text_ids(hand_moe)
    total = len(ids)
    assert data["tokens"] == total == len(TEXT)  # the tiny tokenizer has one token per character
    assert data["model"] == "hand-moe" and data["text"] == "sample.txt"
    assert (data["experts"], data["top_k"], data["moe_layers"]) == (EXPERTS, TOP_K, [0, 1, 2, 3])
    tokenizer = AutoTokenizer.from_pretrained(hand_moe)
    occurrences = Counter(ids)
    previous = None
    for layer, figures in zip(range(4), data["layers"], strict=True):
        routes = hand_routes(ids, layer)
        counts = Counter(e for pair in routes for e in pair)
        top1 = Counter(pair[0] for pair in routes)
        loads = [counts[e] / (TOP_K * total) for e in range(EXPERTS)]
        assert figures["layer"] == layer
        for e, expert in enumerate(figures["experts"]):
            assert expert["assignments"] == counts[e]
            assert expert["load"] == loads[e]
            assert expert["top1_share"] == top1[e] / total
        mean = sum(loads) / EXPERTS
        cv = math.sqrt(sum((x - mean) ** 2 for x in loads) / EXPERTS) / mean
        assert figures["cv"] == pytest.approx(cv, rel=1e-12)
        assert figures["max_expert"] == max(range(EXPERTS), key=lambda e: (loads[e], -e))
        assert figures["min_expert"] == min(range(EXPERTS), key=lambda e: (loads[e], e))
        if previous is None:
            assert figures["consistency"] is None
        else:
            same = sum(a[0] == b[0] for a, b in zip(routes, previous, strict=True))
            assert figures["consistency"] == same / total
        previous = routes
        # token tables: each token counts for both of its experts
        for e, expert in enumerate(figures["experts"]):
            mine = Counter(t for t, pair in zip(ids, routes, strict=True) if e in pair)
            by_count = sorted(mine.items(), key=lambda tc: (-tc[1], tc[0]))[:10]
            assert [(r["id"], r["count"]) for r in expert["tokens_by_count"]] == by_count
            assert [r["text"] for r in expert["tokens_by_count"]] == [tokenizer.decode([t]) for t, _ in by_count]
            share = counts[e] / total
            lifts = [
                (t, (c / occurrences[t]) / share, c) for t, c in mine.items() if occurrences[t] >= LIFT_MIN_OCCURRENCES
            ]
            lifts.sort(key=lambda r: (-r[1], -r[2], r[0]))
            got = [(r["id"], r["lift"]) for r in expert["tokens_by_lift"]]
            assert [t for t, _ in got] == [t for t, _, _ in lifts[:10]]
            assert [lift for _, lift in got] == pytest.approx([lift for _, lift, _ in lifts[:10]], rel=1e-12)
    # the hand routing is known: layers 0 and 1 route alike, layer 2 never agrees with layer 1
    assert data["layers"][1]["consistency"] == 1.0 and data["layers"][2]["consistency"] == 0.0
    assert data["layers"][3]["consistency"] == sum(first(t) % 2 == 1 for t in ids) / total


def test_weights_and_entropy_match_the_models_own_router_logits(hand_moe):
    model = AutoModelForCausalLM.from_pretrained(hand_moe, dtype=torch.float32)
    ids = torch.tensor(text_ids(hand_moe))
    stats = routing_stats(model, ids, seq_len=len(ids))  # one block: the model's own logits come from one forward
    with torch.no_grad():
        logits = model(input_ids=ids[None], output_router_logits=True).router_logits  # L × (T, E)
    for layer, router_logits in enumerate(logits):
        probs = torch.softmax(router_logits.float(), dim=-1)  # (T, E)
        top, index = torch.topk(probs, TOP_K, dim=-1)  # (T, k)
        rec = stats.records[layer]
        assert torch.equal(rec.indices, index)
        assert torch.equal(rec.indices, torch.tensor(hand_routes(ids.tolist(), layer)))
        torch.testing.assert_close(rec.weights, top / top.sum(-1, keepdim=True), rtol=0, atol=1e-6)
        entropy = -(probs * probs.log()).sum(-1).double().mean()
        assert stats.layers[layer]["entropy"] == pytest.approx(float(entropy), rel=1e-5)
        assert stats.layers[layer]["entropy_norm"] == pytest.approx(float(entropy) / math.log(EXPERTS), rel=1e-5)
    assert stats.layers[0]["weight_cosine"] == pytest.approx(1.0, abs=1e-6)  # still clones


def test_blocks_and_batches_do_not_change_the_routing(hand_moe):
    """The hand routing ignores context, so any blocking gives the same records (the last block shorter)."""
    model = AutoModelForCausalLM.from_pretrained(hand_moe, dtype=torch.float32)
    ids = torch.tensor(text_ids(hand_moe))
    a = routing_stats(model, ids, seq_len=len(ids))
    b = routing_stats(model, ids, seq_len=37, batch_size=3)
    for layer in a.records:
        assert torch.equal(a.records[layer].indices, b.records[layer].indices)
        assert torch.equal(a.records[layer].counts, b.records[layer].counts)


# --- divergence ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def clone_moe(dense_store, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clone") / "moe"
    convert(str(dense_store("llama")), out, build_spec(experts=EXPERTS, top_k=TOP_K, router_std=1.0))
    return out


def pairwise_mean(vectors: torch.Tensor) -> float:
    """Mean cosine over the E·(E-1) ordered pairs of rows (E, D), the slow way."""
    num = vectors.shape[0]
    return sum(
        float(torch.nn.functional.cosine_similarity(vectors[i], vectors[j], dim=-1).mean())
        for i in range(num)
        for j in range(num)
        if i != j
    ) / (num * (num - 1))


def test_divergence_is_one_for_a_fresh_clone_and_falls_when_one_expert_moves(clone_moe):
    model = AutoModelForCausalLM.from_pretrained(clone_moe, dtype=torch.float32)
    ids = torch.randint(3, 128, (300,), generator=torch.Generator().manual_seed(0))
    fresh = routing_stats(model, ids, seq_len=100, sample_tokens=64)
    for layer, figures in fresh.layers.items():
        assert figures["weight_cosine"] == pytest.approx(1.0, abs=1e-6), layer
        assert figures["output_cosine"] == pytest.approx(1.0, abs=1e-6), layer
        assert fresh.records[layer].sample.shape == (64, 32)  # (N, H) the layer's expert inputs
    experts = experts_at(model, targets()["mixtral"], 2)
    with torch.no_grad():
        experts.gate_up_proj[1] += 0.05 * torch.randn(experts.gate_up_proj[1].shape, generator=torch.Generator())
    moved = routing_stats(model, ids, seq_len=100, sample_tokens=64)
    for layer, figures in moved.layers.items():
        if layer == 2:
            assert figures["weight_cosine"] < 1 - 1e-3 and figures["output_cosine"] < 1 - 1e-3
        else:  # the other layers' experts are still clones, whatever their inputs
            assert figures["weight_cosine"] == pytest.approx(1.0, abs=1e-6)
            assert figures["output_cosine"] == pytest.approx(1.0, abs=1e-6)
    # the same figures computed the slow way: flattened weights, and the experts module's own forward per expert
    flat = torch.cat([experts.gate_up_proj.flatten(1), experts.down_proj.flatten(1)], dim=1).detach().double()
    assert moved.layers[2]["weight_cosine"] == pytest.approx(pairwise_mean(flat), abs=1e-9)
    x = moved.records[2].sample  # (N, H)
    with torch.no_grad():
        outputs = torch.stack(
            [
                experts(x, torch.full((x.shape[0], 1), e), torch.ones(x.shape[0], 1))  # (N, H) expert e alone
                for e in range(EXPERTS)
            ]
        ).double()  # (E, N, H)
    assert moved.layers[2]["output_cosine"] == pytest.approx(pairwise_mean(outputs), abs=1e-6)


# --- files ----------------------------------------------------------------------------------------------


def test_json_to_stdout_is_the_report_and_the_table_goes_to_stderr(report, tmp_path):
    out, data, stdout, stderr = report
    assert json.loads(stdout) == data
    assert "weight" in stderr and "Wrote" in stderr
    assert sorted(p.name for p in out.iterdir()) == ["load.png", "routing.json", "tokens.html"]
    assert data["divergence"]["weight_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert data["html_tokens"] == data["tokens"]
    for name in ("routing.json", "tokens.html"):
        text = (out / name).read_text()
        assert str(tmp_path.parent.parent) not in text  # no absolute path of this machine


def test_load_png_has_its_size_and_shows_the_heatmap(report):
    from PIL import Image

    out, data, _stdout, _stderr = report
    with Image.open(out / "load.png") as image:
        assert image.format == "PNG"
        width, height = figure_size(len(data["moe_layers"]), data["experts"])
        assert image.size == (round(width * DPI), round(height * DPI))
        pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    assert pixels.std() > 20  # not blank
    colours = {tuple(p) for p in pixels.reshape(-1, 3)[::7].astype(int)}
    assert len(colours) > 50  # the diverging colour map, text and axes, not a flat image


# --- tokens.html in a real browser ---------------------------------------------------------------------


@pytest.fixture(scope="session")
def chromium() -> tuple[str, str]:
    """Debian's chromium and chromedriver, installed with apt when missing (needs root)."""
    browser, driver = "/usr/bin/chromium", "/usr/bin/chromedriver"
    if not (os.path.exists(browser) and os.path.exists(driver)):
        install = ["apt-get", "install", "-y", "-qq", "chromium", "chromium-driver"]
        if os.geteuid() != 0:
            pytest.fail("the tokens.html test needs Debian's chromium: apt-get install -y chromium chromium-driver")
        if subprocess.run(install, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True)
            subprocess.run(install, check=True, capture_output=True)
    return browser, driver


@pytest.fixture
def browser(chromium):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium[0]
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(chromium[1]), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


SPANS = """return Array.from(document.querySelectorAll('#text .t')).map(s => [
    s.textContent, getComputedStyle(s).backgroundColor, s.dataset.expert, s.title])"""
LEGEND = "return Array.from(document.querySelectorAll('#legend span')).map(s => getComputedStyle(s).backgroundColor)"


@pytest.mark.slow
def test_tokens_html_renders_coloured_spans_and_switches_layers(report, hand_moe, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    out, _data, _stdout, _stderr = report
    ids = text_ids(hand_moe)
    browser.get((out / "tokens.html").as_uri())
    assert browser.execute_script("return document.readyState") == "complete"
    legend = browser.execute_script(LEGEND)
    assert len(legend) == EXPERTS and len(set(legend)) == EXPERTS  # one distinct colour per expert

    def check(layer: int) -> list:
        spans = browser.execute_script(SPANS)
        assert len(spans) == len(ids)
        routes = hand_routes(ids, layer)
        for (_text, colour, expert, title), (top1, top2) in zip(spans, routes, strict=True):
            assert int(expert) == top1
            assert colour == legend[top1]
            assert title.startswith(f"layer {layer}, expert {top1}: ") and f", expert {top2}: " in title
        return spans

    spans = check(0)
    assert "".join(s[0] for s in spans) == TEXT.replace("\n", "↵\n")  # escaped text, newlines marked and kept
    assert len({s[1] for s in spans}) == EXPERTS
    select = Select(browser.find_element(By.ID, "layer"))
    assert [o.get_attribute("value") for o in select.options] == ["0", "1", "2", "3"]
    select.select_by_value("2")
    switched = check(2)
    assert sum(a[1] != b[1] for a, b in zip(spans, switched, strict=True)) == len(ids)  # σ_2 moves every token
    weights = [float(part.split(": ")[1]) for part in switched[0][3].split(", ")[1:]]
    assert weights[0] > weights[1] and sum(weights) == pytest.approx(1.0, abs=2e-3)
    assert browser.find_elements(By.CSS_SELECTOR, "link, img, iframe, script[src]") == []  # nothing fetched


# --- bad input --------------------------------------------------------------------------------------------


def expect_error(capsys, argv: list, needle: str) -> None:
    capsys.readouterr()
    code = run([str(a) for a in argv])
    cap = capsys.readouterr()
    assert code == 2, (code, cap.out, cap.err)
    assert "Traceback" not in cap.err
    lines = cap.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), cap.err
    assert needle.lower() in lines[0].lower(), lines[0]


def test_bad_input_is_one_line_and_writes_nothing(capsys, hand_moe, dense_store, text_file, tmp_path):
    out = tmp_path / "rep"
    expect_error(capsys, ["routing", dense_store("llama"), "--text", text_file, "--out", out], "upcycle convert")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    expect_error(capsys, ["routing", hand_moe, "--text", empty, "--out", out], "empty")
    one = tmp_path / "one.txt"
    one.write_text("a")
    expect_error(capsys, ["routing", hand_moe, "--text", one, "--out", out], "at least 2")
    expect_error(capsys, ["routing", hand_moe, "--text", tmp_path / "nope.txt", "--out", out], "does not exist")
    expect_error(capsys, ["routing", hand_moe, "--text", text_file, "--out", out, "--device", "tpu"], "--device")
    expect_error(capsys, ["routing", hand_moe, "--text", text_file, "--out", out, "--seq-len", "999"], "context")
    assert not out.exists() and not list(tmp_path.glob(".rep.tmp-*"))
    out.mkdir()
    expect_error(capsys, ["routing", hand_moe, "--text", text_file, "--out", out], "--force")
    assert list(out.iterdir()) == []


def test_token_text_shows_the_bytes_of_a_split_character(tmp_path):
    """A byte-level BPE with no merges splits 'é' into two byte tokens; alone each decodes to U+FFFD."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from upcycle.report.routing import _byte_decoder, token_text

    vocab = {ch: i for i, ch in enumerate(sorted(_byte_decoder()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    ids = fast("aé", add_special_tokens=False).input_ids
    assert [token_text(fast, i) for i in ids] == ["a", "<c3>", "<a9>"]
    assert fast.decode(ids) == "aé"


@pytest.mark.parametrize(
    ("family", "spec", "moe_layers"),
    [("llama", dict(every=2), [1, 3]), ("qwen3", dict(layers="0,2,3"), [0, 2, 3])],
    ids=["qwen2_moe-every2", "qwen3_moe-some-layers"],
)
def test_dense_layers_are_skipped(family, spec, moe_layers, dense_store, tmp_path):
    out = tmp_path / "moe"
    convert(str(dense_store(family)), out, build_spec(experts=EXPERTS, top_k=TOP_K, **spec))
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.randint(3, 128, (90,), generator=torch.Generator().manual_seed(1))
    stats = routing_stats(model, ids, seq_len=32)
    assert list(stats.layers) == moe_layers
    assert stats.layers[moe_layers[0]]["consistency"] is None
    for layer in moe_layers:
        assert int(stats.records[layer].counts.sum()) == 90 * TOP_K
        assert stats.records[layer].indices.shape == (90, TOP_K)
        assert stats.layers[layer]["weight_cosine"] == pytest.approx(1.0, abs=1e-6)
        assert stats.layers[layer]["output_cosine"] == pytest.approx(1.0, abs=1e-6)
    later = stats.records[moe_layers[1]].indices[:, 0] == stats.records[moe_layers[0]].indices[:, 0]
    assert stats.layers[moe_layers[1]]["consistency"] == float(later.double().mean())
    assert stats.load_matrix().sum(dim=1).tolist() == pytest.approx([1.0] * len(moe_layers))


# --- comparable heatmaps, and no torch warning ----------------------------------------------------------------


def test_load_scale_fixed_runs_the_colours_from_0_to_one_over_k(hand_moe, text_file, tmp_path, monkeypatch):
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure

    norms: dict[str, TwoSlopeNorm] = {}
    real = Figure.savefig

    def keep(fig, path, *a, **k):
        norms[Path(path).parent.name] = fig.axes[0].images[0].norm
        return real(fig, path, *a, **k)

    monkeypatch.setattr(Figure, "savefig", keep)
    for scale in ("auto", "fixed"):
        out = tmp_path / scale
        assert run(["routing", str(hand_moe), "--text", str(text_file), "--out", str(out), "--load-scale", scale]) == 0
    data = json.loads((tmp_path / "fixed" / "routing.json").read_text())
    largest = max(e["load"] for layer in data["layers"] for e in layer["experts"])
    assert len(norms) == 2  # one image per report: every layer shares its colour range
    fixed = next(n for name, n in norms.items() if "fixed" in name)
    auto = next(n for name, n in norms.items() if "auto" in name)
    assert (fixed.vmin, fixed.vcenter, fixed.vmax) == (0.0, 1 / EXPERTS, 1 / TOP_K)
    assert auto.vmax == pytest.approx(max(largest, 2 / EXPERTS))
    assert "top-k assignments" in data["load"] and data["load_tokens"].endswith(f"tokens of {text_file.name}")
    bad = ["routing", str(hand_moe), "--text", str(text_file), "--out", str(tmp_path / "x"), "--load-scale", "x"]
    assert run(bad) == 2 and not (tmp_path / "x").exists()


def test_routing_a_qwen2_moe_does_not_show_the_zero_element_warning(dense_store, text_file, tmp_path, capfd):
    moe = tmp_path / "moe"
    convert(str(dense_store("llama")), moe, build_spec(experts=EXPERTS, top_k=TOP_K, target="qwen2_moe"))
    capfd.readouterr()
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run(["routing", str(moe), "--text", str(text_file), "--out", str(tmp_path / "rep")]) == 0
    cap = capfd.readouterr()
    assert "zero-element" not in cap.out + cap.err
    assert not [w for w in caught if "zero-element" in str(w.message)]

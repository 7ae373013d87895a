"""`--router-init kmeans`: router rows from the dense model's FFN inputs on calibration text, on tiny models.

The FFN inputs are captured here independently (a forward pre-hook on each dense `mlp`), and the written rows
are checked against them: k-means centroids that are a Lloyd fixed point (clone/drop), or the centred ridge
least-squares directions predicting each expert's output norm, recomputed from the reloaded MoE's experts (split).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_bad_input import assert_clean, expect_error
from test_methods import run_model, shard_hashes, tensors
from transformers import AutoModelForCausalLM, AutoTokenizer

from upcycle.convert.calibrate import CHUNK, RIDGE, kmeans
from upcycle.convert.pipeline import convert
from upcycle.convert.router_init import layer_generator
from upcycle.convert.spec import build_spec

TOKENS = 1024
HIDDEN = 32  # tests/tiny.py
TEXT = " ".join(
    [
        "The quick brown fox jumps over the lazy dog near the river bank at dawn.",
        "In 1969, 3 astronauts flew 384400 km to the Moon and back; 2 of them walked on it.",
        "SELECT name, price FROM items WHERE price > 10 ORDER BY price DESC, name ASC.",
        "Rain, rain, go away. Come again another day, little Johnny wants to play.",
        "def add(a, b): return a + b, said the programmer, and the tests passed at last.",
        "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
        "ZEBRA YAK XENOPUS WOMBAT VOLE URIAL TAPIR SLOTH RHEA QUAIL PUMA OKAPI NEWT.",
        "She sells sea shells by the sea shore, and the shells she sells are surely shells.",
        "0 1 1 2 3 5 8 13 21 34 55 89 144 233 377 610 987 1597 2584 4181 6765.",
        "It was the best of times, it was the worst of times, it was the age of wisdom.",
    ]
    * 12
)


@pytest.fixture
def calib(tmp_path) -> Path:
    path = tmp_path / "calib.txt"
    path.write_text(TEXT)
    return path


def captured(src: Path, layers: list[int]) -> dict[int, torch.Tensor]:
    """Each layer's FFN input over the first TOKENS tokens, run in chunks as the converter runs them: [T, H]."""
    tok = AutoTokenizer.from_pretrained(src)
    ids = tok(TEXT, add_special_tokens=False)["input_ids"][:TOKENS]
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    for i in layers:
        model.model.layers[i].mlp.register_forward_pre_hook(lambda _m, a, i=i: seen[i].append(a[0][0]))
    chunk = min(CHUNK, model.config.max_position_embeddings)
    with torch.no_grad():
        for s in range(0, len(ids), chunk):
            model(input_ids=torch.tensor([ids[s : s + chunk]]))
    return {i: torch.cat(xs) for i, xs in seen.items()}


def routers(out: Path, plan) -> dict[int, torch.Tensor]:
    weights = tensors(out)
    return {op.layer: weights[op.name].float() for op in plan.ops if op.kind == "router"}


def kmeans_spec(calib: Path, **kw):
    return build_spec(router_init="kmeans", calibration=str(calib), calibration_tokens=TOKENS, **kw)


@pytest.mark.parametrize("family, init", [("llama", "clone"), ("qwen2", "drop"), ("qwen3", "clone")])
def test_rows_are_kmeans_centroids(family, init, dense_store, calib, tmp_path):
    src, out = dense_store(family), tmp_path / "moe"
    plan = convert(str(src), out, kmeans_spec(calib, experts=4, init=init, every=2)).plan
    rows = routers(out, plan)
    xs = captured(src, sorted(rows))
    for layer, row in rows.items():
        x = xs[layer]
        assert x.shape == (TOKENS, HIDDEN)
        c = kmeans(x, 4, layer_generator(0, layer))  # the converter's k-means, on the inputs captured here
        labels = torch.cdist(x, c).argmin(1)
        for j in range(4):  # Lloyd fixed point: each centroid is its cluster's mean, each token its nearest
            assert (labels == j).any(), "an empty cluster"
            torch.testing.assert_close(c[j], x[labels == j].mean(0), rtol=1e-5, atol=1e-5)
        want = c / c.norm(dim=1, keepdim=True) * 0.02 * math.sqrt(HIDDEN)  # the random router's row norm
        torch.testing.assert_close(row, want, rtol=1e-5, atol=1e-6)
        # the clusters really split the tokens: no cluster holds nearly all of them
        share = torch.bincount(labels, minlength=4).float() / TOKENS
        print(f"{family} {init} layer {layer}: cluster shares {[round(v, 3) for v in share.tolist()]}")
        assert share.max() < 0.9


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_split_rows_predict_expert_norms(family, dense_store, calib, tmp_path):
    src, out = dense_store(family), tmp_path / "moe"
    plan = convert(str(src), out, kmeans_spec(calib, experts=4, top_k=2, init="split")).plan
    rows = routers(out, plan)
    xs = captured(src, sorted(rows))
    moe = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    for layer, row in rows.items():
        x, experts = xs[layer], moe.model.layers[layer].mlp.experts
        act = moe.model.layers[layer].mlp.experts.act_fn
        norms = []
        for e in range(4):  # each expert's output, from the reloaded MoE's own weights
            gate, up = (x @ experts.gate_up_proj[e].detach().T).chunk(2, dim=-1)
            norms.append(((act(gate) * up) @ experts.down_proj[e].detach().T).norm(dim=1))
        y = torch.stack(norms, 1).double()  # [T, E]
        xd = x.double()
        gram = xd.T @ xd
        lam = RIDGE * gram.diagonal().mean()
        w = torch.linalg.lstsq(  # ridge as plain least squares on [X; sqrt(lam) I]
            torch.cat([xd, lam.sqrt() * torch.eye(HIDDEN, dtype=xd.dtype)]),
            torch.cat([y, torch.zeros(HIDDEN, 4, dtype=y.dtype)]),
        ).solution.T  # [E, H]
        w = w - w.mean(0)
        want = (w / w.norm(dim=1, keepdim=True) * 0.02 * math.sqrt(HIDDEN)).float()
        torch.testing.assert_close(row, want, rtol=1e-4, atol=1e-6)
        # the rows rank experts by output norm better than chance: correlation of logits with centred norms
        pred, target = x.double() @ row.double().T, y - y.mean(1, keepdim=True)
        corr = torch.corrcoef(torch.stack([pred.flatten(), target.flatten()]))[0, 1].item()
        print(f"{family} split layer {layer}: corr(logit, centred expert norm) = {corr:.3f}")
        assert corr > 0


@pytest.mark.parametrize("family, split_by", [("llama", None), ("qwen3", "coactivation"), ("qwen2", "cluster")])
def test_split_rows_read_the_kept_intermediate(family, split_by, dense_store, calib, tmp_path, monkeypatch):
    """Split's ridge rows take each expert's output from the MLP intermediate the pass kept (the expert's
    neurons' columns of act(gate x) * (up x), times its down), not from gate and up products again: every
    expert of every layer is read that way (with co-activation the partition leaves the intermediate whole),
    and the rows are those computed with nothing kept, within float32 rounding."""
    from upcycle.convert import calibrate

    read: list[tuple[bool, int]] = []  # per layer: intermediate given, experts made from it
    real_norms, real_neurons = calibrate.expert_norms, calibrate.LayerBuilder.neurons

    def norms_spy(x, builder, experts, act, inner=None):
        found = [real_neurons(builder, t) for t in experts]
        read.append((inner is not None, sum(idx is not None for idx in found) if inner is not None else 0))
        if inner is not None:
            assert sum(len(p) for p in inner) == len(x) and all(torch.isfinite(p).all() for p in inner)
            assert sorted(torch.cat(found).tolist()) == list(range(inner[0].shape[1]))  # a partition of the neurons
        return real_norms(x, builder, experts, act, inner)

    monkeypatch.setattr(calibrate, "expert_norms", norms_spy)
    src = dense_store(family)
    kw = dict(experts=4, top_k=2, init="split", split_by=split_by)
    plan = convert(str(src), tmp_path / "kept", kmeans_spec(calib, **kw)).plan
    assert read == [(True, 4)] * len(plan.moe_layers)
    monkeypatch.setattr(calibrate, "intermediate_for", lambda *a: None)
    read.clear()
    convert(str(src), tmp_path / "computed", kmeans_spec(calib, **kw))
    assert read == [(False, 0)] * len(plan.moe_layers)  # nothing kept: gate and up products again, as before
    kept, computed = routers(tmp_path / "kept", plan), routers(tmp_path / "computed", plan)
    for layer, row in kept.items():
        print(f"{family} {split_by} layer {layer}: max |kept - computed| = {(row - computed[layer]).abs().max():.2e}")
        torch.testing.assert_close(row, computed[layer], rtol=1e-5, atol=1e-6)
    experts = {k: v for k, v in tensors(tmp_path / "kept").items() if "router" not in k and "gate.weight" not in k}
    assert all(torch.equal(v, tensors(tmp_path / "computed")[k]) for k, v in experts.items())  # the same experts


@pytest.mark.parametrize(
    "family, spec",
    [
        ("llama", dict(experts=4, top_k=2)),
        ("qwen2", dict(experts=4, top_k=1, every=2)),
        ("qwen2", dict(experts=4, top_k=2, init="fine-grained", granularity=2)),
    ],
)
def test_exact_methods_stay_exact(family, spec, dense_store, calib, tmp_path):
    src, out = dense_store(family), tmp_path / "moe"
    plan = convert(str(src), out, kmeans_spec(calib, **spec)).plan
    assert plan.exact, plan.exact_text
    dense_logits, _, _ = run_model(src)
    moe_logits, _, info = run_model(out)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    diff = (dense_logits - moe_logits).abs().max().item()
    assert diff <= 1e-5, diff
    rows = routers(out, plan)
    assert all(r.abs().sum() > 0 for r in rows.values())  # the rows are not a zero router in disguise
    if spec.get("granularity"):  # parts of one replica share a row, as fine-grained exactness needs
        for r in rows.values():
            assert torch.equal(r[0], r[1]) and torch.equal(r[2], r[3]) and not torch.equal(r[0], r[2])


def test_seeded_and_recorded(dense_store, calib, tmp_path):
    src = dense_store("qwen2")
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    plan = convert(str(src), a, kmeans_spec(calib, experts=4, init="drop")).plan
    convert(str(src), b, kmeans_spec(calib, experts=4, init="drop"))
    convert(str(src), c, kmeans_spec(calib, experts=4, init="drop", seed=1))
    assert shard_hashes(a) == shard_hashes(b)
    ra, rc = routers(a, plan), routers(c, plan)
    assert any(not torch.equal(ra[i], rc[i]) for i in ra)  # the seed reaches the k-means++ draws
    recipe = json.loads((a / "upcycle.json").read_text())
    assert recipe["calibration"] == {"file": "calib.txt", "tokens": TOKENS}
    assert recipe["recipe"]["calibration"] == "calib.txt"
    assert str(tmp_path) not in (a / "upcycle.json").read_text()
    assert str(tmp_path) not in (a / "README.md").read_text()


def test_balance_against_random(dense_store, calib, tmp_path):
    """Top-1 load over the calibration text under each router; printed, and k-means spreads the tokens."""
    src = dense_store("llama")
    loads = {}
    for how in ("random", "kmeans"):
        out = tmp_path / how
        spec = kmeans_spec(calib, experts=4) if how == "kmeans" else build_spec(experts=4)
        plan = convert(str(src), out, spec).plan
        rows = routers(out, plan)
        xs = captured(src, sorted(rows))
        top1 = torch.cat([(xs[i] @ rows[i].T).argmax(1) for i in rows])
        loads[how] = torch.bincount(top1, minlength=4).float() / len(top1)
        print(f"{how}: top-1 load per expert {[round(v, 3) for v in loads[how].tolist()]}")
    assert (loads["kmeans"] > 0).all()  # every expert receives tokens


def test_kmeans_without_calibration(capsys, dense_store, tmp_path):
    out = tmp_path / "out"
    expect_error(capsys, ["convert", dense_store("llama"), out, "--router-init", "kmeans"], "--calibration")
    assert_clean(out)


def test_calibration_without_kmeans(capsys, dense_store, calib, tmp_path):
    out = tmp_path / "out"
    expect_error(capsys, ["convert", dense_store("llama"), out, "--calibration", calib], "--router-init kmeans")
    assert_clean(out)


def test_calibration_too_short(capsys, dense_store, tmp_path):
    out, short = tmp_path / "out", tmp_path / "short.txt"
    short.write_text("abc")
    argv = ["convert", dense_store("llama"), out, "--router-init", "kmeans", "--calibration", short, "--experts", "8"]
    line = expect_error(capsys, argv, "fewer than")
    assert str(tmp_path) not in line
    assert_clean(out)


def test_calibration_missing(capsys, dense_store, tmp_path):
    out = tmp_path / "out"
    argv = ["convert", dense_store("llama"), out, "--router-init", "kmeans", "--calibration", tmp_path / "none.txt"]
    expect_error(capsys, argv, "no such file")
    assert_clean(out)


@pytest.mark.parametrize("tokens", [1, 100, TOKENS, 10 * len(TEXT)])
def test_calibration_ids_read_only_a_prefix(tokens, dense_store, calib, monkeypatch):
    """calibration_ids reads and tokenises a growing prefix of the file (cut at a word boundary), and gives the
    first `tokens` ids of the whole text's tokenisation; a request past the end gives the whole text."""
    from upcycle.convert import calibrate

    src = dense_store("llama")
    whole = AutoTokenizer.from_pretrained(src)(TEXT, add_special_tokens=False)["input_ids"]
    read: list[int] = []
    real = calibrate.text_prefix
    monkeypatch.setattr(calibrate, "text_prefix", lambda f, n: (read.append(n), real(f, n))[1])
    ids = calibrate.calibration_ids(src, calib, tokens)
    assert ids.tolist() == whole[:tokens]
    if tokens * calibrate.CHARS_PER_TOKEN < len(TEXT):
        assert read == [tokens * calibrate.CHARS_PER_TOKEN]  # one prefix, shorter than the file, was enough

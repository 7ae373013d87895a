"""`--split-by coactivation` (MoEfication): neurons that fire together on calibration text share an expert.

The partition maths is checked on planted groups; the low-rank graph (held as the firing pattern F, never as
[I, I]) against the dense matrices it stands for; the conversion against a co-activation graph built here
independently as a dense matrix (the FFN's intermediate activations from a forward pre-hook on each dense
`down_proj`), and for exactness, balance, disjointness and seeding on tiny models.
"""

from __future__ import annotations

import pytest
import torch
from test_bad_input import assert_clean, expect_error
from test_methods import INTERMEDIATE, _rows, run_model, shard_hashes, tensors
from test_router_init import TEXT, TOKENS
from transformers import AutoModelForCausalLM, AutoTokenizer

from upcycle.arch import targets
from upcycle.convert.calibrate import StoredRows
from upcycle.convert.methods.base import generator
from upcycle.convert.methods.coactivation import (
    CoactivationGraph,
    DenseGraph,
    coactivation_fires,
    graph_partition,
    inside_weight,
)
from upcycle.convert.pipeline import convert
from upcycle.convert.spec import build_spec
from upcycle.source import Checkpoint, read_header


@pytest.fixture
def calib(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(TEXT)
    return path


def spec(calib, **kw):
    return build_spec(init="split", split_by="coactivation", calibration=str(calib), calibration_tokens=TOKENS, **kw)


def planted(groups: int, size: int, hidden: int = 32, tokens: int = 600, seed: int = 0):
    """An FFN whose neurons come in `groups` hidden groups (shuffled): the neurons of group g respond to
    direction g of the input, and each token points along one direction. Returns x, gate, up, act, labels."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.linalg.qr(torch.randn(hidden, hidden, generator=g))[0][:groups]  # [G, H] orthonormal
    truth = torch.randperm(groups * size, generator=g) % groups  # [I]: the planted group of each neuron
    gate = 3 * directions[truth] + 0.05 * torch.randn(groups * size, hidden, generator=g)  # [I, H]
    up = directions[truth] + 0.05 * torch.randn(groups * size, hidden, generator=g)
    which = torch.randint(groups, (tokens,), generator=g)
    x = directions[which] * (1 + torch.rand(tokens, 1, generator=g)) + 0.1 * torch.randn(tokens, hidden, generator=g)
    return x, gate, up, torch.nn.functional.silu, truth


def graph_of(x, gate, up, act, share: float, **kw) -> CoactivationGraph:
    return CoactivationGraph(coactivation_fires(x, gate, up, act, share, **kw))


def dense_reference(fires: torch.Tensor) -> DenseGraph:
    """The graph of a 0/1 firing pattern [T, I] as dense float64 matrices, written out from the definition:
    W = T^2 (P(i and j) - P(i) P(j)) without self-loops for the objective, S = co-firing counts for the start."""
    f = fires.double()
    t = len(f)
    both = f.T @ f  # [I, I] counts of tokens on which i and j both fire
    p = f.mean(0)
    w = (t * t * (both / t - p[:, None] * p[None, :])).round().fill_diagonal_(0)  # whole numbers
    return DenseGraph(w, both, shift=0.0)


def same_partition(labels: torch.Tensor, truth: torch.Tensor) -> bool:
    """Equal up to renaming the groups."""
    pairs = set(zip(labels.tolist(), truth.tolist(), strict=True))
    return len(pairs) == len(set(labels.tolist())) == len(set(truth.tolist()))


@pytest.mark.parametrize("groups, size", [(2, 4), (4, 16), (8, 8)])
def test_planted_groups_are_recovered(groups, size):
    x, gate, up, act, truth = planted(groups, size)
    labels = graph_partition(graph_of(x, gate, up, act, share=1 / groups), groups, generator(0, "test"))
    assert torch.bincount(labels).tolist() == [size] * groups
    assert same_partition(labels, truth), (labels.tolist(), truth.tolist())


def test_partition_is_balanced_and_beats_random():
    """On a graph with no planted structure every group still gets I/P neurons, and the weight kept inside
    the groups is above what random balanced groups keep."""
    g = torch.Generator().manual_seed(1)
    a = torch.rand(96, 96, generator=g)
    w = ((a + a.T) / 2).fill_diagonal_(0)
    labels = graph_partition(w, 6, generator(0, "test"))
    assert torch.bincount(labels, minlength=6).tolist() == [16] * 6
    rand = [inside_weight(w, torch.randperm(96, generator=g) % 6) for _ in range(20)]
    print(f"inside weight: partition {inside_weight(w, labels):.1f}, random {min(rand):.1f}..{max(rand):.1f}")
    assert inside_weight(w, labels) > max(rand)


def test_graph_is_coactivation_above_chance():
    """Two neurons that always fire together get a positive edge; a neuron and its anti-twin a negative one."""
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).repeat(50, 1)  # [100, 2]: two kinds of token
    gate = torch.tensor([[5.0, 0.0], [5.0, 0.0], [0.0, 5.0], [0.0, 5.0]])  # neurons 0, 1 on kind 0; 2, 3 on 1
    graph = graph_of(x, gate, torch.ones(4, 2), torch.nn.functional.silu, share=0.5)
    w, _ = graph.dense()
    t2 = 100**2  # weights are T^2 times the probabilities
    assert w[0, 1] == 0.25 * t2 and w[2, 3] == 0.25 * t2  # P(both) 1/2 - P(i)P(j) 1/4
    assert w[0, 2] == -0.25 * t2 and w[1, 3] == -0.25 * t2  # P(both) 0 - 1/4: never together
    assert (w.diagonal() == 0).all()
    assert graph_partition(graph, 2, generator(0, "test")).tolist() in ([0, 0, 1, 1], [1, 1, 0, 0])


def activations(src, layers: list[int]) -> dict[int, torch.Tensor]:
    """Each layer's intermediate activations act(gate x) * (up x) over the calibration tokens: [T, I]."""
    tok = AutoTokenizer.from_pretrained(src)
    ids = tok(TEXT, add_special_tokens=False)["input_ids"][:TOKENS]
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    for i in layers:
        model.model.layers[i].mlp.down_proj.register_forward_pre_hook(lambda _m, a, i=i: seen[i].append(a[0][0]))
    chunk = min(512, model.config.max_position_embeddings)
    with torch.no_grad():
        for s in range(0, len(ids), chunk):
            model(input_ids=torch.tensor([ids[s : s + chunk]]))
    return {i: torch.cat(h) for i, h in seen.items()}


@pytest.mark.parametrize(
    "family, kw",
    [
        ("llama", dict(experts=4, top_k=2)),
        ("qwen2", dict(experts=3, top_k=2, shared_experts=1)),
    ],
)
def test_experts_are_the_coactivation_groups(family, kw, dense_store, calib, tmp_path):
    src, out = dense_store(family), tmp_path / "moe"
    plan = convert(str(src), out, spec(calib, **kw)).plan
    dense, moe = tensors(src), tensors(out)
    n, s = kw["experts"], kw.get("shared_experts", 0)
    parts, size = n + s, INTERMEDIATE // (n + s)
    target = targets()[plan.target]
    acts = activations(src, plan.moe_layers)
    for layer in plan.moe_layers:
        gate = dense[f"model.layers.{layer}.mlp.gate_proj.weight"]
        groups = [sorted(_rows(gate, moe[target.expert["gate"].format(layer=layer, expert=e)])) for e in range(n)]
        if s:
            groups.append(sorted(_rows(gate, moe[target.shared["gate"].format(layer=layer)])))
        flat = sorted(i for g in groups for i in g)
        assert flat == list(range(INTERMEDIATE))  # disjoint, and together every neuron
        assert [len(g) for g in groups[:n]] == [size] * n  # balanced
        # the graph rebuilt here from the activations: fires = among each token's top k/N (at most 1/2) by |act|
        h = acts[layer].abs()  # [T, I]
        count = round(min(kw["top_k"] / n, 0.5) * INTERMEDIATE)
        fires = torch.zeros_like(h).scatter_(1, h.topk(count, 1).indices, 1.0)
        reference = dense_reference(fires)  # dense [I, I] matrices
        want = graph_partition(reference, parts, generator(0, "coactivation", layer))
        want_groups = sorted(torch.nonzero(want == c).squeeze(1).tolist() for c in range(parts))
        assert sorted(groups) == want_groups
        w = reference.w
        keep = inside_weight(w, want)
        rand = max(inside_weight(w, torch.randperm(INTERMEDIATE) % parts) for _ in range(10))
        print(f"{family} layer {layer}: co-activation inside groups {keep:.3f}, best of 10 random {rand:.3f}")
        assert keep > rand


@pytest.mark.parametrize(
    "family, kw",
    [
        ("llama", dict(experts=4, top_k=4)),
        ("mistral", dict(experts=8, top_k=8, every=2)),
        ("qwen2", dict(experts=3, top_k=3, shared_experts=1)),
        ("qwen3", dict(experts=4, top_k=4)),
    ],
)
def test_exact_with_all_experts_and_a_zero_router(family, kw, dense_store, calib, tmp_path):
    src, out = dense_store(family), tmp_path / "moe"
    plan = convert(str(src), out, spec(calib, router_init="zero", **kw)).plan
    assert plan.exact, plan.exact_text
    dense_logits, _, _ = run_model(src)
    moe_logits, _, info = run_model(out)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert (dense_logits - moe_logits).abs().max().item() <= 1e-5


def test_with_a_kmeans_router(dense_store, calib, tmp_path):
    """Both calibration users at once: one pass, the split router regressed on the coactivation experts."""
    out = tmp_path / "moe"
    convert(str(dense_store("qwen3")), out, spec(calib, experts=4, top_k=2, router_init="kmeans"))
    moe_logits, _, info = run_model(out)
    assert not info["missing_keys"] and torch.isfinite(moe_logits).all()


def test_seeded(dense_store, calib, tmp_path):
    src = dense_store("mistral")
    for name in ("a", "b"):
        convert(str(src), tmp_path / name, spec(calib, experts=4, seed=3))
    assert shard_hashes(tmp_path / "a") == shard_hashes(tmp_path / "b")


def test_one_layer_at_a_time(dense_store, calib, tmp_path, monkeypatch):
    """The partition pass reads each layer's gate and up once (by blocks of rows: one block of these 64 neurons),
    layer after layer; the writer streams each layer's FFN once, layer after layer, beside it (beside.py), and
    loads a layer only once its partition is in."""
    from upcycle import source
    from upcycle.convert import calibrate

    reads: list[str] = []  # the pass's reads of gate and up
    loads: list[str] = []  # the writer's loads of the dense FFN
    ready: list[int] = []  # layers whose partitions are in, as the writer loads
    real, rows, add = Checkpoint.load, source.read_row_block, calibrate.LayerResults.add

    def load(self, name):
        layer = int(name.split(".")[2])
        ready.append(layer in got)
        loads.append(name)
        return real(self, name)

    got: set[int] = set()

    def adding(self, layer, xs, seqs):
        add(self, layer, xs, seqs)
        got.add(layer)

    monkeypatch.setattr(Checkpoint, "load", load)
    monkeypatch.setattr(source, "read_row_block", lambda info, a, b: reads.append(info.name) or rows(info, a, b))
    monkeypatch.setattr(calibrate.LayerResults, "add", adding)
    convert(str(dense_store("llama")), tmp_path / "moe", spec(calib, experts=4))
    assert reads == [f"model.layers.{i}.mlp.{r}_proj.weight" for i in range(4) for r in ("gate", "up")]
    assert loads == [f"model.layers.{i}.mlp.{r}_proj.weight" for i in range(4) for r in ("gate", "up", "down")]
    assert all(ready)


def test_needs_calibration(capsys, dense_store, tmp_path):
    out = tmp_path / "out"
    argv = ["convert", dense_store("llama"), out, "--init", "split", "--split-by", "coactivation"]
    expect_error(capsys, argv, "--split-by coactivation needs calibration text")
    assert_clean(out)


@pytest.mark.parametrize("family", ["llama", "granite"])
def test_layerwise_verify_reads_the_groups_back(family, dense_store, calib, tmp_path):
    """The groups came from calibration text verify does not have: it recovers them from the gate rows, then
    recomputes every expert tensor from them (granite: the parts of its fused expert tensors)."""
    from upcycle.report.verify import verify

    src, out = dense_store(family), tmp_path / "moe"
    convert(str(src), out, spec(calib, experts=4, top_k=4, router_init="zero"))
    report = verify(str(src), str(out), mode="layerwise")
    check = report.tensor_check
    assert report.passed and check.passed
    assert check.computed >= 2 and check.equal == check.compared


def test_layerwise_verify_catches_a_changed_gate_row(dense_store, calib, tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    from upcycle.report.verify import verify

    src, out = dense_store("llama"), tmp_path / "moe"
    convert(str(src), out, spec(calib, experts=4, top_k=4, router_init="zero"))
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.1.block_sparse_moe.experts.2.w1.weight"
    shard = out / weight_map[name]
    state = load_file(shard)
    state[name][0] += 1.0  # no longer a dense gate row
    save_file(state, shard, metadata={"format": "pt"})
    check = verify(str(src), str(out), mode="layerwise").tensor_check
    assert not check.passed
    assert name in check.mismatched


@pytest.mark.parametrize("groups, size", [(4, 16), (8, 8), (8, 160)])
def test_iterative_spectral_start_recovers_planted_groups(groups, size, monkeypatch):
    """The iterative spectral start (only the P eigenvectors it needs; used from DENSE_EIGH_BELOW neurons up,
    forced here at every size) recovers the planted groups as the full eigendecomposition does."""
    from upcycle.convert.methods import coactivation

    monkeypatch.setattr(coactivation, "DENSE_EIGH_BELOW", 0)
    x, gate, up, act, truth = planted(groups, size, tokens=1200)
    labels = graph_partition(graph_of(x, gate, up, act, share=1 / groups), groups, generator(0, "test"))
    assert torch.bincount(labels).tolist() == [size] * groups
    assert same_partition(labels, truth), (labels.tolist(), truth.tolist())


def test_iterative_spectral_start_is_balanced_and_beats_random(monkeypatch):
    from upcycle.convert.methods import coactivation

    monkeypatch.setattr(coactivation, "DENSE_EIGH_BELOW", 0)
    g = torch.Generator().manual_seed(1)
    a = torch.rand(96, 96, generator=g)
    w = ((a + a.T) / 2).fill_diagonal_(0)
    labels = graph_partition(w, 6, generator(0, "test"))
    assert torch.bincount(labels, minlength=6).tolist() == [16] * 6
    rand = [inside_weight(w, torch.randperm(96, generator=g) % 6) for _ in range(20)]
    assert inside_weight(w, labels) > max(rand)


@pytest.mark.parametrize("chunk", [512, 128])
def test_low_rank_products_match_the_dense_graph(chunk):
    """The graph is held as F [T, I] alone; each product the partition takes through F equals the dense
    matrices' (written out from the definition in float64): whole-number affinities and scores exactly, the
    normalised product to float32 rounding. chunk 128 of 700 tokens: 6 blocks of activations, the last short."""
    x, gate, up, act, _ = planted(4, 16, tokens=700)
    graph = graph_of(x, gate, up, act, share=0.25, chunk=chunk)
    h = (act(x @ gate.T) * (x @ up.T)).abs()
    fires = torch.zeros_like(h).scatter_(1, h.topk(16, 1).indices, 1.0)
    assert torch.equal(graph.f, fires)  # each token's 16 largest |activations|
    ref = dense_reference(fires)
    w, s = graph.dense()
    assert torch.equal(w, ref.w) and torch.equal(s, ref.s)
    assert (w > 0).sum() > 100 and (w < 0).sum() > 100  # edges of both signs, not an empty graph
    labels = torch.randperm(64, generator=torch.Generator().manual_seed(2)) % 4
    assert torch.equal(graph.affinity(labels), ref.affinity(labels))
    assert graph.score(labels) == ref.score(labels) == inside_weight(w, labels)
    q = torch.randn(64, 12, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(graph.shifted(q), ref.shifted(q), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(graph.normalised_dense(), ref.normalised_dense(), rtol=1e-12, atol=0)


def fires_whole(x, gate, up, act, share: float, chunk: int = 512) -> torch.Tensor:
    """F found as it was before blocks of neurons: gate and up whole in float32, [chunk, I] activations."""
    g, u = gate.float(), up.float()
    count = max(1, round(share * len(g)))
    fires = torch.zeros(len(x), len(g), dtype=torch.bool)
    for s in range(0, len(x), chunk):
        h = act(x[s : s + chunk] @ g.T).mul_(x[s : s + chunk] @ u.T).abs_()  # [t, I]
        fires[s : s + chunk].scatter_(1, h.topk(count, dim=1).indices, True)
    return fires


@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block", [32, 96, 1000, 4096])
def test_fires_by_blocks_of_neurons_equal_fires_whole(block, dtype, act, tmp_path):
    """F found BLOCK neurons at a time, from gate and up rows cast to float32 block by block (as tensors, and
    read from a safetensors file by byte ranges as conversion reads them), is F found from gate and up whole:
    blocks that divide the width, one that does not (1000 of 1536: a short last block) and one wider than it."""
    from safetensors.torch import save_file
    from transformers.activations import ACT2FN

    g = torch.Generator().manual_seed(5)
    tokens, hidden, width = 1100, 96, 1536  # 1100 tokens: two full chunks of 512 and a short one
    x = torch.randn(tokens, hidden, generator=g)
    gate = (torch.randn(width, hidden, generator=g) / hidden**0.5).to(dtype)
    up = (torch.randn(width, hidden, generator=g) / hidden**0.5).to(dtype)
    fn = ACT2FN[act]
    want = fires_whole(x, gate, up, fn, 0.25)
    assert want.sum(1).eq(384).all()  # each token's top quarter
    assert torch.equal(coactivation_fires(x, gate, up, fn, 0.25, block=block), want)
    save_file({"gate": gate, "up": up}, tmp_path / "ffn.safetensors")
    stored = {info.name: StoredRows(info) for info in read_header(tmp_path / "ffn.safetensors")}
    assert stored["gate"][1000:2000].shape == (536, hidden)  # clipped at the end, as a slice is
    assert torch.equal(stored["up"][40:72], up[40:72])  # in the source's dtype
    assert torch.equal(coactivation_fires(x, stored["gate"], stored["up"], fn, 0.25, block=block), want)


@pytest.mark.parametrize("share", [0.25, 0.5, 1 / 100])
def test_unsorted_top_k_sets_equal_sorted_ones_ties_included(share):
    """fires_of takes each token's top-k unsorted: the same set as a sorted top-k, also where the k-th value is
    tied (activations on a coarse grid: many equal values at every boundary), on both of torch's CPU paths
    (nth_element for share 0.25 and 0.5, the partial sort for 1/100: k x 64 <= I)."""
    from upcycle.convert.methods.coactivation import fires_of

    g = torch.Generator().manual_seed(11)
    tokens, width = 700, 1536
    h = torch.randint(-6, 7, (tokens, width), generator=g).float() / 4  # 13 values: ties everywhere
    count = max(1, round(share * width))
    top = h.abs().topk(count, dim=1)  # sorted (the default)
    want = torch.zeros(tokens, width, dtype=torch.bool).scatter_(1, top.indices, True)
    kth = top.values[:, -1:]  # [T, 1]: each row's k-th largest
    above, at_least = (h.abs() > kth).sum(1), (h.abs() >= kth).sum(1)  # [T] each
    tied = (above < count) & (at_least > count)  # [T]: the row's k-th value is tied across the cut
    assert tied.float().mean() > 0.9
    got = fires_of([h[:300].clone(), h[300:].clone()], share, chunk=128)
    assert got.sum(1).eq(count).all()
    assert torch.equal(got, want)
    pieces = [h[:300].clone(), h[300:].clone()]  # consume=False (the ridge rows read them next): left as they are
    assert torch.equal(fires_of(pieces, share, chunk=128, consume=False), want)
    assert len(pieces) == 2 and torch.equal(torch.cat(pieces), h)


@pytest.mark.parametrize("iterative", [False, True])
@pytest.mark.parametrize("groups, size, seed", [(4, 16, 0), (8, 8, 1), (8, 160, 2), (6, 40, 3)])
def test_low_rank_partition_equals_the_dense_graphs(groups, size, seed, iterative, monkeypatch):
    """The partition through F is the partition of the dense matrices it stands for: on planted groups, and on
    a weaker planted signal (share above the group's) where the refinement has work to do."""
    from upcycle.convert.methods import coactivation

    if iterative:
        monkeypatch.setattr(coactivation, "DENSE_EIGH_BELOW", 0)
    x, gate, up, act, _ = planted(groups, size, tokens=900, seed=seed)
    x = x + 0.6 * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))  # blur the groups
    graph = graph_of(x, gate, up, act, share=1.5 / groups)
    labels = graph_partition(graph, groups, generator(seed, "test"))
    want = graph_partition(dense_reference(graph.f), groups, generator(seed, "test"))
    assert torch.bincount(labels).tolist() == [size] * groups
    if iterative:  # float32 products through F against the [I, I] one: the same partition or one as good
        assert same_partition(labels, want) or graph.score(labels) >= 0.999 * graph.score(want)
    else:
        assert torch.equal(labels, want)


@pytest.mark.parametrize("family", ["llama", "qwen3", "granite"])
def test_kept_intermediate_is_used_and_changes_nothing(family, dense_store, calib, tmp_path, monkeypatch):
    """The pass keeps each co-activation layer's MLP intermediate (down_proj's input), and the partition takes
    its activations from it, not from a second act(gate x) * (up x): every layer's check passes, and the output
    is byte for byte the one made with nothing kept (the activations computed from x, as before)."""
    from upcycle.convert import calibrate
    from upcycle.convert.methods import coactivation

    checks: list[bool] = []
    real = coactivation.same_as
    monkeypatch.setattr(coactivation, "same_as", lambda *a, **k: checks.append(real(*a, **k)) or checks[-1])
    src = dense_store(family)
    plan = convert(str(src), tmp_path / "kept", spec(calib, experts=4, top_k=2)).plan
    assert checks == [True] * len(plan.moe_layers)
    monkeypatch.setattr(calibrate, "intermediate_for", lambda *a: None)
    convert(str(src), tmp_path / "computed", spec(calib, experts=4, top_k=2))
    assert len(checks) == len(plan.moe_layers)  # nothing kept: no check, the activations computed from x
    assert shard_hashes(tmp_path / "kept") == shard_hashes(tmp_path / "computed")


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_a_bfloat16_pass_ranks_its_own_activations(family, dense_store, calib, tmp_path, monkeypatch):
    """--calibration-dtype bfloat16: the kept intermediate is the bfloat16 model's own activations; every layer's
    check passes within bfloat16's rounding (the float32 one would refuse them), and the partitions are those of
    the firing pattern of exactly those activations."""
    from upcycle.convert import calibrate
    from upcycle.convert.methods import coactivation

    checks: list[tuple[bool, bool]] = []
    real = coactivation.same_as
    pieces_seen: list[torch.Tensor] = []

    def spy(pieces, x, gate, up, act, **k):
        pieces_seen.append(torch.cat(pieces))
        checks.append((real(pieces, x, gate, up, act, **k), real(pieces, x, gate, up, act)))
        return checks[-1][0]

    monkeypatch.setattr(coactivation, "same_as", spy)
    src = dense_store(family)
    made: list[torch.Tensor] = []
    real_fires = coactivation.fires_of

    def fires_spy(inner, share, **kw):
        made.append(real_fires(inner, share, **kw))
        return made[-1]

    monkeypatch.setattr(coactivation, "fires_of", fires_spy)
    plan = convert(str(src), tmp_path / "bf16", spec(calib, experts=4, top_k=2, calibration_dtype="bfloat16")).plan
    assert [ok for ok, _ in checks] == [True] * len(plan.moe_layers)
    assert not any(strict for _, strict in checks)  # not the float32 activations: the float32 check refuses them
    for h, fires in zip(pieces_seen, made, strict=True):
        assert torch.equal(h, h.bfloat16().float())  # bfloat16 values
        assert torch.equal(fires, real_fires([h.clone()], min(2 / 4, 0.5)))
    assert calibrate.pass_dtype(Checkpoint.open(src), "bfloat16") == torch.bfloat16


def test_an_intermediate_that_is_not_the_activations_is_not_used():
    """same_as refuses pieces that are not act(gate x) * (up x) of x's tokens: other values (as a biased MLP
    would give), too few tokens, another width or dtype; then the activations are computed from x."""
    from upcycle.convert.methods.coactivation import activations, same_as

    x, gate, up, act, _ = planted(4, 16, tokens=600)
    h = activations(x, gate, up, act)  # [600, 64]
    pieces = list(h.split(256))  # 256, 256, 88 tokens
    assert same_as(pieces, x, gate, up, act)
    assert not same_as([*pieces[:-1], pieces[-1] + 0.1], x, gate, up, act)  # the last tokens differ
    assert not same_as([pieces[0] * 1.01, *pieces[1:]], x, gate, up, act)
    assert not same_as(pieces[:-1], x, gate, up, act)
    assert not same_as([p[:, :32] for p in pieces], x, gate, up, act)
    assert not same_as([p.double() for p in pieces], x, gate, up, act)
    assert not same_as([], x, gate, up, act)

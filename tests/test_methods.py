"""Expert methods beyond cloning (split, fine-grained, drop, noise, shared experts, softmax-topk routing) on tiny
models of every family: exact where the plan claims it, seeded, and built as each method says."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from test_bad_input import assert_clean, expect_error
from transformers import AutoModelForCausalLM

from upcycle.arch import FFN_ROLES, targets
from upcycle.convert.pipeline import convert
from upcycle.convert.spec import build_spec, load_recipe
from upcycle.source import Checkpoint
from upcycle_cli.main import run

CONFIGS = sorted(
    p for p in (Path(__file__).parent.parent / "configs").glob("*.yaml") if not p.stem.startswith("train-")
)
INTERMEDIATE = 64  # tests/tiny.py
IDS = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(3))

# (family, spec, exact claimed); every exact case must reproduce the dense logits after reloading
CASES = [
    # split: exact with top-k = N and a zero router
    ("llama", dict(init="split", experts=4, top_k=4, router_init="zero"), True),
    ("mistral", dict(init="split", experts=4, top_k=4, router_init="zero"), True),
    ("qwen2", dict(init="split", experts=8, top_k=8, router_init="zero"), True),
    ("qwen3", dict(init="split", experts=4, top_k=4, router_init="zero"), True),
    ("llama", dict(init="split", split_by="cluster", experts=4, top_k=4, router_init="zero"), True),
    ("qwen3", dict(init="split", split_by="cluster", experts=8, top_k=8, router_init="zero", every=2), True),
    ("llama", dict(init="split", experts=4, top_k=4, router_init="zero", every=2), True),
    ("llama", dict(init="split", experts=4, top_k=4, router_std=1.0), False),  # uneven weights
    ("qwen2", dict(init="split", experts=4, top_k=2, router_init="zero"), False),  # half the neurons per token
    ("qwen3", dict(init="split", experts=4, top_k=4, router_init="zero", routing="softmax-topk"), True),
    # fine-grained: exact for a random router (rows shared per virtual group) or top-k = N
    ("llama", dict(init="fine-grained", granularity=2, experts=4, top_k=2, router_std=1.0), True),
    ("mistral", dict(init="fine-grained", granularity=2, experts=8, top_k=4, router_std=1.0), True),
    ("qwen2", dict(init="fine-grained", granularity=4, experts=8, top_k=4, router_std=1.0), True),
    ("qwen3", dict(init="fine-grained", granularity=2, experts=4, top_k=2, router_std=1.0, every=2), True),
    ("qwen2", dict(init="fine-grained", granularity=2, experts=4, top_k=4, router_init="zero"), True),
    ("llama", dict(init="fine-grained", granularity=2, experts=4, top_k=2, fine_grained_scale="down"), True),
    # Megatron's cube root on gate, up and down: not exact through SiLU
    ("llama", dict(init="fine-grained", granularity=2, experts=4, top_k=2, fine_grained_scale="cube-root"), False),
    ("qwen3", dict(init="fine-grained", granularity=4, experts=8, top_k=4, fine_grained_scale="cube-root"), False),
    # drop and noise: never exact
    ("llama", dict(init="drop", experts=4), False),
    ("mistral", dict(init="drop", experts=4, drop_ratio=0.25), False),
    ("qwen2", dict(init="drop", experts=4), False),
    ("qwen3", dict(init="drop", experts=4, every=2), False),
    ("llama", dict(init="clone", experts=4, noise=0.05), False),
    ("qwen3", dict(init="clone", experts=4, noise=0.05), False),
    # softmax-topk (Qwen's norm_topk_prob=False): clone scaled by N/k, exact with a zero router only
    ("llama", dict(experts=4, top_k=2, routing="softmax-topk", router_init="zero", target="qwen2_moe"), True),
    ("qwen3", dict(experts=8, top_k=2, routing="softmax-topk", router_init="zero"), True),
    ("qwen2", dict(experts=4, top_k=2, routing="softmax-topk", router_std=1.0), False),
    # a shared expert (Qwen2-MoE): sigmoid(0) = 1/2 compensated
    ("llama", dict(experts=4, shared_experts=1, router_std=1.0, target="qwen2_moe"), True),
    ("mistral", dict(experts=4, shared_experts=1, every=2), True),
    ("qwen2", dict(experts=4, top_k=1, shared_experts=1, router_std=1.0), True),
    ("qwen2", dict(init="split", experts=3, top_k=3, shared_experts=1, router_init="zero"), True),
    ("qwen2", dict(init="split", experts=6, top_k=6, shared_experts=2, router_init="zero", split_by="cluster"), True),
    ("llama", dict(init="split", experts=7, top_k=2, shared_experts=1, target="qwen2_moe"), False),
    ("qwen2", dict(init="drop", experts=4, shared_experts=1), False),
]


def _id(case) -> str:
    family, spec, _ = case
    return family + "-" + "-".join(f"{k}={v}" for k, v in spec.items())


def run_model(folder: Path):
    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    with torch.no_grad():
        return model(input_ids=IDS).logits, model, info


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, "pt") as fh:
            out |= {k: fh.get_tensor(k) for k in fh.keys()}
    return out


def shard_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_exact_where_claimed(case, dense_store, tmp_path):
    family, spec, exact = case
    src, out = dense_store(family), tmp_path / "moe"
    plan = convert(str(src), out, build_spec(**spec)).plan
    assert plan.exact is exact, plan.exact_text
    dense_logits, _, _ = run_model(src)
    moe_logits, moe, info = run_model(out)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    diff = (dense_logits - moe_logits).abs().max().item()
    if exact:
        assert diff <= 1e-5, (diff, plan.exact_text)
    else:
        assert diff > 1e-4, (diff, plan.exact_text)  # the claim "not exact" is not just caution
    # every MoE layer holds experts of the method's size, and a shared expert only where asked for
    size = {"split": INTERMEDIATE // (spec["experts"] + spec.get("shared_experts", 0))}.get(spec.get("init"))
    if spec.get("init") == "fine-grained":
        size = INTERMEDIATE // spec["granularity"]
    size = size or INTERMEDIATE
    for layer in plan.moe_layers:
        mlp = moe.model.layers[layer].mlp
        assert mlp.experts.gate_up_proj.shape == (spec["experts"], 2 * size, 32)
        assert mlp.experts.down_proj.shape == (spec["experts"], 32, size)
        if hasattr(mlp, "shared_expert"):
            shared = spec.get("shared_experts", 0)
            want = (shared * size if spec.get("init") == "split" else INTERMEDIATE) if shared else 0
            assert mlp.shared_expert.down_proj.weight.shape == (32, want)
    cfg = json.loads((out / "config.json").read_text())
    if "norm_topk_prob" in cfg:
        assert cfg["norm_topk_prob"] is (spec.get("routing", "topk-softmax") == "topk-softmax")


# --- how each method builds its experts -----------------------------------------------------------------


def _rows(dense: torch.Tensor, part: torch.Tensor) -> list[int]:
    """Index of each row of `part` among the rows of `dense` (rows of random weights are all distinct)."""
    match = (part[:, None, :] == dense[None, :, :]).all(-1)  # [p, I]
    assert (match.sum(1) == 1).all(), "an expert row is not a row of the dense matrix"
    return match.int().argmax(1).tolist()


@pytest.mark.parametrize(
    "family, spec",
    [
        ("llama", dict(init="split", experts=4, top_k=2)),
        ("mistral", dict(init="split", experts=8, top_k=2, split_by="cluster")),
        ("qwen2", dict(init="split", experts=3, top_k=2, shared_experts=1)),
        ("qwen2", dict(init="split", experts=6, top_k=2, shared_experts=2, split_by="cluster")),
    ],
    ids=["random", "cluster", "random-shared", "cluster-shared"],
)
def test_split_partitions_the_neurons(family, spec, dense_store, tmp_path):
    src, out = dense_store(family), tmp_path / "moe"
    plan = convert(str(src), out, build_spec(**spec)).plan
    dense, moe = tensors(src), tensors(out)
    n, s = spec["experts"], spec.get("shared_experts", 0)
    size = INTERMEDIATE // (n + s)
    target = targets()[plan.target]
    partitions = []
    for layer in plan.moe_layers:
        gate, up, down = (dense[f"model.layers.{layer}.mlp.{r}_proj.weight"] for r in ("gate", "up", "down"))
        keys = [({r: target.expert[r].format(layer=layer, expert=e) for r in FFN_ROLES}, float(n)) for e in range(n)]
        if s:
            keys.append(({r: target.shared[r].format(layer=layer) for r in FFN_ROLES}, 2.0))
        seen: list[int] = []
        for key, scale in keys:
            rows = _rows(gate, moe[key["gate"]])
            assert torch.equal(moe[key["up"]], up[rows])  # the same neurons in up ...
            assert torch.equal(moe[key["down"]], down[:, rows] * scale)  # ... and in down
            assert len(rows) == (size if scale == n else s * size)
            seen += rows
        assert sorted(seen) == list(range(INTERMEDIATE))  # disjoint, and together every neuron
        partitions.append(seen)
    assert partitions[0] != partitions[1]  # each layer has its own partition


def test_cluster_split_groups_similar_neurons(dense_store, tmp_path):
    """Balanced k-means puts neurons nearer their own expert's centroid than a random split does."""
    src = dense_store("llama")
    dense = tensors(src)

    def spread(by: str) -> float:
        out = tmp_path / by
        convert(str(src), out, build_spec(init="split", experts=4, split_by=by))
        moe, total = tensors(out), 0.0
        for e in range(4):
            p = f"model.layers.0.block_sparse_moe.experts.{e}."
            x = torch.cat([moe[p + "w1.weight"], moe[p + "w3.weight"]], 1)  # [16, 64]: the neurons' features
            total += ((x - x.mean(0)) ** 2).sum().item()
        return total

    assert dense["model.layers.0.mlp.gate_proj.weight"].shape[0] == INTERMEDIATE
    assert spread("cluster") < 0.97 * spread("random")


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.8])
def test_drop_reinitialises_the_ratio(ratio, dense_store, tmp_path):
    src, out = dense_store("llama"), tmp_path / "moe"
    convert(str(src), out, build_spec(init="drop", experts=4, drop_ratio=ratio))
    dense, moe = tensors(src), tensors(out)
    want = round(ratio * INTERMEDIATE)
    for layer in range(4):
        gate, up, down = (dense[f"model.layers.{layer}.mlp.{r}_proj.weight"] for r in ("gate", "up", "down"))
        chosen = []
        for e in range(4):
            p = f"model.layers.{layer}.block_sparse_moe.experts.{e}."
            g, u, d = moe[p + "w1.weight"], moe[p + "w3.weight"], moe[p + "w2.weight"]
            changed = (g != gate).any(1)  # re-initialised neurons: rows of gate
            assert int(changed.sum()) == want
            assert (changed == (u != up).all(1)).all() and (changed == (u != up).any(1)).all()  # same rows of up
            assert (changed == (d != down).all(0)).all() and (changed == (d != down).any(0)).all()  # columns of down
            assert torch.equal(g[~changed], gate[~changed]) and torch.equal(d[:, ~changed], down[:, ~changed])
            fresh = g[changed]  # drawn from N(mean, std) of the dense gate
            assert abs(fresh.mean() - gate.mean()) < 4 * gate.std() / fresh.numel() ** 0.5
            assert 0.8 < (fresh.std() / gate.std()).item() < 1.2
            chosen.append(tuple(changed.nonzero().squeeze(1).tolist()))
        assert len(set(chosen)) == 4  # each expert re-initialises its own neurons


def test_noise_is_multiplicative(dense_store, tmp_path):
    src, out = dense_store("qwen3"), tmp_path / "moe"
    convert(str(src), out, build_spec(experts=4, noise=0.1))
    dense, moe = tensors(src), tensors(out)
    gate = dense["model.layers.2.mlp.gate_proj.weight"]
    factors = [moe[f"model.layers.2.mlp.experts.{e}.gate_proj.weight"] / gate for e in range(4)]
    for f in factors:
        assert abs(f.mean().item() - 1.0) < 0.02 and 0.08 < f.std().item() < 0.12
    assert not torch.equal(factors[0], factors[1])


def test_fine_grained_structure(dense_store, tmp_path):
    src, out = dense_store("llama"), tmp_path / "moe"
    convert(str(src), out, build_spec(init="fine-grained", granularity=4, experts=8, top_k=4))
    dense, moe = tensors(src), tensors(out)
    size = INTERMEDIATE // 4
    for layer in range(4):
        gate, down = (
            dense[f"model.layers.{layer}.mlp.gate_proj.weight"],
            dense[f"model.layers.{layer}.mlp.down_proj.weight"],
        )
        router = moe[f"model.layers.{layer}.block_sparse_moe.gate.weight"]
        for e in range(8):
            part = slice((e % 4) * size, (e % 4 + 1) * size)  # expert e: part e mod G of replica e div G
            p = f"model.layers.{layer}.block_sparse_moe.experts.{e}."
            assert torch.equal(moe[p + "w1.weight"], gate[part])
            assert torch.equal(moe[p + "w2.weight"], down[:, part] * 4)
            assert torch.equal(router[e], router[(e // 4) * 4])  # one row per virtual group
        assert not torch.equal(router[0], router[4])


# --- seeds -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        dict(init="drop", experts=4),
        dict(init="split", experts=4),
        dict(init="split", experts=4, split_by="cluster"),
        dict(experts=4, noise=0.02),
    ],
    ids=["drop", "split-random", "split-cluster", "noise"],
)
def test_seeded(spec, dense_store, tmp_path):
    src = dense_store("mistral")
    hashes = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        convert(str(src), tmp_path / name, build_spec(seed=seed, **spec))
        hashes[name] = shard_hashes(tmp_path / name)
    assert hashes["a"] == hashes["b"]  # same seed, same bytes
    a, c = tensors(tmp_path / "a"), tensors(tmp_path / "c")
    experts = [k for k in a if ".experts." in k]
    if spec.get("split_by") != "cluster":  # k-means may settle on the same clusters from another start
        assert any(not torch.equal(a[k], c[k]) for k in experts)  # another seed, other experts


def test_one_layer_at_a_time(dense_store, tmp_path, monkeypatch):
    """The executor reads each MoE layer's dense FFN once, layer after layer, never the whole model."""
    loads: list[str] = []
    real = Checkpoint.load
    monkeypatch.setattr(Checkpoint, "load", lambda self, name: loads.append(name) or real(self, name))
    convert(str(dense_store("llama")), tmp_path / "moe", build_spec(init="split", split_by="cluster", experts=4))
    want = [f"model.layers.{i}.mlp.{r}_proj.weight" for i in range(4) for r in ("gate", "up", "down")]
    assert loads == want


@pytest.mark.parametrize(
    "routing, router, factor, exact",
    [("topk-softmax", "random", 2.0, True), ("softmax-topk", "zero", 2.0 * 4 / 2, False)],  # G, G N / k
)
def test_fine_grained_cube_root_scales_every_matrix(routing, router, factor, exact, dense_store, tmp_path):
    """--fine-grained-scale cube-root: gate, up and down of each part are the dense part x s^(1/3), as
    Megatron-Core writes them; the down-only scale puts all of s on down_proj. Neither touches anything else."""
    src = dense_store("qwen2")
    dense = tensors(src)
    c = factor ** (1 / 3)
    kw = dict(init="fine-grained", granularity=2, experts=4, top_k=2, routing=routing)
    for mode, want in (("cube-root", dict(gate=c, up=c, down=c)), ("down", dict(gate=1.0, up=1.0, down=factor))):
        out = tmp_path / mode
        plan = convert(str(src), out, build_spec(fine_grained_scale=mode, router_init=router, **kw)).plan
        assert plan.exact is (exact and mode == "down"), plan.exact_text
        moe = tensors(out)
        half = INTERMEDIATE // 2
        for e in range(4):
            part = slice((e % 2) * half, (e % 2 + 1) * half)
            prefix = f"model.layers.0.mlp.experts.{e}"
            g, u, d = (dense[f"model.layers.0.mlp.{r}_proj.weight"] for r in ("gate", "up", "down"))
            torch.testing.assert_close(moe[f"{prefix}.gate_proj.weight"], g[part] * want["gate"], rtol=0, atol=0)
            torch.testing.assert_close(moe[f"{prefix}.up_proj.weight"], u[part] * want["up"], rtol=0, atol=0)
            torch.testing.assert_close(moe[f"{prefix}.down_proj.weight"], d[:, part] * want["down"], rtol=0, atol=0)
    # what the cube root costs: the activation is not positively homogeneous, so the MoE drifts from the dense
    dense_logits, _, _ = run_model(src)
    diffs = {mode: (dense_logits - run_model(tmp_path / mode)[0]).abs().max().item() for mode in ("down", "cube-root")}
    print(f"{routing}: max |dlogits| {diffs}")
    if exact:
        assert diffs["down"] <= 1e-5 < diffs["cube-root"]


def test_fine_grained_replicas_are_byte_copies(dense_store, tmp_path):
    """Replicas of one part are computed once; the later ones copy the bytes already written."""
    out = tmp_path / "moe"
    plan = convert(str(dense_store("llama")), out, build_spec(init="fine-grained", granularity=2, experts=8)).plan
    moe = tensors(out)
    same = [op.transform for op in plan.ops if op.kind == "expert" and op.layer == 0 and op.role == "down"]
    assert len(set(same)) == 2  # two parts, four replicas each
    assert torch.equal(
        moe["model.layers.0.block_sparse_moe.experts.1.w2.weight"],
        moe["model.layers.0.block_sparse_moe.experts.7.w2.weight"],
    )


# --- plan, dry run, card -----------------------------------------------------------------------------------


def test_dry_run_lists_transforms(dense_store, tmp_path, capsys):
    out = tmp_path / "moe"
    argv = ["convert", str(dense_store("llama")), str(out), "--init", "split", "--experts", "4", "--top-k", "4"]
    assert run([*argv, "--router-init", "zero", "--dry-run", "--json", "-"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["exact_at_init"] is True and "disjoint parts" in plan["exact_why"]
    assert plan["config"]["intermediate_size"] == 16
    down = [op for op in plan["ops"] if op["name"] == "model.layers.0.block_sparse_moe.experts.2.w2.weight"]
    assert down[0]["transform"] == ["parts", "random", 4, [2], 4.0] and down[0]["shape"] == [32, 16]
    assert not out.exists()


def test_a_scale_that_rounds_16_bit_values_is_not_exact(dense_store, tmp_path):
    """Softmax-topk with k = 3 of 4 scales down_proj by 4/3: exact in float32, a rounding in bfloat16."""
    spec = dict(experts=4, top_k=3, routing="softmax-topk", router_init="zero", target="qwen2_moe")
    bf16 = dense_store("llama", dtype=torch.bfloat16)
    rounded = convert(str(bf16), tmp_path / "a", build_spec(**spec), dry_run=True).plan
    assert not rounded.exact and "rounds BF16 values" in rounded.exact_text
    assert convert(str(dense_store("llama")), tmp_path / "b", build_spec(**spec), dry_run=True).plan.exact
    halves = convert(str(bf16), tmp_path / "c", build_spec(**{**spec, "top_k": 2}), dry_run=True).plan
    assert halves.exact  # x2 rounds nothing


@pytest.mark.parametrize(
    "spec, needles",
    [
        (dict(init="split", experts=4), ["LLaMA-MoE", "at random", "top-2 routing, kept weights renormalised"]),
        (dict(init="drop", experts=4, drop_ratio=0.25), ["Drop-Upcycling", "random 0.25 of its neurons"]),
        (dict(init="fine-grained", experts=4, granularity=2), ["cut into 2 contiguous parts", "Megatron-Core"]),
        (dict(experts=4, noise=0.1), ["N(1, 0.1)", "only approximates"]),
        (dict(experts=4, shared_experts=1, target="qwen2_moe"), ["the dense FFN, as Qwen2-MoE's always-on shared"]),
        (dict(experts=4, routing="softmax-topk", router_init="zero", target="qwen2_moe"), ["with this zero router"]),
    ],
    ids=["split", "drop", "fine-grained", "noise", "shared", "softmax-topk"],
)
def test_card_describes_the_method(spec, needles, dense_store, tmp_path):
    out = tmp_path / "moe"
    convert(str(dense_store("llama")), out, build_spec(**spec))
    card = (out / "README.md").read_text()
    for needle in needles:
        assert needle in card, needle
    assert ("kept weights renormalised" in card) is (spec.get("routing") != "softmax-topk")


# --- recipes -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_recipe(recipe, dense_store, tmp_path, capsys):
    spec = load_recipe(recipe)
    src, out = dense_store("llama"), tmp_path / "moe"
    assert run(["convert", str(src), str(out), "--config", str(recipe)]) == 0
    written = json.loads((out / "upcycle.json").read_text())
    assert {k: written["recipe"][k] for k in spec} == spec
    dense_logits, _, _ = run_model(src)
    moe_logits, _, info = run_model(out)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    if written["plan"]["exact_at_init"]:
        assert run(["verify", str(src), str(out)]) == 0
        assert (dense_logits - moe_logits).abs().max().item() <= 1e-5
    else:
        assert torch.isfinite(moe_logits).all()


# --- bad combinations --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family, flags, needle",
    [
        ("llama", ["--init", "split", "--experts", "5"], "not divisible by --experts = 5"),
        ("qwen2", ["--init", "split", "--experts", "3", "--shared-experts", "2"], "(3 + 2) = 5"),
        ("llama", ["--init", "fine-grained", "--granularity", "2", "--experts", "4", "--top-k", "1"], "--top-k 1"),
        ("llama", ["--init", "fine-grained", "--granularity", "4", "--experts", "6", "--top-k", "4"], "--experts 6"),
        ("llama", ["--init", "fine-grained", "--granularity", "3", "--experts", "6", "--top-k", "3"], "divisible"),
        ("llama", ["--init", "fine-grained"], "--granularity"),
        ("llama", ["--init", "fine-grained", "--granularity", "0"], "--granularity 0"),
        ("llama", ["--init", "drop", "--drop-ratio", "0"], "--drop-ratio"),
        ("llama", ["--init", "drop", "--drop-ratio", "1"], "--drop-ratio"),
        ("llama", ["--init", "drop", "--drop-ratio", "1.5"], "--drop-ratio"),
        ("llama", ["--init", "drop", "--drop-ratio", "-0.2"], "--drop-ratio"),
        ("llama", ["--drop-ratio", "0.5"], "applies to --init drop"),
        ("llama", ["--init", "split", "--noise", "0.1"], "--noise applies to --init clone"),
        ("llama", ["--noise", "0"], "--noise"),
        ("llama", ["--split-by", "cluster"], "--split-by applies"),
        ("llama", ["--init", "split", "--split-by", "coactivation"], "coactivation"),
        ("llama", ["--init", "split", "--split-by", "graph"], "--split-by"),
        ("llama", ["--init", "clone", "--granularity", "2"], "--granularity applies"),
        ("llama", ["--fine-grained-scale", "down"], "--fine-grained-scale applies to --init fine-grained"),
        ("llama", ["--init", "fine-grained", "--granularity", "2", "--fine-grained-scale", "sqrt"], "cube-root"),
        ("llama", ["--shared-experts", "1", "--target", "mixtral"], "--shared-experts"),  # auto: qwen2_moe
        ("mistral", ["--shared-experts", "1", "--target", "mixtral"], "mixtral has none"),
        ("qwen3", ["--shared-experts", "1", "--target", "qwen3_moe"], "qwen3_moe has none"),
        ("llama", ["--shared-experts", "2", "--target", "qwen2_moe"], "--shared-experts 2"),
        ("llama", ["--shared-experts", "-1"], "--shared-experts"),
        ("qwen2", ["--init", "fine-grained", "--granularity", "2", "--shared-experts", "1"], "not available yet"),
        ("llama", ["--routing", "softmax-topk", "--target", "mixtral"], "mixtral always renormalises"),
        ("mistral", ["--routing", "softmax-topk", "--target", "mixtral"], "--target qwen2_moe"),
        ("llama", ["--routing", "topk"], "--routing"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_bad_combinations(family, flags, needle, capsys, dense_store, tmp_path):
    out = tmp_path / "out"
    expect_error(capsys, ["convert", dense_store(family), out, *flags], needle)
    assert_clean(out)


def test_split_plan_for_a_70b_model_keeps_the_parameter_count():
    """Pure planning at checkpoint scale: a split MoE holds the dense parameters plus the routers, no more."""
    from test_plan import LLAMA3_70B, fake_tensors

    from upcycle.convert.ops import Parts
    from upcycle.convert.planner import make_plan

    plan = make_plan(LLAMA3_70B, fake_tensors(LLAMA3_70B), build_spec(init="split", experts=8, top_k=2))
    assert plan.config["intermediate_size"] == 28672 // 8 and not plan.exact
    experts = [op for op in plan.ops if op.kind == "expert"]
    assert {op.shape for op in experts if op.role == "down"} == {(8192, 3584)}
    assert len(experts) == 80 * 8 * 3 and all(isinstance(op.transform, Parts) for op in experts)
    assert plan.total_params == plan.dense_params + 80 * 8 * 8192
    idle = 80 * (8 - 2) * 3 * 8192 * 3584  # per layer, 6 of 8 experts of 3 x [3584, 8192] each sit out
    assert plan.active_params == plan.total_params - idle


@pytest.mark.parametrize(
    "family, spec",
    [
        ("llama", dict(init="split", experts=4, top_k=4, router_init="zero")),
        ("qwen2", dict(init="split", experts=3, top_k=3, shared_experts=1, router_init="zero")),
        ("qwen3", dict(experts=4, top_k=2, routing="softmax-topk", router_init="zero")),
    ],
    ids=["split", "split-shared", "softmax-topk"],
)
def test_verify_passes_exact_methods(family, spec, dense_store, tmp_path, capsys):
    src, out = dense_store(family), tmp_path / "moe"
    assert convert(str(src), out, build_spec(**spec)).plan.exact
    capsys.readouterr()
    assert run(["verify", str(src), str(out), "--json", "-", "--atol", "1e-5"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and report["max_abs_diff"] <= 1e-5 and report["top1_agreement"] == 1.0

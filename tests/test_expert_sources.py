"""Experts from several fine-tunes (`convert BASE OUT --expert-from A --expert-from B`, Branch-Train-MiX):
each expert is its source's FFN, the rest BASE's (or the float32 mean), and bad combinations are refused."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_bad_input import assert_clean, expect_error
from test_methods import tensors
from tiny import make_dense, save_tokenizer
from transformers import AutoModelForCausalLM

from upcycle.convert.pipeline import convert
from upcycle.convert.spec import build_spec

IDS = torch.randint(0, 100, (1, 24), generator=torch.Generator().manual_seed(0))


def fine_tune(base: Path, dst: Path, seed: int, *, also: str | None = None, scale: float = 0.05) -> Path:
    """A copy of BASE with its FFN weights (and tensors whose name holds `also`) perturbed: a stand-in fine-tune."""
    shutil.copytree(base, dst)
    g = torch.Generator().manual_seed(seed)
    for shard in dst.glob("*.safetensors"):
        sd = load_file(shard)
        for key in sd:
            if ".mlp." in key or (also and also in key):
                noise = torch.randn(sd[key].shape, generator=g).to(sd[key].dtype)
                sd[key] = sd[key] + noise * scale
        save_file(sd, shard, metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    base = make_dense(root / "base", "llama")
    return {
        "base": base,
        "a": fine_tune(base, root / "ft-a", 1),
        "b": fine_tune(base, root / "ft-b", 2),
        "c": fine_tune(base, root / "ft-c", 3, also="self_attn"),  # attention differs too
    }


def logits(folder: Path, force: int | tuple[int, ...] | None = None) -> torch.Tensor:
    """FOLDER's logits on IDS; with `force`, every MoE layer's router sends each token to expert `force` alone, or
    to the experts of a tuple (one per top-k slot), each with weight 1/len(force)."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    experts = (force,) if isinstance(force, int) else force

    def route(_m, _a, out):  # the router's (logits, top-k weights, top-k indices), replaced
        if len(experts) == 1:
            return out[0], torch.ones_like(out[1]), torch.full_like(out[2], experts[0])
        return out[0], torch.full_like(out[1], 1 / len(experts)), torch.tensor(experts).expand_as(out[2])

    if force is not None:
        for layer in model.model.layers:
            layer.mlp.gate.register_forward_hook(route)
    with torch.no_grad():
        return model(input_ids=IDS).logits


def ffn(folder: Path, layer: int) -> dict[str, torch.Tensor]:
    t = tensors(folder)
    return {r: t[f"model.layers.{layer}.mlp.{r}_proj.weight"] for r in ("gate", "up", "down")}


def test_each_expert_is_its_source(models, tmp_path):
    """Top-1 routing forced to expert i reproduces fine-tune i's logits exactly (fine-tunes differ in FFN only)."""
    out = tmp_path / "moe"
    spec = build_spec(experts=3, top_k=1, expert_from=(str(models["a"]), str(models["b"]), str(models["base"])))
    plan = convert(str(models["base"]), out, spec).plan
    assert plan.sources == ("ft-a", "ft-b", "base") and not plan.exact and "3 different models" in plan.exact_text
    for i, name in enumerate(("a", "b", "base")):
        assert torch.equal(logits(out, force=i), logits(models[name]))
    assert not torch.equal(logits(out, force=0), logits(out, force=1))


def test_several_experts_per_source(models, tmp_path):
    """--experts 4 from 2 sources: experts 0-1 are A's FFN, 2-3 B's, byte for byte."""
    out = tmp_path / "moe"
    convert(str(models["base"]), out, build_spec(experts=4, expert_from=(str(models["a"]), str(models["b"]))))
    written = tensors(out)
    for layer in range(2):
        for e, name in enumerate(("a", "a", "b", "b")):
            mine = ffn(models[name], layer)
            for role, key in (("gate", "w1"), ("down", "w2"), ("up", "w3")):  # Mixtral's per-expert names
                got = written[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{key}.weight"]
                assert torch.equal(got, mine[role])


def test_split_per_source(models, tmp_path):
    """--init split with 2 experts per source: each source's FFN cut in two, down_proj rescaled as for one model."""
    out = tmp_path / "moe"
    spec = build_spec(experts=4, top_k=2, init="split", expert_from=(str(models["a"]), str(models["b"])))
    convert(str(models["base"]), out, spec)
    # routed to one source's two experts only (top-2 of 4, weights 1/2 each) the MoE computes that source's FFN:
    # split's down_proj scale is N = 2 for 2 parts, and the kept weights renormalise to 1/2 each
    torch.testing.assert_close(logits(out, force=(2, 3)), logits(models["b"]), rtol=1e-5, atol=1e-5)


def test_fine_grained_per_source(models, tmp_path):
    """--init fine-grained --granularity 2 with 2 experts per source: each source's FFN cut in two, down_proj
    scaled by G; routed to one source's two parts (weights 1/2 each) the MoE computes that source's FFN."""
    out = tmp_path / "moe"
    spec = build_spec(experts=4, top_k=2, init="fine-grained", granularity=2,
                      expert_from=(str(models["a"]), str(models["b"])))  # fmt: skip
    convert(str(models["base"]), out, spec)
    got = logits(out, force=(0, 1))
    torch.testing.assert_close(got, logits(models["a"]), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, logits(models["b"]), rtol=1e-5, atol=1e-5)


def test_drop_per_source(models, tmp_path):
    """--init drop (Drop-Upcycling) per source: each expert keeps its own source's neurons but for round(r × I)
    re-initialised ones (the same neuron draw as one model's expert i: only the source differs)."""
    out = tmp_path / "moe"
    spec = build_spec(experts=4, init="drop", drop_ratio=0.25, expert_from=(str(models["a"]), str(models["b"])))
    convert(str(models["base"]), out, spec)
    written = tensors(out)
    intermediate = json.loads((models["base"] / "config.json").read_text())["intermediate_size"]
    for layer in range(2):
        for e, (mine, other) in enumerate((("a", "b"), ("a", "b"), ("b", "a"), ("b", "a"))):
            w1 = written[f"model.layers.{layer}.block_sparse_moe.experts.{e}.w1.weight"]
            w2 = written[f"model.layers.{layer}.block_sparse_moe.experts.{e}.w2.weight"]
            kept = (w1 == ffn(models[mine], layer)["gate"]).all(1)
            assert int(kept.sum()) == intermediate - round(0.25 * intermediate), (layer, e)
            assert torch.equal((w2 == ffn(models[mine], layer)["down"]).all(0), kept)  # down: the same neurons
            assert not (w1 == ffn(models[other], layer)["gate"]).all(1).any()  # nothing from the other source


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--experts", "3"], "not a multiple of the 2 --expert-from"),
        (["--experts", "2", "--init", "split"], "--init split cuts each source's FFN"),
        (["--experts", "4", "--router-init", "kmeans", "--calibration", "x.txt"], "--router-init kmeans"),
        (["--experts", "4", "--shared-experts", "1", "--target", "qwen2_moe"], "--shared-experts"),
    ],
)
def test_bad_combinations(flags, needle, models, capsys, tmp_path):
    out = tmp_path / "moe"
    argv = ["convert", models["base"], out, "--expert-from", models["a"], "--expert-from", models["b"], *flags]
    expect_error(capsys, argv, needle)
    assert_clean(out)


def test_shared_weights_average_needs_sources(models, capsys, tmp_path):
    out = tmp_path / "moe"
    expect_error(capsys, ["convert", models["base"], out, "--shared-weights", "average"], "--expert-from")
    assert_clean(out)


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda root: make_dense(root / "other", "qwen2"), "is a qwen2 model, but BASE"),
        (lambda root: make_dense(root / "other", "llama", intermediate_size=96), "intermediate_size=96"),
        (lambda root: make_dense(root / "other", "llama", tokenizer=False), None),
    ],
    ids=["family", "shape", "no-tokenizer"],
)
def test_sources_must_match_base(make, needle, models, capsys, tmp_path):
    other = make(tmp_path)
    out = tmp_path / "moe"
    argv = ["convert", models["base"], out, "--expert-from", models["a"], "--expert-from", other, "--experts", "2"]
    if needle is None:  # a source without tokenizer files is read with BASE's tokenizer: accepted
        convert(str(models["base"]), out, build_spec(experts=2, expert_from=(str(models["a"]), str(other))))
        return
    line = expect_error(capsys, argv, needle)
    assert str(other) in line and str(models["base"]) in line  # names both
    assert_clean(out)


def test_different_vocabulary_refused(models, capsys, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(models["a"], other)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (other / name).unlink()
    save_tokenizer(other, 40)  # same ids up to 40, then none: another vocabulary
    out = tmp_path / "moe"
    argv = ["convert", models["base"], out, "--expert-from", models["a"], "--expert-from", other, "--experts", "2"]
    line = expect_error(capsys, argv, "different tokenizer vocabulary")
    assert str(other) in line and str(models["base"]) in line  # names both
    assert_clean(out)


def test_chat_template_change_is_same_vocabulary(models, tmp_path):
    """A fine-tune's tokenizer_config (chat template) differs from BASE's: same ids, accepted."""
    other = tmp_path / "chat"
    shutil.copytree(models["a"], other)
    cfg = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps(cfg | {"chat_template": "{{ messages }}"}))
    convert(str(models["base"]), tmp_path / "moe", build_spec(experts=2, expert_from=(str(models["b"]), str(other))))


# --- the tensors besides the experts ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
def test_shared_weights_average(dtype, models, tmp_path):
    """--shared-weights average: each non-expert tensor is the float32 mean of the sources, then cast; the plan
    lists exactly the tensors that differ (C's attention), with the numbers measured on them."""
    out = tmp_path / "moe"
    pair = (str(models["a"]), str(models["c"]))
    spec = build_spec(experts=2, expert_from=pair, shared_weights="average", dtype=dtype)
    plan = convert(str(models["base"]), out, spec).plan
    a, c, base, written = tensors(models["a"]), tensors(models["c"]), tensors(models["base"]), tensors(out)
    cast = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    moved = 0
    for key in base:
        if ".mlp." in key:
            continue
        mean = (a[key].float() + c[key].float()) / 2
        assert torch.equal(written[key], mean.to(cast)), key
        moved += not torch.equal(mean, base[key])
    attn = sorted(k for k in base if "self_attn" in k)
    assert sorted(d.name for d in plan.differences) == attn and moved == len(attn)
    for d in plan.differences:
        assert d.differing == (2,)  # C, not A
        assert d.max_abs == pytest.approx(float((c[d.name].double() - base[d.name].double()).abs().max()))
        mean = (a[d.name].double() + c[d.name].double()) / 2
        rel = float((mean - base[d.name].double()).norm() / base[d.name].double().norm())
        assert d.relative == pytest.approx(rel)


def test_shared_weights_base(models, tmp_path):
    """The default: BASE's attention, norms and embeddings, byte for byte; the differences are still listed."""
    out = tmp_path / "moe"
    spec = build_spec(experts=2, expert_from=(str(models["a"]), str(models["c"])))
    plan = convert(str(models["base"]), out, spec).plan
    base, written = tensors(models["base"]), tensors(out)
    assert all(torch.equal(written[k], base[k]) for k in base if ".mlp." not in k)
    assert len(plan.differences) == len([k for k in base if "self_attn" in k])


def test_plan_table_names_differences(models, capsys, tmp_path):
    from upcycle_cli.main import run

    argv = ["convert", models["base"], tmp_path / "moe", "--expert-from", models["a"], "--expert-from", models["c"],
            "--experts", "2", "--shared-weights", "average", "--dry-run"]  # fmt: skip
    assert run([str(a) for a in argv]) == 0
    shown = capsys.readouterr().out
    assert "differ between the sources" in shown and "self_attn" in shown and "ft-c" in shown
    # verify's sources mode compares tensors, not logits (the MoE computes none of its sources): the plan says so
    assert "verify checks every tensor against its source" in flat(shown) and "checks the logits" not in shown
    assert not (tmp_path / "moe").exists()


def cast_to(folder: Path, dst: Path, dtype: torch.dtype) -> Path:
    """FOLDER's checkpoint with every tensor stored in DTYPE (a fine-tune saved in another dtype)."""
    shutil.copytree(folder, dst)
    for shard in dst.glob("*.safetensors"):
        save_file({k: v.to(dtype) for k, v in load_file(shard).items()}, shard, metadata={"format": "pt"})
    return dst


def flat(text: str) -> str:
    """A rich table's text with its borders and line breaks gone (a wrapped cell reads as one line)."""
    return " ".join(re.sub("[│┌┐└┘─┬┴├┤┼┃┏┓┗┛━┳┻┡┩╇]", " ", text).split())


def test_dry_run_casts_per_source(models, capsys, tmp_path):
    """Each --expert-from model's own casts into the written dtype, measured on its weights: a float32 fine-tune
    written as bfloat16 rounds exactly the values bf16 cannot hold; a bf16 one is written as is."""
    b16 = cast_to(models["b"], tmp_path / "ft-b16", torch.bfloat16)
    out = tmp_path / "moe"
    argv = ["convert", models["base"], out, "--expert-from", models["a"], "--expert-from", b16, "--experts", "2",
            "--dtype", "bfloat16", "--dry-run", "--json", "-"]  # fmt: skip
    capsys.readouterr()
    assert run_cli(argv) == 0
    cap = capsys.readouterr()
    plan = json.loads(cap.out)
    a, b = plan["source_casts"]
    values = rounded = 0
    big = 0.0
    for layer in range(json.loads((models["a"] / "config.json").read_text())["num_hidden_layers"]):
        for x in ffn(models["a"], layer).values():
            values += x.numel()
            rounded += int((x.to(torch.bfloat16).float() != x).sum())
            big = max(big, float(x.abs().max()))
    (cast,) = a["casts"]
    assert (a["source"], a["stored"], a["measured"]) == ("ft-a", ["F32"], True)
    assert (cast["src"], cast["dst"], cast["values"], cast["rounded"], cast["overflow"]) == ("F32", "BF16", values,
                                                                                              rounded, 0)  # fmt: skip
    assert cast["largest_abs"] == pytest.approx(big) and 0 < rounded <= values
    assert (b["source"], b["stored"], b["casts"], b["measured"]) == ("ft-b16", ["BF16"], [], True)
    shown = flat(cap.err)
    assert "casts of ft-a" in shown and f"{rounded:,} of {values:,} values rounded" in shown
    assert "none (stored as BF16, written as is)" in shown
    assert plan["shared_differences_measured"] and plan["unmeasured"] is None
    assert_clean(out)


def test_dry_run_gguf_source_says_what_is_not_measured(capsys, tmp_path, monkeypatch):
    """A GGUF model (the embedded SmolLM2) is not dequantized by a dry run: its casts come from its metadata and
    are said to be unmeasured, and so are the differences between the sources: never "0 differ"."""
    monkeypatch.setenv("UPCYCLE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "moe"
    argv = ["convert", "smollm2", out, "--expert-from", "smollm2", "--expert-from", "smollm2", "--experts", "2",
            "--dtype", "bfloat16", "--dry-run", "--json", "-"]  # fmt: skip
    capsys.readouterr()
    assert run_cli(argv) == 0
    cap = capsys.readouterr()
    plan = json.loads(cap.out)
    for row in plan["source_casts"]:
        assert row["source"] == "smollm2" and not row["measured"] and row["stored"] == ["F32"]
        assert [(c["src"], c["dst"], c["measured"]) for c in row["casts"]] == [("F32", "BF16", False)]
        assert "smollm2 is a GGUF file, which a dry run does not dequantize" in row["unmeasured"]
    assert not plan["shared_differences_measured"] and plan["shared_differences"] == []
    assert plan["unmeasured"].startswith("BASE HuggingFaceTB/SmolLM2-135M-Instruct is a GGUF file")
    shown = flat(cap.err)
    assert "differ between the sources" not in shown and "F32→BF16; not measured: smollm2 is a GGUF" in shown
    assert not (tmp_path / "cache").exists()
    assert_clean(out)


# --- streaming ----------------------------------------------------------------------------------------------


def test_repeated_experts_copied_from_output(models, monkeypatch, tmp_path):
    """A source's second clone is copied from the bytes its first clone already wrote, not read from the source."""
    from upcycle.convert.writer import ShardedWriter

    original, copied = ShardedWriter.put_range, []

    def put_range(self, name, src, offset, length):
        copied.append((name, Path(src).parent == self.folder))
        return original(self, name, src, offset, length)

    monkeypatch.setattr(ShardedWriter, "put_range", put_range)
    spec = build_spec(experts=4, expert_from=(str(models["a"]), str(models["b"])))
    convert(str(models["base"]), tmp_path / "moe", spec)
    from_output = {name for name, inside in copied if inside}
    experts = {name for name, _ in copied if ".experts." in name}
    assert from_output and from_output == {n for n in experts if ".experts.1." in n or ".experts.3." in n}


def test_one_layer_of_each_source_held(models, monkeypatch, tmp_path):
    """Computed experts (split) load each source's FFN one layer at a time, in order, each layer once."""
    from upcycle.source import Checkpoint

    original, loads = Checkpoint.load, []

    def load(self, name):
        if ".mlp." in name:
            loads.append((self.folder.name, int(name.split(".")[2])))
        return original(self, name)

    monkeypatch.setattr(Checkpoint, "load", load)
    spec = build_spec(experts=4, init="split", expert_from=(str(models["a"]), str(models["b"])))
    convert(str(models["base"]), tmp_path / "moe", spec)
    for source in ("ft-a", "ft-b"):
        layers = [layer for name, layer in loads if name == source]
        assert layers == sorted(layers) and len(layers) == 3 * 4  # gate, up, down of each of 4 layers, once
    assert all(name in ("ft-a", "ft-b") for name, _ in loads)  # BASE's FFN is never read


# --- routers --------------------------------------------------------------------------------------------------

SOURCE_PROMPTS = [["def add(a, b): return a + b", "import numpy as np"], ["The Senate passed the bill on Tuesday."]]


def router_rows(out: Path, plan) -> dict[int, torch.Tensor]:
    weights = tensors(out)
    return {op.layer: weights[op.name].float() for op in plan.ops if op.kind == "router"}


def test_cheap_embed_per_source(models, tmp_path):
    """mergekit's cheap_embed: row = normalised sum of BASE's token embeddings over BOS + each prompt, the same in
    every layer, scaled to a random row's norm; one prompt list per source stands for each of its experts."""
    from transformers import AutoTokenizer

    prompts = tmp_path / "prompts.yaml"
    prompts.write_text(json.dumps(SOURCE_PROMPTS))
    spec = build_spec(experts=4, expert_from=(str(models["a"]), str(models["b"])), router_init="cheap_embed",
                      expert_prompts=str(prompts))  # fmt: skip
    out = tmp_path / "moe"
    plan = convert(str(models["base"]), out, spec).plan
    tok = AutoTokenizer.from_pretrained(models["base"])
    embed = tensors(models["base"])["model.embed_tokens.weight"].double()
    want = []
    for texts in SOURCE_PROMPTS:
        ids = [i for t in texts for i in tok(tok.bos_token + t, add_special_tokens=False)["input_ids"]]
        total = embed[ids].sum(0)
        want.append(total / total.norm() * 0.02 * 32**0.5)  # router_std * sqrt(hidden)
    want = torch.stack([want[0], want[0], want[1], want[1]]).float()
    for rows in router_rows(out, plan).values():
        torch.testing.assert_close(rows, want, rtol=1e-5, atol=1e-7)
    recipe = json.loads((out / "upcycle.json").read_text())
    assert [s["prompts"] for s in recipe["sources"]] == SOURCE_PROMPTS


def test_hidden_per_source(models, tmp_path):
    """--router-init hidden with one prompt list per source: each source's experts get its rows (BASE's hidden
    states, as mergekit's hidden gate reads the base model)."""
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text(json.dumps(SOURCE_PROMPTS))
    out = tmp_path / "moe"
    spec = build_spec(experts=4, expert_from=(str(models["a"]), str(models["b"])), router_init="hidden",
                      expert_prompts=str(prompts))  # fmt: skip
    plan = convert(str(models["base"]), out, spec).plan
    for rows in router_rows(out, plan).values():
        assert torch.equal(rows[0], rows[1]) and torch.equal(rows[2], rows[3]) and not torch.equal(rows[0], rows[2])


@pytest.mark.parametrize("init", ["random", "zero"])
def test_random_and_zero(init, models, tmp_path):
    out = tmp_path / "moe"
    spec = build_spec(experts=4, expert_from=(str(models["a"]), str(models["b"])), router_init=init)
    rows = router_rows(out, convert(str(models["base"]), out, spec).plan)
    assert all(bool((r == 0).all()) is (init == "zero") for r in rows.values())


@pytest.mark.parametrize(
    ("prompts", "flags", "needle"),
    [
        (None, ["--router-init", "cheap_embed"], "--router-init cheap_embed needs --expert-prompts"),
        ([["a"], ["b"], ["c"]], ["--router-init", "cheap_embed"], "or one per --expert-from model: 2"),
        ([["a"], ["b"]], ["--router-init", "random"], "--expert-prompts applies to --router-init hidden or cheap"),
    ],
)
def test_bad_router_options(prompts, flags, needle, models, capsys, tmp_path):
    out = tmp_path / "moe"
    argv = ["convert", models["base"], out, "--expert-from", models["a"], "--expert-from", models["b"]]
    argv += ["--experts", "4"]
    if prompts is not None:
        (tmp_path / "p.yaml").write_text(json.dumps(prompts))
        argv += ["--expert-prompts", tmp_path / "p.yaml"]
    expect_error(capsys, [*argv, *flags], needle)
    assert_clean(out)


# --- verify ---------------------------------------------------------------------------------------------------


def run_cli(argv) -> int:
    from upcycle_cli.main import run

    return run([str(a) for a in argv])


@pytest.mark.parametrize(
    "spec",
    [
        dict(experts=4, shared_weights="average"),
        dict(experts=4, init="split", top_k=2),
        dict(experts=2, dtype="bfloat16"),
    ],
    ids=["clone-average", "split", "bf16-cast"],
)
def test_verify_each_tensor_against_its_source(spec, models, capsys, tmp_path):
    out = tmp_path / "moe"
    pair = (models["a"], models["c"])
    convert(str(models["base"]), out, build_spec(expert_from=tuple(map(str, pair)), **spec))
    capsys.readouterr()
    argv = ["verify", models["base"], out, "--expert-from", pair[0], "--expert-from", pair[1], "--json", "-"]
    assert run_cli(argv) == 0
    report = json.loads(capsys.readouterr().out)
    check = report["tensor_check"]
    assert report["mode"] == "sources" and report["passed"] and report["max_abs_diff"] is None
    assert check["equal"] == check["compared"] == len(tensors(out)) - 4  # all but the 4 routers
    assert check["skipped"] == 4 and not check["mismatched"]


def test_verify_finds_a_wrong_expert(models, capsys, tmp_path):
    """An expert swapped for another source's FFN is named; so is a model given in the wrong order."""
    out = tmp_path / "moe"
    convert(str(models["base"]), out, build_spec(experts=2, expert_from=(str(models["a"]), str(models["b"]))))
    for shard in out.glob("*.safetensors"):
        sd = load_file(shard)
        key = "model.layers.1.block_sparse_moe.experts.1.w2.weight"
        if key in sd:
            sd[key] = ffn(models["a"], 1)["down"].clone()
            save_file(sd, shard, metadata={"format": "pt"})
    capsys.readouterr()
    assert run_cli(["verify", models["base"], out, "--expert-from", models["a"], "--expert-from", models["b"]]) == 1
    shown = capsys.readouterr().out
    assert "tensor differs from its source: model.layers.1.block_sparse_moe.experts.1.w2.weight" in shown
    expect_error(capsys, ["verify", models["base"], out, "--expert-from", models["b"], "--expert-from", models["a"]],
                 "is not what")  # fmt: skip
    expect_error(capsys, ["verify", models["base"], out], "was made from 2 --expert-from models (ft-a, ft-b)")


# --- upcycle.json and the card --------------------------------------------------------------------------------


def test_recipe_and_card_name_the_sources(models, tmp_path, monkeypatch):
    """Local folders by their name (never a path), Hub sources by id and revision; base_model lists the Hub ones
    with the Hub's `merge` relation; the command reproduces the model."""
    import huggingface_hub.constants as hub_constants
    from huggingface_hub import ModelCard
    from test_hub import COMMIT, populate_cache

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    populate_cache(cache, "tiny-org/ft-b", models["b"])
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text(json.dumps(SOURCE_PROMPTS))
    out = tmp_path / "moe"
    spec = build_spec(experts=4, expert_from=(str(models["a"]), "tiny-org/ft-b"), router_init="cheap_embed",
                      expert_prompts=str(prompts), shared_weights="average")  # fmt: skip
    convert(str(models["base"]), out, spec, base_model="tiny-org/base")
    recipe = json.loads((out / "upcycle.json").read_text())
    text = (out / "upcycle.json").read_text() + (out / "README.md").read_text()
    assert str(tmp_path) not in text and str(models["a"]) not in text
    a, b = recipe["sources"]
    assert (a["id"], a["kind"], a["revision"], a["experts"]) == ("ft-a", "folder", None, [0, 1])
    assert (b["id"], b["kind"], b["revision"], b["experts"]) == ("tiny-org/ft-b", "hub", COMMIT, [2, 3])
    assert recipe["shared_weights"] == "average" and recipe["plan"]["sources"] == ["ft-a", "tiny-org/ft-b"]
    assert recipe["command"].startswith("upcycle convert base moe --expert-from ft-a --expert-from tiny-org/ft-b ")
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == ["tiny-org/base", "tiny-org/ft-b"] and card.data.base_model_relation == "merge"
    assert "| 0–1 | `ft-a` | def add(a, b): return a + b; import numpy as np |" in card.text
    assert f"[tiny-org/ft-b](https://huggingface.co/tiny-org/ft-b) at `{COMMIT[:12]}`" in card.text


# --- --shared-from ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shared", ["base", "a"])
def test_shared_from(shared, models, capsys, tmp_path):
    """Qwen2-MoE's always-on shared expert is the chosen model's FFN; the routed experts' down_proj is halved
    against its sigmoid(0) = 1/2 gate (as --shared-experts 1 does for one model); verify checks it."""
    out = tmp_path / "moe"
    pair = (str(models["a"]), str(models["b"]))
    given = str(models["base"]) if shared == "base" else pair[0]
    spec = build_spec(experts=2, expert_from=pair, shared_from=given, target="qwen2_moe")
    convert(str(models["base"]), out, spec)
    written, mine = tensors(out), ffn(models[shared], 0)
    for role in ("gate", "up", "down"):
        assert torch.equal(written[f"model.layers.0.mlp.shared_expert.{role}_proj.weight"], mine[role])
    for e, name in enumerate(("a", "b")):
        theirs = ffn(models[name], 0)
        assert torch.equal(written[f"model.layers.0.mlp.experts.{e}.down_proj.weight"], theirs["down"] / 2)
        assert torch.equal(written[f"model.layers.0.mlp.experts.{e}.up_proj.weight"], theirs["up"])
    capsys.readouterr()
    assert run_cli(["verify", models["base"], out, "--expert-from", pair[0], "--expert-from", pair[1]]) == 0


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--shared-from", "nowhere"], "--shared-from nowhere is neither base nor one of"),
        (["--shared-from", "base", "--init", "split", "--experts", "4"], "--init split is not supported with it"),
        (["--shared-experts", "1"], "needs --shared-from MODEL"),
        (
            ["--shared-from", "base", "--target", "mixtral"],
            "--shared-from needs a target class with a shared expert (qwen2_moe)",
        ),
    ],
)
def test_bad_shared_from(flags, needle, models, capsys, tmp_path):
    out = tmp_path / "moe"
    argv = ["convert", models["base"], out, "--expert-from", models["a"], "--expert-from", models["b"], *flags]
    expect_error(capsys, argv, needle)
    assert_clean(out)


def test_shared_from_under_auto_writes_qwen2_moe(models, capsys, tmp_path):
    """--target auto with --shared-from: Mixtral (the Llama family's every-layer choice) has no shared expert, so
    auto writes the family's Qwen2-MoE class, saying why, with the base FFN in the shared expert."""
    out = tmp_path / "moe"
    argv = ["convert", models["base"], out, "--expert-from", models["a"], "--expert-from", models["b"]]
    assert run_cli([*argv, "--shared-from", "base"]) == 0
    assert "--target auto wrote qwen2_moe, since --shared-from needs a target class" in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2_moe"
    written, mine = tensors(out), ffn(models["base"], 0)
    for role in ("gate", "up", "down"):
        assert torch.equal(written[f"model.layers.0.mlp.shared_expert.{role}_proj.weight"], mine[role])


# --- mergekit-moe recipes -------------------------------------------------------------------------------------


def mergekit_yaml(path: Path, text: str, **names: Path) -> Path:
    path.write_text(text.format(**{k: str(v) for k, v in names.items()}))
    return path


def test_mergekit_sparse_upcycling_example(models, tmp_path):
    """mergekit's docs: 'Sparse upcycling of smol_llama into a 8x220M MoE' (the same model 8 times, random gate,
    bfloat16): every expert is the base FFN, cast to bfloat16."""
    experts = "".join("  - source_model: {base}\n" for _ in range(8))
    cfg = mergekit_yaml(tmp_path / "moe.yml", "base_model: {base}\ngate_mode: random\ndtype: bfloat16\nexperts:\n"
                        + experts, base=models["base"])  # fmt: skip
    out = tmp_path / "moe"
    assert run_cli(["convert", "--mergekit-config", cfg, out]) == 0
    written, mine = tensors(out), ffn(models["base"], 2)
    recipe = json.loads((out / "upcycle.json").read_text())
    assert recipe["plan"]["experts"] == 8 and recipe["plan"]["top_k"] == 2 and recipe["dtype"] == "bfloat16"
    for e in range(8):
        got = written[f"model.layers.2.block_sparse_moe.experts.{e}.w2.weight"]
        assert torch.equal(got, mine["down"].to(torch.bfloat16))


CLOWN_CAR = """base_model: {base}
gate_mode: hidden
dtype: bfloat16
experts:
  - source_model: {base}
    positive_prompts:
      - "<|im_start|>user\\nHello, who are you?<|im_end|>"
      - "<|im_start|>user\\nI need help with"
  - source_model: {a}
    positive_prompts:
      - "As a doctor of medicine,"
  - source_model: {b}
    positive_prompts:
      - "[Genres: Science Fiction]\\n[Tags: humor, old school, sci fi]"
      - "> get ye flask"
      - "[Mode: Interactive Storyteller]"
  - source_model: {c}
    positive_prompts:
      - "<|im_start|>user\\nWie geht es dir?<|im_end|>"
      - "Das ist ein Satz auf Deutsch."
"""


def clown_car(models: dict[str, Path], path: Path) -> Path:
    return mergekit_yaml(path, CLOWN_CAR, base=models["base"], a=models["a"], b=models["b"], c=models["c"])


def test_mergekit_hidden_example(models, capsys, tmp_path):
    """mergekit's 'clown car' example as its docs give it (hidden gate, bfloat16, 4 experts with their prompts;
    the models are tiny stand-ins): one expert per entry, routers from the prompts, each expert its source's FFN
    cast to bfloat16, BASE's attention (C's differs: mergekit also takes BASE's); verify checks it."""
    cfg = clown_car(models, tmp_path / "moe.yml")
    out = tmp_path / "moe"
    assert run_cli(["convert", "--mergekit-config", cfg, out]) == 0
    recipe = json.loads((out / "upcycle.json").read_text())
    assert [s["id"] for s in recipe["sources"]] == ["base", "ft-a", "ft-b", "ft-c"]
    assert recipe["sources"][1]["prompts"] == ["As a doctor of medicine,"]
    assert recipe["sources"][3]["prompts"] == ["<|im_start|>user\nWie geht es dir?<|im_end|>",
                                               "Das ist ein Satz auf Deutsch."]  # fmt: skip
    assert recipe["recipe"]["router_init"] == "hidden" and recipe["dtype"] == "bfloat16"
    assert recipe["plan"]["experts"] == 4 and recipe["plan"]["top_k"] == 2
    written, base = tensors(out), tensors(models["base"])
    assert torch.equal(written["model.layers.1.block_sparse_moe.experts.3.w3.weight"],
                       ffn(models["c"], 1)["up"].to(torch.bfloat16))  # fmt: skip
    key = "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(written[key], base[key].to(torch.bfloat16))
    capsys.readouterr()
    argv = ["verify", models["base"], out] + [x for m in ("base", "a", "b", "c") for x in ("--expert-from", models[m])]
    assert run_cli(argv) == 0


def test_mergekit_recorded_command_reproduces(models, capsys, tmp_path, monkeypatch):
    """OUT keeps the YAML (models by folder name, never a path) and the recorded command converts from that copy,
    with the flags given beside it, never naming a temporary prompts file: run where the models are, it writes
    the same tensors and records the same command."""
    import shlex

    import yaml

    cfg = clown_car(models, tmp_path / "moe.yml")
    out = tmp_path / "moe"
    assert run_cli(["convert", "--mergekit-config", cfg, out, "--top-k", "1", "--router-std", "0.5"]) == 0
    recipe = json.loads((out / "upcycle.json").read_text())
    command = recipe["command"]
    assert command == "upcycle convert --mergekit-config mergekit_moe_config.yml moe --top-k 1 --router-std 0.5"
    assert recipe["mergekit_config"] == "mergekit_moe_config.yml"
    kept = (out / "mergekit_moe_config.yml").read_text()
    assert str(tmp_path) not in kept
    data = yaml.safe_load(kept)
    assert data["base_model"] == "base"
    assert [e["source_model"] for e in data["experts"]] == ["base", "ft-a", "ft-b", "ft-c"]
    assert data["experts"][2]["positive_prompts"] == ["[Genres: Science Fiction]\n[Tags: humor, old school, sci fi]",
                                                      "> get ye flask", "[Mode: Interactive Storyteller]"]  # fmt: skip
    card = (out / "README.md").read_text()
    assert command in card and "`mergekit_moe_config.yml` beside the weights" in card
    again = tmp_path / "again"
    again.mkdir()
    for name in ("base", "ft-a", "ft-b", "ft-c"):
        (again / name).symlink_to(models["base"].parent / name)
    shutil.copy(out / "mergekit_moe_config.yml", again)
    monkeypatch.chdir(again)
    capsys.readouterr()
    assert run_cli(shlex.split(command)[1:]) == 0
    first, second = tensors(out), tensors(again / "moe")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert json.loads((again / "moe" / "upcycle.json").read_text())["command"] == command


def test_mergekit_shared_expert_example_refused_by_field(models, capsys, tmp_path):
    """mergekit's shared-expert example (Qwen MoE) sets the shared expert's prompts and residual_scale: each is
    refused by name, in one line; without them it converts to Qwen2-MoE with that model's FFN shared."""
    text = ("base_model: {base}\ngate_mode: random\ndtype: float32\nexperts:\n  - source_model: {a}\n"
            "  - source_model: {b}\nshared_experts:\n  - source_model: {base}\n    positive_prompts:\n"
            "      - \"blah blah\"\n    residual_scale: 0.1\n")  # fmt: skip
    cfg = mergekit_yaml(tmp_path / "moe.yml", text, base=models["base"], a=models["a"], b=models["b"])
    out = tmp_path / "moe"
    line = expect_error(capsys, ["convert", "--mergekit-config", cfg, out], "cannot honour")
    assert "shared_experts[0].residual_scale" in line and "shared_experts[0].positive_prompts" in line
    assert_clean(out)
    cfg.write_text(text.split("    positive_prompts")[0].format(base=models["base"], a=models["a"], b=models["b"]))
    assert run_cli(["convert", "--mergekit-config", cfg, out]) == 0
    written = tensors(out)
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2_moe"
    assert torch.equal(written["model.layers.0.mlp.shared_expert.up_proj.weight"], ffn(models["base"], 0)["up"])


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ("gate_mode: uniform_random\n", "gate_mode uniform_random"),
        ("architecture: deepseek\n", "architecture deepseek"),
        ("merge_method: slerp\n", "merge_method (not a mergekit-moe field)"),
        ("dtype: int8\n", "dtype int8"),
    ],
)
def test_mergekit_fields_refused(extra, needle, models, capsys, tmp_path):
    text = "base_model: {base}\ngate_mode: random\nexperts:\n  - source_model: {a}\n    noise_scale: 0.01\n"
    cfg = mergekit_yaml(tmp_path / "moe.yml", text.replace("gate_mode: random\n", "") + extra if "gate" in extra
                        else text + extra, base=models["base"], a=models["a"])  # fmt: skip
    out = tmp_path / "moe"
    line = expect_error(capsys, ["convert", "--mergekit-config", cfg, out], needle)
    assert "experts[0].noise_scale" in line  # every field that cannot be honoured, in the one line
    assert_clean(out)


def test_mergekit_config_syntax_example_refused_by_field(models, capsys, tmp_path):
    """The config-syntax example of mergekit's docs: its second expert has no positive_prompts under the hidden
    gate (mergekit refuses that too: "Expert 1 has no positive prompts"), and with its optional negative_prompts
    uncommented those are refused as well, each named."""
    text = ("base_model: {base}\ngate_mode: hidden\ndtype: bfloat16\nexperts:\n  - source_model: {a}\n"
            "    positive_prompts:\n"
            "      - \"This is a prompt that is demonstrative of what expert_model_1 excels at\"\n"
            "{negative}  - source_model: {b}\n")  # fmt: skip
    negative = '    negative_prompts:\n      - "This is a prompt expert_model_1 should not be used for"\n'
    out = tmp_path / "moe"
    cfg = mergekit_yaml(tmp_path / "moe.yml", text, base=models["base"], a=models["a"], b=models["b"], negative="")
    line = expect_error(capsys, ["convert", "--mergekit-config", cfg, out], "experts[1] (gate_mode hidden needs")
    assert "negative_prompts" not in line
    mergekit_yaml(cfg, text, base=models["base"], a=models["a"], b=models["b"], negative=negative)
    line = expect_error(capsys, ["convert", "--mergekit-config", cfg, out], "experts[0].negative_prompts")
    assert "experts[1] (gate_mode hidden needs positive_prompts)" in line
    assert_clean(out)
    # prompts for the second expert too, negative ones left out: it converts, top-2 of 2 by mergekit's default
    mergekit_yaml(cfg, text + "    positive_prompts: [\"def f(x):\"]\n", base=models["base"], a=models["a"],
                  b=models["b"], negative="")  # fmt: skip
    assert run_cli(["convert", "--mergekit-config", cfg, out]) == 0
    assert json.loads((out / "upcycle.json").read_text())["plan"]["top_k"] == 2


@pytest.mark.parametrize(
    ("fields", "want"),
    [
        ("experts_per_token: 1\n", {"top_k": 1, "target": "mixtral"}),
        ("architecture: mixtral\n", {"top_k": 2, "target": "mixtral"}),
        ("architecture: qwen\n", {"top_k": 2, "target": "qwen2_moe"}),
        ("experts_per_token: 3\narchitecture: qwen\n", {"top_k": 3, "target": "qwen2_moe"}),
    ],
)
def test_mergekit_fields_mapped(fields, want, models, capsys, tmp_path):
    """experts_per_token -> --top-k, architecture -> --target; residual_scale 1 (mergekit's no-op) is accepted."""
    text = ("base_model: {base}\ngate_mode: random\n" + fields + "experts:\n  - source_model: {a}\n"
            "    residual_scale: 1.0\n  - source_model: {b}\n  - source_model: {c}\n")  # fmt: skip
    cfg = mergekit_yaml(tmp_path / "moe.yml", text, base=models["base"], a=models["a"], b=models["b"], c=models["c"])
    capsys.readouterr()
    out = tmp_path / "moe"
    assert run_cli(["convert", "--mergekit-config", cfg, out, "--dry-run", "--json", "-"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert (plan["top_k"], plan["target"], plan["experts"]) == (want["top_k"], want["target"], 3)
    assert_clean(out)


BODY = "base_model: {base}\ngate_mode: cheap_embed\n"
TWO = "  - source_model: {a}\n    positive_prompts: [x]\n  - source_model: {b}\n    positive_prompts: [y]\n"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (BODY + "experts_per_token: two\nexperts:\n" + TWO, "experts_per_token two (give a whole number from 1"),
        (BODY + "experts_per_token: 1.5\nexperts:\n" + TWO, "experts_per_token 1.5"),
        (BODY + "experts_per_token: 3\nexperts:\n" + TWO, "experts_per_token 3 (give a whole number from 1 to the 2"),
        (BODY + "experts_per_token: 0\nexperts:\n" + TWO, "experts_per_token 0"),
        (
            BODY + "experts:\n  - source_model: {a}\n    positive_prompts: just one string\n  - source_model: {b}\n"
            "    positive_prompts: [y]\n",
            "experts[0].positive_prompts (give a list of prompt strings)",
        ),
        (
            BODY + "experts:\n  - source_model: {a}\n    positive_prompts: [{{k: v}}]\n  - source_model: {b}\n"
            "    positive_prompts: [y]\n",
            "experts[0].positive_prompts (give a list of prompt strings)",
        ),
        (BODY + "experts:\n  a: {a}\n", "experts (give a list of entries, each with a source_model)"),
        (
            BODY + "experts_per_token: 1\nexperts:\n  - source_model: {a}\n    positive_prompts: [x]\n",
            "experts (upcycle makes an MoE of 2 experts or more; this recipe has 1)",
        ),
        (
            BODY + "experts:\n" + TWO + "shared_experts:\n  - source_model: {base}\n  - source_model: {a}\n",
            "shared_experts (upcycle fills one shared expert",
        ),
        (
            BODY + "architecture: mixtral\nexperts:\n" + TWO + "shared_experts:\n  - source_model: {base}\n",
            "architecture mixtral (upcycle writes mixtral, or qwen with one shared expert)",
        ),
        (
            BODY + "experts:\n  - source_model: {a}\n    positive_prompts: [x]\n    residual_scale: 0.5\n"
            "  - source_model: {b}\n    positive_prompts: [y]\n",
            "experts[0].residual_scale",
        ),
    ],
    ids=[
        "per-token-word",
        "per-token-float",
        "per-token-over",
        "per-token-zero",
        "prompts-string",
        "prompts-dict",
        "experts-dict",
        "one-expert",
        "two-shared",
        "mixtral-shared",
        "residual-scale",
    ],
)
def test_mergekit_bad_values_refused(text, needle, models, capsys, tmp_path):
    """Each value mergekit-moe's own config would reject, or upcycle cannot honour, is one line naming the field."""
    cfg = mergekit_yaml(tmp_path / "moe.yml", text, base=models["base"], a=models["a"], b=models["b"])
    out = tmp_path / "moe"
    line = expect_error(capsys, ["convert", "--mergekit-config", cfg, out], needle)
    assert line.startswith("error: --mergekit-config moe.yml: ")
    assert_clean(out)

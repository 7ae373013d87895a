"""The upcycling study's building blocks (benchmarks/study_corpus.py, benchmarks/net2net.py), on small inputs.

The whole study on real text runs in tests/test_benchmarks_smoke.py (`--preset smoke`).
"""

from __future__ import annotations

import importlib.util
import math
import random
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _tiny_llama(intermediate: int = 24, tied: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=16, intermediate_size=intermediate, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      tie_word_embeddings=tied)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("wider", [24, 25, 48, 53, 80])
def test_net2net_widening_keeps_the_logits(wider):
    net2net = _load("net2net")
    parent = _tiny_llama()
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(1))
    wide = net2net.widen_llama(parent, wider).eval()
    assert wide.config.intermediate_size == wider and wide.model.layers[0].mlp.gate_proj.weight.shape == (wider, 16)
    assert torch.allclose(_logits(wide, ids), _logits(parent, ids), atol=1e-5, rtol=0)
    extra = sum(p.numel() for p in wide.parameters()) - sum(p.numel() for p in parent.parameters())
    assert extra == 2 * 3 * 16 * (wider - 24)  # 2 layers × (gate, up, down) × hidden × new neurons


def test_net2net_noise_breaks_symmetry_and_keeps_the_sum():
    net2net = _load("net2net")
    parent = _tiny_llama(tied=False)
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(1))
    wide = net2net.widen_llama(parent, 48, noise=0.05, seed=3).eval()
    index = net2net.split_index(24, 48, 3)  # layer 0 uses seed + 0
    down, parent_down = wide.model.layers[0].mlp.down_proj.weight, parent.model.layers[0].mlp.down_proj.weight
    j = 24  # the first copy, of neuron index[24]
    src = int(index[j])
    assert not torch.allclose(down[:, j], down[:, src])  # the copies differ...
    assert torch.allclose(down[:, j] + down[:, src], parent_down[:, src], atol=1e-6)  # ...and sum to the parent's
    gate = wide.model.layers[0].mlp.gate_proj.weight
    assert torch.equal(gate[j], gate[src]) and torch.equal(gate[:24], parent.model.layers[0].mlp.gate_proj.weight)
    # the zero-sum noise keeps the function: only float rounding separates the logits
    assert torch.allclose(_logits(wide, ids), _logits(parent, ids), atol=1e-4, rtol=0)


def _files(n: int, shared: str) -> list[tuple[str, str]]:
    rng = random.Random(5)
    vocab = [f"w{i}" for i in range(400)]
    out = []
    for i in range(n):
        source = ("alpha", "beta", "gamma")[i % 3]
        paras = [" ".join(rng.choice(vocab) for _ in range(rng.randint(5, 60))) for _ in range(rng.randint(3, 12))]
        if i % 4 == 0:
            paras.insert(1, shared)  # the same paragraph in a quarter of the files: held out and trained on
        if i % 5 == 0:
            paras.append("See also:")  # a short paragraph shared by many files: markup, left in training
        if i % 3 == 1:
            paras.append("one two three four five six seven eight nine")  # 9 words: under 13, caught as equal
        out.append((f"{source}/f{i}.txt", "\n\n".join(paras)))
    return out


def test_split_holds_out_whole_files_and_cleans_training_of_their_text(tmp_path):
    corpus = _load("study_corpus")
    shared = " ".join(f"s{i}" for i in range(40))
    docs = corpus.documents(_files(60, shared))
    spec = corpus.SplitSpec(heldout_bytes=4000, valid_bytes=2000, continue_share=0.25)
    parts = corpus.assign(docs, spec)
    names = {p: {d.name for d in parts[p]} for p in parts}
    assert set().union(*names.values()) == {d.name for d in docs}  # every file somewhere...
    assert sum(len(v) for v in names.values()) == len(docs)  # ...and in one part only
    assert {d.source for d in parts["heldout"]} == {"alpha", "beta", "gamma"}  # stratified: each source held out
    cleaned, report = corpus.clean(parts)
    assert report["before"]["heldout"]["ngram13_share"] > 0  # the planted paragraph was there
    assert report["after"]["heldout"]["ngram13_share"] == 0 and report["after"]["valid"]["ngram13_share"] == 0
    assert report["after"]["heldout"]["verbatim_paragraphs"] == 0 and report["dropped_paragraphs"] > 0
    info = corpus.write_parts(cleaned, tmp_path)
    train = "".join((tmp_path / p / f"{p}.txt").read_text() for p in ("pretrain", "continue"))
    heldout = (tmp_path / "heldout" / "heldout.txt").read_text()
    assert shared in heldout and shared not in train
    nine = "one two three four five six seven eight nine"
    assert nine in heldout and nine not in train  # 9 equal words: gone from training
    assert "See also:" in heldout and "See also:" in train  # 2 words: markup, kept, and counted
    assert report["after"]["heldout"]["verbatim_short_paragraphs"] == 1
    # measured again from the files as written, independently of clean()'s bookkeeping
    held_words = corpus.words(heldout)
    grams = {tuple(held_words[i : i + 13]) for i in range(len(held_words) - 12)}
    train_words = corpus.words(train)
    assert not any(tuple(train_words[i : i + 13]) in grams for i in range(len(train_words) - 12))
    assert set(info["parts"]["heldout"]["file_names"]).isdisjoint(
        info["parts"]["pretrain"]["file_names"] + info["parts"]["continue"]["file_names"]
    )
    assert info["parts"]["heldout"]["sha256"] == corpus.sha256(tmp_path / "heldout" / "heldout.txt")
    assert sorted(info["heldout_by_source"]) == ["alpha", "beta", "gamma"]


def test_split_never_cuts_a_file_and_keeps_big_single_files_in_training():
    corpus = _load("study_corpus")
    big = ("jargon-text/jargon.txt", "\n\n".join(f"entry {i} " * 20 for i in range(500)))
    small = [(f"fortunes/f{i}", "\n\n".join(f"fortune {i} {k} " * 4 for k in range(30))) for i in range(20)]
    parts = corpus.assign(corpus.documents([big, *small]), corpus.SplitSpec(20_000, 8000, 0.3))
    assert "jargon-text/jargon.txt" in {d.name for p in ("pretrain", "continue") for d in parts[p]}
    assert all(d.source == "fortunes" for d in parts["heldout"] + parts["valid"]) and parts["heldout"]
    assert corpus.source_of("python-stdlib/test/test_os.py") == "python-stdlib/test"
    assert corpus.source_of("python-stdlib/tkinter/test/test_tkinter/test_font.py") == "python-stdlib/test"
    assert corpus.source_of("python-stdlib/email/parser.py") == "python-stdlib"
    assert corpus.source_of("python-stdlib/test.py") == "python-stdlib"
    assert corpus.source_of("fortunes/art") == "fortunes"


def test_lr_sweep_steps_one_rung_past_the_edge_its_best_sits_at():
    study = _load("upcycle_vs_dense")
    assert study.SWEEP_LRS == (1e-4, 3e-4, 1e-3)
    assert study.beyond_edge((1e-3, 1)) == 3e-3 and study.beyond_edge((1e-4, -1)) == 3e-5
    assert study.beyond_edge((3e-3, 1)) == 1e-2 and study.beyond_edge((3e-4, -1)) == 1e-4
    assert study.beyond_edge(None) is None
    runs = [{"arm": "dense", "lr": lr, "evals": [{"tokens": 1, "eval_loss": loss}, {"tokens": 2, "eval_loss": loss}]}
            for lr, loss in ((1e-4, 5.0), (3e-4, 4.8), (1e-3, 4.6), (3e-3, float("nan")))]  # fmt: skip
    ppl, edge = study.sweep_table({"sweep_runs": runs}, "dense", study.SWEEP_LRS)
    assert sorted(ppl) == [1e-4, 3e-4, 1e-3] and edge == (1e-3, 1)  # best at the top: one step up
    ppl, edge = study.sweep_table({"sweep_runs": runs}, "dense", [1e-4, 3e-4, 1e-3, 3e-3])
    assert edge is None  # the diverged 3e-3 run ranks last, so 1e-3 is inside the extended grid
    assert ppl[1e-3] == pytest.approx(math.exp(4.6))


def test_published_results_name_the_work_and_text_cache_folders_not_their_paths(tmp_path, monkeypatch):
    study = _load("upcycle_vs_dense")
    work, cache = tmp_path / "study" / "cpu", tmp_path / "texts"
    monkeypatch.setattr(study, "TEXT_CACHE", [cache])
    command = f"python benchmarks/upcycle_vs_dense.py --preset cpu --work {work} --text-cache {cache}"
    got = study.published({"command": command, "runs": [f"{work}/runs/dense"]}, work)
    assert got == {
        "command": "python benchmarks/upcycle_vs_dense.py --preset cpu --work <work> --text-cache <text-cache>",
        "runs": ["<work>/runs/dense"],
    }


def test_part_seconds_sums_each_process_of_a_resumed_run_once():
    """A resumed run's metrics hold the first process's records up to its checkpoint, then the next process's,
    each stamped from its own start: one part per process, each to its last record."""
    study = _load("upcycle_vs_dense")
    records = [{"kind": "train", "elapsed_s": t} for t in (1.0, 2.5, 4.0)]  # first process, up to its checkpoint
    records += [{"kind": "eval", "elapsed_s": 0.5}, {"kind": "train", "elapsed_s": 3.0}]  # resumed
    records += [{"kind": "train", "elapsed_s": 0.2}, {"kind": "summary"}]  # resumed again, killed early
    assert study.part_seconds(records) == [4.0, 3.0, 0.2]
    assert study.part_seconds([]) == []


def test_longest_first_orders_by_each_models_measured_speed_then_by_flops():
    """The runner starts the longest runs first: by the seconds per token its model took in the study's runs so
    far (dense-nowarm trains dense's parent, moe-all-flop moe-all's MoE), else by FLOPs per token."""
    study = _load("upcycle_vs_dense")
    tokens = {"dense": 100, "dense-nowarm": 100, "moe-all": 100, "moe-all-flop": 60, "dense-wide": 100}
    jobs = [{"arm": a, "tokens": t} for a, t in tokens.items()]
    record = {"flops_per_token": {"dense": 1.0, "dense-nowarm": 1.0, "dense-wide": 1.5, "moe-all": 1.5,
                                  "moe-all-flop": 1.5}}  # fmt: skip
    by_flops = [j["arm"] for j in study.longest_first(jobs, record)]
    assert by_flops == ["moe-all", "dense-wide", "dense", "dense-nowarm", "moe-all-flop"]  # 150, 150, 100, 100, 90
    # the sweep measured MoE runs at 3x dense's seconds per token and the widened dense at 1.2x
    record["sweep_runs"] = [{"arm": "dense", "tokens": 10, "wall_s": 10.0}, {"arm": "moe-all", "tokens": 10,
                            "wall_s": 30.0}, {"arm": "dense-wide", "tokens": 10, "wall_s": 12.0},
                            {"arm": "dense", "tokens": 10, "wall_s": 99.0, "resumed_from_step": 3}]  # fmt: skip
    by_speed = [j["arm"] for j in study.longest_first(jobs, record)]
    assert by_speed == ["moe-all", "moe-all-flop", "dense-wide", "dense", "dense-nowarm"]  # 300, 180, 120, 100, 100
    # a model not measured yet: FLOPs for all, not a mix of two scales
    assert [j["arm"] for j in study.longest_first([*jobs, {"arm": "drop-r0.5", "tokens": 100}], record)][:2] == [
        "moe-all", "dense-wide"]  # fmt: skip

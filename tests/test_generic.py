"""`--target generic`: upcycle's own MoE wrapper for dense families with no exact native MoE class.

Tiny random models of each family, with their real quirks (tests/tiny.py), are converted with cloned experts on
every layer and on every other layer. A fresh interpreter that never imports upcycle loads each with plain
transformers and trust_remote_code=True and must reproduce the dense logits; upcycle's own commands load them
without trust_remote_code.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from upcycle.arch import families, generic_target
from upcycle.convert.pipeline import convert
from upcycle.convert.spec import build_spec
from upcycle.errors import UpcycleError
from upcycle.generic import AUTO_MAP, CODE_FILES
from upcycle_cli.main import run

# family -> config overrides of the tiny model (tests/tiny.py holds each family's quirks)
CASES = {
    "gpt2": {},
    "qwen3": {},  # with a shared expert: no native class has one for Qwen3 (SHARED below)
    "gemma2": {},
    "llama-bias": dict(attention_bias=True, mlp_bias=True),
    "phi": {},
    "olmo": {},
    "gemma3_text": {},
    "glm": {},
    "glm4": {},
    "phi4-mini": dict(partial_rotary_factor=0.5),  # Phi-3's class with partial rotary: no native MoE form
    # Qwen3 with sliding-window layers above max_window_layers and full ones below: Qwen3-MoE has one window for all
    "qwen3-mixed": dict(use_sliding_window=True, sliding_window=8, max_window_layers=2),
}
MODEL_TYPE = {"llama-bias": "llama", "phi4-mini": "phi3", "qwen3-mixed": "qwen3"}
# Qwen3 + an always-on shared expert (Qwen2-MoE's sigmoid-gated kind): clone (routed down_proj halved) and split
SHARED = {
    "qwen3": [dict(shared_experts=1), dict(shared_experts=1, init="split", experts=3, top_k=3, router_init="zero")]
}


def options_of(case: str) -> list[dict]:
    return SHARED.get(case, [{}])


def dense_of(dense_store, case: str) -> Path:
    return dense_store(MODEL_TYPE.get(case, case), **CASES[case])


@pytest.fixture(scope="session")
def generic_store(dense_store, tmp_path_factory):
    """generic_store(case, every, **options) -> a tiny dense model of CASE converted with --target generic (4 experts,
    top-2 unless OPTIONS say otherwise)."""
    root = tmp_path_factory.mktemp("generic")
    made: dict[tuple, Path] = {}

    def get(case: str, every: int = 1, **options) -> Path:
        key = (case, every, *sorted(options.items()))
        if key not in made:
            out = root / "-".join([case, f"every{every}", *(f"{k}{v}" for k, v in sorted(options.items()))])
            spec = build_spec(**{"target": "generic", "experts": 4, "top_k": 2, "every": every} | options)
            convert(str(dense_of(dense_store, case)), out, spec)
            made[key] = out
        return made[key]

    return get


def keys_of(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as fh:
            out |= {k: fh.get_tensor(k) for k in fh.keys()}
    return out


FRESH = textwrap.dedent(
    """
    import json, sys
    sys.modules["upcycle"] = None  # upcycle is installed here, but any import of it now fails: plain transformers only
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    ids = torch.randint(3, 128, (2, 24))  # longer than the sliding windows (8) of the tiny Gemmas
    for dense_dir, moe_dir in json.loads(sys.argv[1]):
        dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
        moe, info = AutoModelForCausalLM.from_pretrained(
            moe_dir, dtype=torch.float32, trust_remote_code=True, output_loading_info=True
        )
        moe.eval()
        default = moe.config._experts_implementation
        with torch.no_grad():
            want, got = dense(ids).logits, moe(ids).logits
            same_generation = torch.equal(  # the dense class's own cache and generation, sliding windows included
                dense.generate(ids[:1], max_new_tokens=6, do_sample=False),
                moe.generate(ids[:1], max_new_tokens=6, do_sample=False),
            )
            moe.set_experts_implementation("eager")
            eager = moe(ids).logits
        print(json.dumps({
            "moe": moe_dir,
            "class": type(moe).__name__,
            "missing": sorted(info["missing_keys"]),
            "unexpected": sorted(info["unexpected_keys"]),
            "delta": float((want - got).abs().max()),
            "eager_vs_default": float((eager - got).abs().max()),
            "default": default,
            "finite": bool(torch.isfinite(got).all()),
            "same_generation": same_generation,
        }))
    print(json.dumps({"upcycle_imported": any(m.startswith("upcycle.") for m in sys.modules)}))
    """
)


@pytest.mark.slow
def test_a_fresh_interpreter_without_upcycle_loads_every_family_exactly(generic_store, dense_store, tmp_path):
    pairs = [(str(dense_of(dense_store, case)), str(generic_store(case, every))) for case in CASES for every in (1, 2)]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)} | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", FRESH, json.dumps(pairs)],
        cwd=tmp_path,  # not the repository: nothing of upcycle on the path but the installed package, never imported
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert rows[-1] == {"upcycle_imported": False}
    assert len(rows) == len(pairs) + 1
    for row in rows[:-1]:
        assert row["class"] == "UpcycleMoeForCausalLM", row
        assert row["missing"] == [] and row["unexpected"] == [], row
        assert row["finite"] and row["delta"] <= 1e-5, row
        assert row["default"] == "grouped_mm" and row["same_generation"], row
        assert row["eager_vs_default"] <= 1e-6, row


@pytest.mark.slow
@pytest.mark.parametrize("every", [1, 2])
@pytest.mark.parametrize("case", list(CASES))
def test_upcycle_verify_passes_without_trust_remote_code(case, every, generic_store, dense_store, tmp_path, capsys):
    moe = generic_store(case, every, **options_of(case)[-1])
    report = tmp_path / "verify.json"
    code = run(["verify", str(dense_of(dense_store, case)), str(moe), "--json", str(report), "--no-record"])
    assert code == 0, capsys.readouterr()
    data = json.loads(report.read_text())
    assert data["passed"] and data["moe_class"] == "UpcycleMoeForCausalLM" and data["plan_exact"]
    assert data["max_abs_diff"] <= 1e-5 and data["top1_agreement"] == 1.0
    assert data["missing_keys"] == [] and data["unexpected_keys"] == []


@pytest.mark.slow
@pytest.mark.parametrize("case, options", [("gpt2", {}), ("qwen3", SHARED["qwen3"][1])])
def test_layerwise_verify_checks_every_copied_tensor(case, options, generic_store, dense_store, tmp_path, capsys):
    moe = generic_store(case, 2, **options)
    report = tmp_path / "verify.json"
    code = run(
        ["verify", str(dense_of(dense_store, case)), str(moe), "--layerwise", "--json", str(report), "--no-record"]
    )
    assert code == 0, capsys.readouterr()
    data = json.loads(report.read_text())
    assert data["mode"] == "layerwise" and data["max_abs_diff"] <= 1e-5
    check = data["tensor_check"]
    assert check["passed"] and check["compared"] > 0 and check["mismatched"] == [] and check["missing"] == []
    assert check["equal"] == check["compared"] and (check["computed"] > 0) == (case == "qwen3"), check  # split
    assert [row["layer"] for row in data["layers"] if row["moe"]] == [1, 3]
    assert all(row["passed"] for row in data["layers"])


def test_experts_keep_the_dense_mlp_names_layout_and_bytes(generic_store, dense_store, tmp_path):
    moe, dense = keys_of(generic_store("gpt2", 2)), keys_of(dense_of(dense_store, "gpt2"))
    for layer in (1, 3):
        base = f"transformer.h.{layer}.mlp"
        assert f"{base}.c_fc.weight" not in moe and moe[f"{base}.router.weight"].shape == (4, 32)
        for e in range(4):
            for name in ("c_fc.weight", "c_fc.bias", "c_proj.weight", "c_proj.bias"):
                assert torch.equal(moe[f"{base}.experts.{e}.{name}"], dense[f"{base}.{name}"])
        assert moe[f"{base}.experts.0.c_fc.weight"].shape == (32, 128)  # Conv1D: [in, out], as GPT-2 stores it
    for layer in (0, 2):  # dense layers keep their MLP
        assert torch.equal(
            moe[f"transformer.h.{layer}.mlp.c_fc.weight"], dense[f"transformer.h.{layer}.mlp.c_fc.weight"]
        )
    assert set(moe) - {k for k in moe if ".experts." in k or ".router." in k} == {
        k for k in dense if not (k.startswith(("transformer.h.1.mlp.", "transformer.h.3.mlp.")))
    }
    folder = generic_store("gpt2", 2)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "upcycle_moe" and config["dense_model_type"] == "gpt2"
    assert config["auto_map"] == AUTO_MAP and config["moe_layers"] == [1, 3]
    assert config["mlp"]["transposed"] is True and config["mlp"]["gate"] is None
    assert config["n_embd"] == config["hidden_size"] == 32  # the dense fields, and the standard names beside them
    card = (folder / "README.md").read_text()
    assert 'AutoModelForCausalLM.from_pretrained("gpt2-every2", trust_remote_code=True)' in card
    assert 'AutoTokenizer.from_pretrained("gpt2-every2", trust_remote_code=True)' in card and "- custom_code" in card
    assert "**`trust_remote_code=True`**: transformers has no MoE class that holds" in card
    assert run(["inspect", str(folder), "--json", str(tmp_path / "inspect.json")]) == 0
    shown = json.loads((tmp_path / "inspect.json").read_text())
    assert shown["moe_layers"] == [1, 3] and shown["experts"] == 4 and shown["kind"] == "moe"
    for name in CODE_FILES:
        assert (folder / name).read_text() == (Path(__file__).parent.parent / "upcycle/generic" / name).read_text()


def test_qwen3_gets_a_shared_expert_through_the_generic_path(generic_store, dense_store, tmp_path, capsys):
    qwen3 = dense_of(dense_store, "qwen3")
    assert run(["convert", str(qwen3), str(tmp_path / "out"), "--shared-experts", "1", "--target", "qwen3_moe"]) == 2
    assert "--target generic, upcycle's own wrapper, also holds one" in " ".join(capsys.readouterr().err.split())
    assert run(["convert", str(qwen3), str(tmp_path / "auto"), "--shared-experts", "1", "--dry-run"]) == 0
    assert "--target auto wrote generic, since" in " ".join(capsys.readouterr().err.split())  # issue 22
    moe, dense = keys_of(generic_store("qwen3", 2, shared_experts=1)), keys_of(qwen3)
    for layer in (1, 3):
        base = f"model.layers.{layer}.mlp"
        assert torch.equal(moe[f"{base}.shared_expert_gate.weight"], torch.zeros(1, 32))  # sigmoid(0) = 1/2
        for name in ("gate_proj", "up_proj", "down_proj"):
            assert torch.equal(moe[f"{base}.shared_expert.{name}.weight"], dense[f"{base}.{name}.weight"])
        for e in range(4):  # the routed half: down_proj halved, so the two halves add up to the dense FFN
            assert torch.equal(moe[f"{base}.experts.{e}.down_proj.weight"], dense[f"{base}.down_proj.weight"] / 2)
            assert torch.equal(moe[f"{base}.experts.{e}.up_proj.weight"], dense[f"{base}.up_proj.weight"])
    config = json.loads((generic_store("qwen3", 2, shared_experts=1) / "config.json").read_text())
    assert config["shared_expert_intermediate_size"] == config["moe_intermediate_size"] == 64


def test_auto_takes_the_generic_path_only_when_no_native_target_is_exact(dense_store, tmp_path, capsys):
    biased = dense_of(dense_store, "llama-bias")
    code = run(["convert", str(biased), str(tmp_path / "out"), "--dry-run"])
    out = capsys.readouterr()
    assert code == 0, out.err
    shown = " ".join((out.out + out.err).split())
    assert "UpcycleMoeForCausalLM" in shown and "attention_bias=True" in shown and "trust_remote_code=True" in shown
    code = run(["convert", str(dense_store("llama")), str(tmp_path / "out"), "--dry-run"])
    out = capsys.readouterr()
    assert code == 0 and "MixtralForCausalLM" in out.out and "trust_remote_code" not in out.out + out.err


def test_refusals_name_the_generic_path(dense_store, tmp_path, capsys):
    gpt2 = str(dense_of(dense_store, "gpt2"))
    for args, message in [
        (["--target", "mixtral"], "choose --target generic"),
        (["--target", "generic", "--init", "split"], "gated, bias-free MLPs only; this gpt2 model has a Conv1D MLP"),
        (["--target", "generic", "--shared-experts", "1"], "Use --init clone"),
        (["--target", "generic", "--router-init", "kmeans", "--calibration", gpt2], "not available with --target"),
    ]:
        assert run(["convert", gpt2, str(tmp_path / "out"), *args]) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert message in err, err
        assert not (tmp_path / "out").exists()
    glm = str(dense_of(dense_store, "glm"))
    assert run(["convert", glm, str(tmp_path / "out"), "--init", "drop"]) == 2
    assert "this glm model has a fused gate_up MLP" in " ".join(capsys.readouterr().err.split())
    biased = str(dense_of(dense_store, "llama-bias"))
    assert run(["convert", biased, str(tmp_path / "out"), "--target", "mixtral"]) == 2
    assert "--target generic keeps it exactly" in " ".join(capsys.readouterr().err.split())


def test_generic_targets_are_tables_of_the_families():
    for fam in families().values():
        if not fam.mlp:
            continue
        target = generic_target(fam.name)
        path = fam.mlp["path"]
        assert target.modules == {
            "router": f"{path}.router",
            "experts": f"{path}.experts",
            "router_bias": f"{path}.router.e_score_correction_bias",
        }
        assert set(target.expert) == {r for r in ("gate", "up", "gate_up", "down") if fam.mlp.get(r)}
        stored = {*fam.ffn.values(), *fam.views}  # Phi-3's gate_up_proj is stored fused; the native path views it
        assert all(f"{path}.{fam.mlp[role]}.weight" in stored for role in target.expert), fam.name


@pytest.mark.slow
def test_a_generic_model_trains_and_its_routing_is_read(generic_store, jargon_text, tmp_path, capsys):
    from upcycle.train import loop
    from upcycle.train.metrics import read_metrics
    from upcycle.train.spec import build_train_spec

    text = tmp_path / "text.txt"
    text.write_text(jargon_text.read_text()[:40_000])
    moe = generic_store("gpt2", 2)  # ungated, biased, Conv1D experts, every other layer
    spec = build_train_spec(
        data=str(text), seq_len=32, micro_batch=4, steps=12, lr=3e-3, log_every=1, eval_every=6, save_every=6
    )
    result = loop.train(str(moe), tmp_path / "run", spec)
    records = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "train"]
    assert len(records) == 12 and all(math.isfinite(r["loss"]) for r in records)
    first, last = sum(r["lm"] for r in records[:3]) / 3, sum(r["lm"] for r in records[-3:]) / 3
    assert last < first - 0.2, (first, last)
    assert all(r["balance"] > 0 and r["z"] > 0 for r in records)  # the Switch hooks saw the wrapper's routers
    assert [row["layer"] for row in records[-1]["layers"]] == [1, 3]
    assert result.summary["experts_implementation"] == "grouped_mm"
    final = tmp_path / "run" / "final"
    assert json.loads((final / "config.json").read_text())["model_type"] == "upcycle_moe"
    assert all((final / name).is_file() for name in CODE_FILES)
    assert run(["routing", str(final), "--text", str(text), "--out", str(tmp_path / "report")]) == 0
    report = json.loads((tmp_path / "report" / "routing.json").read_text())
    assert report["architecture"] == "UpcycleMoeForCausalLM" and report["moe_layers"] == [1, 3]


def test_an_unknown_generic_family_is_refused():
    from upcycle.arch import target_for_config

    assert target_for_config({"model_type": "upcycle_moe", "dense_model_type": "bert"}) is None
    with pytest.raises(UpcycleError, match="not supported"):
        from upcycle.convert.planner import make_plan

        make_plan({"model_type": "bert"}, {}, build_spec(target="generic"))


def test_gpt2_saved_the_original_way_converts(dense_store, tmp_path, capsys):
    """openai-community/gpt2's own files name tensors without `transformer.` and hold the causal-mask buffers."""
    from safetensors.torch import save_file

    src = tmp_path / "gpt2-original"
    src.mkdir()
    dense = dense_of(dense_store, "gpt2")
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        (src / name).write_bytes((dense / name).read_bytes())
    renamed = {k.removeprefix("transformer."): v for k, v in keys_of(dense).items()}
    for layer in range(4):
        renamed[f"h.{layer}.attn.bias"] = torch.tril(torch.ones(256, 256))[None, None]
        renamed[f"h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(renamed, src / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "moe"
    assert run(["convert", str(src), str(out), "--target", "generic", "--experts", "4", "--every", "2"]) == 0
    assert "left out h.0.attn.bias (and 7 more)" in " ".join(capsys.readouterr().err.split())
    written = keys_of(out)
    assert torch.equal(written["transformer.h.1.mlp.experts.2.c_fc.weight"], renamed["h.1.mlp.c_fc.weight"])
    assert torch.equal(written["transformer.wte.weight"], renamed["wte.weight"])
    assert not any(k.startswith("h.") or k.endswith((".attn.bias", ".attn.masked_bias")) for k in written)
    assert run(["verify", str(src), str(out), "--no-record"]) == 0, capsys.readouterr()

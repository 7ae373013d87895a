"""What a new user trips over (issue 28): messages that say what is wrong and what to do."""

from __future__ import annotations

import json
import shutil
from collections import namedtuple
from pathlib import Path

import pytest

from upcycle.convert.spec import build_spec
from upcycle.errors import UpcycleError
from upcycle.train.spec import build_train_spec
from upcycle_cli.main import run


def one_error(capsys, argv: list, code: int = 2) -> str:
    capsys.readouterr()
    assert run([str(a) for a in argv]) == code
    cap = capsys.readouterr()
    assert "Traceback" not in cap.out + cap.err
    lines = cap.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), cap.err
    return lines[0]


def moe_of(src: Path, out: Path, *flags: str) -> Path:
    assert run(["convert", str(src), str(out), "--experts", "4", *flags]) == 0
    return out


# --- convert of a model that is already an MoE -------------------------------------------------------------


@pytest.mark.parametrize("target", ["qwen2_moe", "mixtral"])
def test_convert_of_an_moe_says_it_is_one(capsys, dense_store, tmp_path, target):
    moe = moe_of(dense_store("llama"), tmp_path / "moe", "--target", target)
    line = one_error(capsys, ["convert", moe, tmp_path / "again"])
    assert f"'{target}' is already a Mixture-of-Experts model" in line
    assert "upcycle train" in line and "upcycle routing" in line and "not supported" not in line
    assert not (tmp_path / "again").exists()


# --- a key typo suggests the near key ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "build, key, near",
    [(build_spec, "topk", "top_k"), (build_spec, "expert", "experts"), (build_train_spec, "micro_batc", "micro_batch"),
     (build_train_spec, "stepz", "steps"), (build_train_spec, "zzz", None)],
)  # fmt: skip
def test_unknown_key_suggests_the_near_one(build, key, near):
    with pytest.raises(UpcycleError) as err:
        build({key: 1})
    text = str(err.value)
    assert f"unknown key {key!r}" in text and "known keys:" in text
    if near:
        assert f"did you mean {near!r}?" in text
    else:
        assert "did you mean" not in text


def test_recipe_typo_on_the_command_line(capsys, dense_store, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("experts: 4\ntopk: 2\n")
    line = one_error(capsys, ["convert", dense_store("llama"), tmp_path / "out", "--config", recipe])
    assert "did you mean 'top_k'?" in line


# --- the plan table says why it is not exact ---------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, why",
    [(["--init", "drop"], "re-initialised at random"), (["--dtype", "bfloat16"], "F32→BF16 cast rounds")],
)
def test_plan_table_gives_the_reason_for_not_exact(capsys, dense_store, tmp_path, flags, why):
    capsys.readouterr()
    assert run(["convert", str(dense_store("llama")), str(tmp_path / "o"), "--dry-run", *flags]) == 0
    out = " ".join(capsys.readouterr().out.split())  # the table wraps long cells
    cells = [c.strip() for c in out.split("│")]
    assert "exact at init" in cells
    reason = " ".join(cells[cells.index("exact at init") + 1 :][:6])
    assert reason.startswith("no: ")
    assert why.split()[0] in reason


# --- verify refuses a pair that cannot be dense + its MoE -------------------------------------------------


def test_verify_refuses_a_dense_other(capsys, dense_store):
    src = dense_store("llama")
    line = one_error(capsys, ["verify", src, dense_store("qwen2")])
    assert "is not an MoE" in line and "qwen2 model" in line and "no experts" in line


def test_verify_refuses_an_moe_of_another_shape(capsys, dense_store, tmp_path):
    other = moe_of(dense_store("llama", hidden_size=48), tmp_path / "moe")
    line = one_error(capsys, ["verify", dense_store("llama"), other])
    assert "was not upcycled from" in line and "hidden size 48" in line


def test_verify_refuses_an_moe_of_another_family(capsys, dense_store, tmp_path):
    llama, qwen = dense_store("llama"), dense_store("qwen2")
    shape = ("hidden_size", "num_hidden_layers", "vocab_size")
    cfgs = [json.loads((m / "config.json").read_text()) for m in (llama, qwen)]
    assert [c[k] for k in shape for c in cfgs[:1]] == [c[k] for k in shape for c in cfgs[1:]]  # only the family differs
    other = moe_of(qwen, tmp_path / "moe", "--target", "qwen2_moe")
    line = one_error(capsys, ["verify", llama, other])
    assert "was upcycled from a qwen2 model" in line and "is a llama model" in line


def test_verify_of_dense_and_its_moe_still_runs(capsys, dense_store, tmp_path):
    moe = moe_of(dense_store("llama"), tmp_path / "moe")
    assert run(["verify", str(dense_store("llama")), str(moe), "--no-record"]) == 0


# --- the free-space message says how the need is computed ---------------------------------------------------


def test_free_space_message_gives_weights_and_side_files(capsys, monkeypatch, dense_store, tmp_path):
    src = dense_store("llama")
    capsys.readouterr()
    assert run(["convert", str(src), str(tmp_path / "real"), "--experts", "4", "--json", str(tmp_path / "p.json")]) == 0
    written = sum(p.stat().st_size for p in (tmp_path / "real").iterdir())
    weights = json.loads((tmp_path / "p.json").read_text())
    weights = weights.get("plan", weights).get("bytes")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9, 1000))
    line = one_error(capsys, ["convert", src, tmp_path / "out", "--experts", "4"])
    assert "of weights plus" in line and "for the tokenizer, config, card and file headers" in line
    need = line.split("the MoE needs ")[1].split(" (")[0]
    value, unit = need.split()
    need_bytes = float(value) * {"KB": 1e3, "MB": 1e6, "GB": 1e9}[unit]
    assert written <= need_bytes  # the requirement covers what convert really writes
    if weights:
        assert need_bytes < weights + (2 << 20) + 1e4  # and the margin is not a fixed 64 MB any more

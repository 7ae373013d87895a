"""The bad-input catalogue: every mistake a user can make gives exit code 2, one line `error: ...` on stderr,
no traceback, and leaves no OUT folder (nor a temporary folder beside it) behind."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from upcycle.errors import UpcycleError
from upcycle_cli.main import run


def leftovers(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.tmp-*")) + sorted(out.parent.glob(f".{out.name}.old-*"))


def assert_clean(out: Path) -> None:
    assert not out.exists(), f"{out} was created"
    assert not leftovers(out), f"temporary folders left beside {out}: {leftovers(out)}"


def expect_error(capsys, argv: list[str], needle: str) -> str:
    """Run the CLI and check the one-line error contract; returns the error line."""
    capsys.readouterr()  # drop what building the test's input printed (fixtures, save_pretrained)
    code = run([str(a) for a in argv])
    cap = capsys.readouterr()
    assert "Traceback" not in cap.out + cap.err
    assert code == 2, (code, cap.out, cap.err)
    lines = cap.err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {cap.err!r}"
    line = lines[0]
    assert line.startswith("error: ") and line[len("error: ") :].strip(), line
    assert needle.lower() in line.lower(), f"{needle!r} not in {line!r}"
    return line


@pytest.fixture
def out(tmp_path) -> Path:
    return tmp_path / "out"


# --- SRC ---------------------------------------------------------------------------------------------------


def test_src_missing(capsys, tmp_path, out):
    expect_error(capsys, ["convert", tmp_path / "no-such-model", out], "does not exist")
    assert_clean(out)


def test_src_without_config(capsys, tmp_path, out):
    src = tmp_path / "empty"
    src.mkdir()
    expect_error(capsys, ["convert", src, out], "config.json")
    assert_clean(out)


def test_src_without_weights(capsys, dense_store, tmp_path, out):
    src = tmp_path / "config-only"
    src.mkdir()
    (src / "config.json").write_text((dense_store("llama") / "config.json").read_text())
    expect_error(capsys, ["convert", src, out], "no safetensors weights")
    assert_clean(out)


def test_not_a_causal_lm(capsys, dense, out):
    src = dense("llama")
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["LlamaForSequenceClassification"]
    (src / "config.json").write_text(json.dumps(cfg))
    expect_error(capsys, ["convert", src, out], "not a causal language model")
    assert_clean(out)


@pytest.mark.parametrize(
    "architectures",
    [
        "as saved",
        "dropped",
    ],
)
def test_unsupported_family(capsys, tmp_path, out, architectures):
    src = tmp_path / "gpt_neox"  # GPT-2 was the example until --target generic took it
    config = GPTNeoXConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=128,
        max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    GPTNeoXForCausalLM(config).save_pretrained(src)
    if architectures == "dropped":
        cfg = json.loads((src / "config.json").read_text())
        del cfg["architectures"]
        (src / "config.json").write_text(json.dumps(cfg))
    line = expect_error(capsys, ["convert", src, out], "not supported")
    assert "gpt_neox" in line and "llama" in line  # names the family and lists the supported ones
    assert_clean(out)


# --- options -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--experts", "4", "--top-k", "5"], "--top-k"),
        (["--experts", "1"], "--experts"),
        (["--every", "0"], "--every"),
        (["--layers", "1,7"], "--layers"),
        (["--layers", "1,x"], "--layers"),
        (["--experts", "four"], "--experts"),
        (["--top-k", "1.5"], "--top-k"),
        (["--target", "switch"], "--target"),
        (["--dtype", "int8"], "--dtype"),
        (["--router-init", "ones"], "--router-init"),
        (["--init", "random"], "--init"),
        (["--router-std", "-1"], "--router-std"),
        (["--max-shard-size", "lots"], "--max-shard-size"),
        (["--bogus"], "--bogus"),
        # targets the family cannot hold exactly
        (["--target", "qwen3_moe"], "qwen3_moe"),
        (["--target", "mixtral", "--every", "2"], "mixtral"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_bad_option(capsys, dense_store, out, flags, needle):
    expect_error(capsys, ["convert", dense_store("llama"), out, *flags], needle)
    assert_clean(out)


@pytest.mark.parametrize("field", ["attention_bias", "mlp_bias"])
def test_llama_with_biases_has_no_exact_target(capsys, dense_store, out, field):
    # --target auto takes the generic wrapper for it instead (tests/test_generic.py)
    line = expect_error(capsys, ["convert", dense_store("llama", **{field: True}), out, "--target", "mixtral"], field)
    assert "--target generic" in line
    assert_clean(out)


# --- OUT ---------------------------------------------------------------------------------------------------


def test_out_exists_then_force(capsys, dense_store, out):
    out.mkdir()
    (out / "marker.txt").write_text("keep me unless forced")
    src = dense_store("llama")
    expect_error(capsys, ["convert", src, out], "--force")
    assert (out / "marker.txt").read_text() == "keep me unless forced"
    assert sorted(p.name for p in out.iterdir()) == ["marker.txt"]
    assert not leftovers(out)

    code = run(["convert", str(src), str(out), "--force"])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    assert "Traceback" not in cap.out + cap.err
    assert not (out / "marker.txt").exists()
    assert (out / "config.json").is_file()
    assert not leftovers(out)


def test_out_parent_missing(capsys, dense_store, tmp_path):
    out = tmp_path / "no-such-parent" / "out"
    expect_error(capsys, ["convert", dense_store("llama"), out], "does not exist")
    assert not out.parent.exists()


# --- damaged weights ---------------------------------------------------------------------------------------


def _index(src: Path) -> tuple[Path, dict]:
    path = src / "model.safetensors.index.json"
    return path, json.loads(path.read_text())


def _first_shard(src: Path) -> Path:
    _, index = _index(src)
    return src / sorted(set(index["weight_map"].values()))[0]


def _truncate(src: Path) -> None:
    shard = _first_shard(src)
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])


def _garbage(src: Path) -> None:
    _first_shard(src).write_bytes(b"this is not a safetensors file at all\n" * 50)


def _missing_shard(src: Path) -> None:
    _first_shard(src).unlink()


def _shard_outside(src: Path) -> None:
    path, index = _index(src)
    evil = src.parent / "evil.safetensors"
    evil.write_bytes(_first_shard(src).read_bytes())  # it exists: refused for where it is, not for being absent
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "../evil.safetensors"
    path.write_text(json.dumps(index))


def _index_not_json(src: Path) -> None:
    _index(src)[0].write_text('{"weight_map": {"model.embed_tokens.weight": ')


def _bin_only(src: Path) -> None:
    import torch
    from safetensors.torch import load_file

    state = {}
    for shard in src.glob("*.safetensors"):
        state.update(load_file(shard))
        shard.unlink()
    (src / "model.safetensors.index.json").unlink()
    torch.save(state, src / "pytorch_model.bin")


@pytest.mark.parametrize(
    "damage, needle",
    [
        (_truncate, "(truncated or corrupt)"),
        (_garbage, "is not a valid safetensors file"),
        (_missing_shard, "which is missing"),
        (_shard_outside, "'../evil.safetensors', which lies outside"),
        (_index_not_json, "is not a valid safetensors index"),
        (_bin_only, "pytorch pickle weights (.bin"),
    ],
    ids=lambda v: v.__name__.strip("_") if callable(v) else None,
)
def test_damaged_weights(capsys, dense, out, damage, needle):
    src = dense("llama")
    damage(src)
    expect_error(capsys, ["convert", src, out], needle)
    assert_clean(out)


# --- recipes -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, needle",
    [
        ("experts: 4\nbogus_key: 1\n", "bogus_key"),
        ("experts: [4, 8\ntop_k: 2\n", "not valid YAML at line 2, column 6"),
        ("- experts\n- 4\n", "mapping"),
        ("experts: many\n", "--experts"),
        ("experts: 4.7\n", "--experts 4.7 must be a whole number"),
        ("router_std: wide\n", "--router-std 'wide' must be a number"),
        (None, "does not exist"),
    ],
    ids=["unknown-key", "not-yaml", "not-a-mapping", "bad-value", "not-whole", "not-a-number", "missing"],
)
def test_bad_recipe(capsys, dense_store, tmp_path, out, text, needle):
    recipe = tmp_path / "recipe.yaml"
    if text is not None:
        recipe.write_text(text)
    expect_error(capsys, ["convert", dense_store("llama"), out, "--config", recipe], needle)
    assert_clean(out)


# --- the Hub, offline --------------------------------------------------------------------------------------


def test_hub_id_not_in_offline_cache(capsys, monkeypatch, tmp_path, out):
    from huggingface_hub import constants

    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    # huggingface_hub reads both at import time, which has already happened
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    line = expect_error(capsys, ["convert", "upcycle-test-org/no-such-model", out], "not in the Hub cache")
    assert str(cache) in line  # the message names the cache that was looked in
    assert_clean(out)
    assert not list(cache.rglob("*.safetensors"))


# --- failures midway ---------------------------------------------------------------------------------------


def _fail_after(monkeypatch, calls: int, exc: BaseException) -> list[int]:
    from upcycle.convert.writer import ShardedWriter

    original = ShardedWriter.put_range
    seen = [0]

    def put_range(self, *args, **kwargs):
        seen[0] += 1
        if seen[0] > calls:
            raise exc
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ShardedWriter, "put_range", put_range)
    return seen


@pytest.mark.parametrize(
    "exc",
    [RuntimeError("simulated bug"), OSError(28, "No space left on device"), UpcycleError("simulated bad input")],
    ids=["RuntimeError", "OSError", "UpcycleError"],
)
def test_failure_midway_leaves_nothing(capsys, monkeypatch, dense_store, out, exc):
    seen = _fail_after(monkeypatch, 3, exc)
    # the exit code is whatever the exception gives; only the file system matters here
    with contextlib.suppress(RuntimeError, OSError):
        run(["convert", str(dense_store("llama")), str(out)])
    capsys.readouterr()
    assert seen[0] > 3, "the writer was not reached"
    assert_clean(out)


def _interrupt(capsys, monkeypatch, dense_store, out):
    src = str(dense_store("llama"))
    _fail_after(monkeypatch, 3, KeyboardInterrupt())
    capsys.readouterr()
    try:
        code = run(["convert", src, str(out)])
    except KeyboardInterrupt:
        pytest.fail("run() let KeyboardInterrupt escape")
    return code, capsys.readouterr()


def test_interrupt_midway_leaves_nothing(capsys, monkeypatch, dense_store, out):
    code, cap = _interrupt(capsys, monkeypatch, dense_store, out)
    assert code == 130
    assert "Traceback" not in cap.out + cap.err
    assert_clean(out)


def test_interrupt_says_so(capsys, monkeypatch, dense_store, out):
    _, cap = _interrupt(capsys, monkeypatch, dense_store, out)
    assert "interrupted; nothing was written" in cap.err


def test_sigkill_midway_never_leaves_a_partial_out(capsys, dense_store, tmp_path, out):
    script = tmp_path / "slow_convert.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys
            import time

            from upcycle.convert.writer import ShardedWriter

            original = ShardedWriter.put_range

            def put_range(self, *args, **kwargs):
                placed = original(self, *args, **kwargs)
                time.sleep(0.5)
                return placed

            ShardedWriter.put_range = put_range

            from upcycle_cli.main import run

            sys.exit(run(["convert", sys.argv[1], sys.argv[2]]))
            """
        )
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(dense_store("llama")), str(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while not list(out.parent.glob(f".{out.name}.tmp-*")):
            if proc.poll() is not None:
                pytest.fail(f"convert ended (exit {proc.returncode}) before writing: {proc.stderr.read().decode()}")
            if time.monotonic() > deadline:
                pytest.fail("no temporary folder appeared beside OUT within 60 s")
            time.sleep(0.02)
        time.sleep(0.2)  # let it get some bytes into the temporary folder
        assert proc.poll() is None, "convert finished before it could be killed; slow it down further"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists(), "a killed conversion left a partial OUT"
    stale = leftovers(out)
    assert len(stale) == 1 and f".tmp-{proc.pid}@" in stale[0].name  # the folder names the run that made it
    # the next conversion to the same OUT removes the killed run's folder, and says so
    assert run(["convert", str(dense_store("llama")), str(out)]) == 0
    assert (out / "config.json").is_file()
    assert not leftovers(out)
    assert f"removed a stale temporary folder {stale[0]} left by a killed run" in capsys.readouterr().err


# --- the exact shape of stderr ------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["src-missing", "truncated", "out-exists"])
def test_stderr_is_only_the_error_line(capsys, dense, tmp_path, out, case):
    src = dense("llama")
    if case == "src-missing":
        src = tmp_path / "no-such-model"
    elif case == "truncated":
        _truncate(src)
    else:
        out.mkdir()
    capsys.readouterr()
    assert run(["convert", str(src), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.endswith("\n") and err.count("\n") == 1, repr(err)


# --- verify and inspect ------------------------------------------------------------------------------------


def test_verify_missing_paths(capsys, tmp_path, dense_store):
    expect_error(capsys, ["verify", tmp_path / "no-dense", tmp_path / "no-moe"], "does not exist")
    expect_error(capsys, ["verify", dense_store("llama"), tmp_path / "no-moe"], "no-moe")


def test_inspect_missing_path(capsys, tmp_path):
    expect_error(capsys, ["inspect", tmp_path / "nothing-here"], "does not exist")


def test_no_arguments_at_all(capsys, out):
    expect_error(capsys, ["convert"], "SRC")


def test_out_that_would_delete_the_source(capsys, dense):
    src = dense("llama")
    before = sorted(p.name for p in src.iterdir())
    expect_error(capsys, ["convert", src, src, "--force"], "delete the source")
    expect_error(capsys, ["convert", src / "config.json", src, "--force"], "")  # a file is not a source
    assert sorted(p.name for p in src.iterdir()) == before


def test_not_enough_disk(capsys, monkeypatch, dense_store, out):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    expect_error(capsys, ["convert", dense_store("llama"), out], "1.00 KB free")
    assert_clean(out)

"""Our outputs in a real llama.cpp (issue 22): converted with its own convert_hf_to_gguf.py, run greedily by
llama-completion, compared token by token with transformers. llama.cpp is built once by
benchmarks/engines/build_llama_cpp.sh and cached outside the clone (UPCYCLE_LLAMA_CPP_CACHE); the `engine`
tests build it when it is missing (cmake, a C++ compiler and PyPI needed, no GPU, no Hub)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import make_dense

from upcycle.report.engines import llama_cpp
from upcycle.source import resolve
from upcycle_cli.main import run

ROOT = Path(__file__).resolve().parents[1]


def test_verify_engine_without_llama_cpp_says_how_to_get_it(dense, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("UPCYCLE_LLAMA_CPP_CACHE", str(tmp_path / "none"))
    monkeypatch.setenv("PATH", str(tmp_path))
    src = dense()
    assert run(["convert", str(src), str(tmp_path / "moe"), "--experts", "4"]) == 0
    capsys.readouterr()
    assert run(["verify", str(src), str(tmp_path / "moe"), "--engine", "llama.cpp"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: llama.cpp not found") and llama_cpp.BUILD_SCRIPT in err[0]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--engine", "vllm"], "--engine 'vllm' is not one we can run"),
        (["--llama-cpp", "."], "--llama-cpp DIR is used with --engine llama.cpp"),
        (["--engine", "llama.cpp", "--llama-cpp", "."], "is not a llama.cpp tree with convert_hf_to_gguf.py"),
    ],
)
def test_verify_engine_bad_input_is_one_line(flags, message, dense, tmp_path, capsys):
    src = dense()
    assert run(["convert", str(src), str(tmp_path / "moe"), "--experts", "4"]) == 0
    capsys.readouterr()
    assert run(["verify", str(src), str(tmp_path / "moe"), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


# --- a real llama.cpp ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def engine() -> llama_cpp.LlamaCpp:
    """The cached llama.cpp; the build script builds it when missing (only with UPCYCLE_BUILD_LLAMA_CPP=1: the first
    build takes longer than CI's budget on 2 cores) and adds the converter's sentencepiece."""
    try:
        llama_cpp.find(None)
    except Exception:
        if os.environ.get("UPCYCLE_BUILD_LLAMA_CPP") != "1":
            pytest.skip("no llama.cpp build cached: see benchmarks/engines/build_llama_cpp.sh")
    if not (shutil.which("cmake") and shutil.which("c++")):
        pytest.fail("the engine tests build llama.cpp and need cmake and a C++ compiler")
    script = ROOT / llama_cpp.BUILD_SCRIPT
    env = dict(os.environ) | {"PYTHON": sys.executable}
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return llama_cpp.find(Path(done.stdout.strip().splitlines()[-1]))


def _dense_with_real_tokenizer(folder: Path, family: str) -> Path:
    """A tiny random model with SmolLM2's tokenizer: llama.cpp's converter only takes tokenizers it knows."""
    src = resolve("smollm2").folder
    make_dense(
        folder, family, tokenizer=False, shard_size=None, vocab_size=49152, pad_token_id=2,
        tie_word_embeddings=family == "llama",
    )  # fmt: skip
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, folder / name)
    return folder


# what --serve llama.cpp needs of a Qwen2-MoE (docs/serving.md): llama.cpp never renormalises its top-k weights, so
# softmax-topk, exact with a zero router; the shared expert, gate and head are written as it reads them
QWEN2_LLAMA_CPP = [
    "--target", "qwen2_moe", "--routing", "softmax-topk", "--router-init", "zero", "--serve", "llama.cpp",
]  # fmt: skip
# (source family, convert flags): every layout we write for the families llama.cpp supports
RUNS = {
    "mixtral": ("llama", ["--target", "mixtral"]),
    "mixtral-fine-grained": (
        "llama",
        ["--target", "mixtral", "--experts", "8", "--top-k", "4", "--init", "fine-grained", "--granularity", "2"],
    ),
    "mixtral-split": ("llama", ["--target", "mixtral", "--init", "split", "--top-k", "4"]),
    "qwen2_moe": ("qwen2", QWEN2_LLAMA_CPP),
    "qwen2_moe-shared": ("qwen2", [*QWEN2_LLAMA_CPP, "--shared-experts", "1"]),
    "qwen2_moe-tied": ("llama", QWEN2_LLAMA_CPP),  # SmolLM2-like: tied embeddings, no q/k/v biases
    "qwen3_moe": ("qwen3", ["--target", "qwen3_moe"]),
    "serve-auto": ("llama", ["--serve", "llama.cpp"]),
}
# layouts llama.cpp refuses, with the line it refuses them with (docs/serving.md)
REFUSED = {
    "qwen2_moe-every2": ("qwen2", ["--target", "qwen2_moe", "--every", "2"], "Can not map tensor 'model.layers.0.mlp"),
    "qwen3_moe-every2": ("qwen3", ["--target", "qwen3_moe", "--every", "2"], "Can not map tensor 'model.layers.0.mlp"),
    "generic": ("llama", ["--target", "generic"], "Model UpcycleMoeForCausalLM is not supported"),
}


# layouts --serve llama.cpp changes, written without it: llama.cpp's loader refuses them with these lines
LOADER_REFUSES = {
    "qwen2_moe-no-serve": ("qwen2", QWEN2_LLAMA_CPP[:-2], "tensor 'blk.0.ffn_gate_shexp.weight' has wrong shape"),
    "qwen2_moe-tied-no-serve": ("llama", QWEN2_LLAMA_CPP[:-2], "check_tensor_dims: tensor 'output.weight' not found"),
}


def _convert(tmp_path: Path, family: str, flags: list[str]) -> tuple[Path, Path]:
    src = _dense_with_real_tokenizer(tmp_path / "dense", family)
    out = tmp_path / "moe"
    assert run(["convert", str(src), str(out), "--experts", "4", "--top-k", "2", *flags]) == 0
    return src, out


@pytest.mark.slow
@pytest.mark.engine
@pytest.mark.parametrize("layout", sorted(RUNS))
def test_layout_runs_in_llama_cpp_with_transformers_greedy_tokens(layout, engine, tmp_path):
    family, flags = RUNS[layout]
    src, moe = _convert(tmp_path, family, flags)
    report = llama_cpp.check(str(src), str(moe), engine=engine, tokens=8)
    assert report.gguf_bytes > 0 and len(report.expected) == 8
    assert report.got == report.expected, (report.got, report.expected)


@pytest.mark.slow
@pytest.mark.engine
@pytest.mark.parametrize("layout", sorted(REFUSED))
def test_layout_llama_cpp_refuses_is_the_refusal_we_document(layout, engine, tmp_path):
    family, flags, message = REFUSED[layout]
    _, moe = _convert(tmp_path, family, flags)
    with pytest.raises(llama_cpp.EngineRefused, match=r"llama\.cpp's converter refused") as caught:
        llama_cpp.to_gguf(engine, moe, tmp_path / "moe.gguf")
    assert message in str(caught.value) and not (tmp_path / "moe.gguf").exists()


@pytest.mark.slow
@pytest.mark.engine
def test_smollm2_moe_verify_engine_passes(engine, tmp_path, capsys):
    moe = tmp_path / "moe"
    assert run(["convert", "smollm2", str(moe), "--experts", "4", "--top-k", "2", "--dtype", "bfloat16"]) == 0
    capsys.readouterr()
    code = run(["verify", "smollm2", str(moe), "--tokens", "16", "--dtype", "bfloat16", "--no-record",
                "--engine", "llama.cpp", "--llama-cpp", str(engine.tree), "--json", "-"])  # fmt: skip
    import json

    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["engine"]["passed"] and report["engine"]["matching"] == 24


@pytest.mark.slow
@pytest.mark.engine
@pytest.mark.parametrize("layout", sorted(LOADER_REFUSES))
def test_layout_without_serve_is_refused_by_llama_cpp_loader(layout, engine, tmp_path):
    """What --serve llama.cpp's fixes are for: the zero-width shared expert and the tied head we write by default
    are refused when llama.cpp loads the GGUF; the error names its loader's reason, not its generic last line."""
    family, flags, message = LOADER_REFUSES[layout]
    assert flags[-2:] != ["--serve", "llama.cpp"]
    src, moe = _convert(tmp_path, family, flags)
    with pytest.raises(llama_cpp.EngineRefused, match=r"llama\.cpp could not run moe\.gguf") as caught:
        llama_cpp.check(str(src), str(moe), engine=engine, tokens=4)
    assert message in str(caught.value)

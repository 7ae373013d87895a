"""`upcycle verify --engine llama.cpp`: run an MoE in a real llama.cpp and compare its greedy tokens.

llama.cpp is a test tool here, never a dependency. It is found as (1) `--llama-cpp DIR`, a llama.cpp
source tree holding convert_hf_to_gguf.py and a build under build/bin/; (2) `llama-completion` on PATH with
convert_hf_to_gguf.py beside it or in $UPCYCLE_LLAMA_CPP_CACHE; (3) the build benchmarks/engines/
build_llama_cpp.sh caches (~/.cache/upcycle/llama.cpp-<version>). The MoE is converted to a temporary
GGUF with llama.cpp's own converter (its own gguf-py, run by this interpreter), run greedily, and its
continuation compared token by token with transformers' greedy continuation on the dense model.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ...errors import EXIT_ENVIRONMENT, UpcycleError
from ...source import resolve

VERSION = "0.3.36"  # the llama-cpp-python sdist whose vendored llama.cpp the build script builds
BUILD_SCRIPT = "benchmarks/engines/build_llama_cpp.sh"
CONVERTER = "convert_hf_to_gguf.py"
COMPLETION = "llama-completion"
PROMPT = "The history of the Internet began with"
TIMEOUT_S = 600


class EngineMissing(UpcycleError):
    """llama.cpp is not installed where we look: a fault of the environment, not of the input."""

    exit_code = EXIT_ENVIRONMENT


class EngineRefused(UpcycleError):
    """llama.cpp's converter or loader refused the model: the output does not run there."""


@dataclass(frozen=True)
class LlamaCpp:
    tree: Path  # holds convert_hf_to_gguf.py and gguf-py/
    completion: Path  # the llama-completion binary


@dataclass(frozen=True)
class EngineReport:
    engine: str  # "llama.cpp"
    where: str  # the tree used
    prompt: str
    expected: tuple[int, ...]  # transformers' greedy continuation on the dense model
    got: tuple[int, ...]  # llama.cpp's greedy continuation on the MoE, tokenized back
    gguf_bytes: int

    @property
    def matching(self) -> int:
        """Tokens equal from the start of the continuation."""
        n = 0
        for a, b in zip(self.expected, self.got, strict=False):
            if a != b:
                break
            n += 1
        return n

    @property
    def passed(self) -> bool:
        return len(self.expected) > 0 and self.matching == len(self.expected)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["expected"], d["got"] = list(self.expected), list(self.got)
        return d | {"matching": self.matching, "passed": self.passed}


def default_cache() -> Path:
    given = os.environ.get("UPCYCLE_LLAMA_CPP_CACHE")
    return Path(given).expanduser() if given else Path.home() / ".cache" / "upcycle" / f"llama.cpp-{VERSION}"


def _in_tree(tree: Path) -> LlamaCpp | None:
    binary = tree / "build" / "bin" / COMPLETION
    if (tree / CONVERTER).is_file() and binary.is_file() and os.access(binary, os.X_OK):
        return LlamaCpp(tree=tree, completion=binary)
    return None


def find(given: Path | None = None) -> LlamaCpp:
    """llama.cpp from `given`, else PATH, else the cached build; one line saying how to get it otherwise."""
    if given is not None:
        found = _in_tree(Path(given).expanduser())
        if found is None:
            raise UpcycleError(
                f"--llama-cpp {given} is not a llama.cpp tree with {CONVERTER} and build/bin/{COMPLETION}; "
                f"build one with {BUILD_SCRIPT}"
            )
        return found
    on_path = shutil.which(COMPLETION)
    cached = _in_tree(default_cache())
    if on_path:
        binary = Path(on_path).resolve()
        for tree in (binary.parent, *binary.parents[:3]):
            if (tree / CONVERTER).is_file():
                return LlamaCpp(tree=tree, completion=binary)
        if cached is not None:
            return LlamaCpp(tree=cached.tree, completion=binary)
    if cached is not None:
        return cached
    raise EngineMissing(
        f"llama.cpp not found (no --llama-cpp DIR, no {COMPLETION} on PATH, no build in {default_cache()}); "
        f"build it once with {BUILD_SCRIPT} (needs cmake, a C++ compiler and pip)"
    )


def _run(cmd: list[str], *, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env, check=False)
    except subprocess.TimeoutExpired:
        name = Path(cmd[0]).name
        raise EngineMissing(f"{name} ran past {TIMEOUT_S} s; run again when the machine is less busy") from None


def _last_error(text: str) -> str:
    """The line of a tool's output that says why it failed: llama.cpp's loader states its reason once, then
    prints generic lines ('failed to load model', 'unable to create context') after it, so that reason wins."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if "error loading model:" in line:
            return line.split("error loading model:", 1)[1].strip()
    for line in reversed(lines):
        if any(word in line.lower() for word in ("error", "can not", "cannot", "not found", "failed")):
            return line
    return lines[-1] if lines else "no output"


OUTTYPE = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}


def _stored_dtype(model: Path) -> str:
    import json

    try:
        config = json.loads((model / "config.json").read_text())
    except (OSError, ValueError):
        return "float32"
    return str(config.get("dtype") or config.get("torch_dtype") or "float32")


def to_gguf(engine: LlamaCpp, model: Path, out: Path) -> Path:
    """Convert a transformers folder to GGUF with llama.cpp's own converter and gguf-py (not the installed gguf)."""
    paths = [engine.tree / "gguf-py", engine.tree / "pydeps"]  # pydeps: sentencepiece, put there by the build script
    env = os.environ | {"PYTHONPATH": os.pathsep.join([*map(str, paths), os.environ.get("PYTHONPATH", "")])}
    outtype = OUTTYPE.get(_stored_dtype(model), "f32")  # as stored: the converter's "auto" makes float32 bf16
    cmd = [sys.executable, str(engine.tree / CONVERTER), str(model), "--outfile", str(out), "--outtype", outtype]
    done = _run(cmd, env=env)
    if done.returncode != 0 or not out.is_file():
        out.unlink(missing_ok=True)  # nothing half-written
        raise EngineRefused(f"llama.cpp's converter refused {model.name}: {_last_error(done.stderr + done.stdout)}")
    return out


def complete(engine: LlamaCpp, gguf: Path, prompt: str, n: int) -> str:
    """llama.cpp's greedy continuation of `prompt` (the text it prints after the prompt)."""
    cmd = [
        str(engine.completion), "-m", str(gguf), "-p", prompt, "-n", str(n), "--temp", "0", "--top-k", "1",
        "-s", "0", "-t", "2", "-c", "256", "-no-cnv", "--no-display-prompt", "--simple-io", "--no-warmup",
        "--ignore-eos",
    ]  # fmt: skip
    done = _run(cmd)
    if done.returncode != 0:
        raise EngineRefused(f"llama.cpp could not run {gguf.name}: {_last_error(done.stderr + done.stdout)}")
    return done.stdout


def transformers_greedy(folder: Path, prompt: str, n: int) -> tuple[list[int], Any]:
    """transformers' greedy continuation (token ids) of `prompt` on the model in `folder`, and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, min_new_tokens=n, pad_token_id=0)
    return out[0, ids.shape[1] :].tolist(), tokenizer


def continuation_ids(tokenizer: Any, prompt: str, text: str) -> list[int]:
    """The ids of `text` as it continues `prompt`: tokenized together, so a word at the seam splits as in generation."""
    head = tokenizer(prompt, add_special_tokens=False).input_ids
    full = tokenizer(prompt + text, add_special_tokens=False).input_ids
    if full[: len(head)] == head:
        return full[len(head) :]
    return tokenizer(text, add_special_tokens=False).input_ids


def check(
    dense: str, moe: str, *, engine: LlamaCpp | None = None, tokens: int = 24, prompt: str = PROMPT
) -> EngineReport:
    """Run MOE in llama.cpp (`engine`, else `find()`) and compare its greedy continuation with transformers' on
    DENSE; EngineRefused when llama.cpp's converter or loader refuses the MoE."""
    engine = engine or find()
    if tokens < 1:
        raise UpcycleError(f"--tokens {tokens} must be at least 1")
    dense_folder, moe_folder = resolve(dense).folder, resolve(moe).folder
    expected, tokenizer = transformers_greedy(dense_folder, prompt, tokens)
    with tempfile.TemporaryDirectory(prefix="upcycle-gguf-") as tmp:
        gguf = to_gguf(engine, moe_folder, Path(tmp) / "moe.gguf")
        size = gguf.stat().st_size
        text = complete(engine, gguf, prompt, tokens)
    got = continuation_ids(tokenizer, prompt, text)[:tokens]
    return EngineReport(
        engine="llama.cpp", where=str(engine.tree), prompt=prompt, expected=tuple(expected), got=tuple(got),
        gguf_bytes=size,
    )  # fmt: skip

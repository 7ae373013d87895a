"""Does upcycling pay? From one dense parent, train each arm and compare held-out perplexity, fairly.

Arms (issues 14 and 25): `dense` (the parent, trained on, re-warmed to its learning rate), `dense-nowarm` (the
parent trained on from its final pretraining learning rate, no warmup), `dense-wide` (the parent's FFNs widened
function-preserving by Net2Net splitting to the MoE's active parameters: more active parameters, no sparsity),
`moe-all` (clone-upcycled Mixtral, 8 experts, top-2, every layer), `moe-all-flop` (the same MoE with its own full
schedule ending at dense's training FLOPs), `moe-every2` (Qwen2-MoE, 8 experts, top-2, every other layer) and
`drop-r0.5` (Drop-Upcycling, 8×top-2, every layer). Every arm and seed: same text in the same order (the seed
sets the data order and the conversion's seed), same AdamW, warmup and cosine decay to 10%. With `--lr-sweep`
each re-warmed arm first trains at each of the preset's sweep learning rates (`cpu`: 3e-5, 1e-4, 3e-4; the others
1e-4, 3e-4, 1e-3; seed 0, the sweep's token budget, judged on a validation part); an arm whose best is at an edge
of that grid gets one step more beyond it on the 1-3-10 ladder, and one still at an edge is flagged (`at_edge`);
then each arm runs at its best. `dense-nowarm`'s learning rate is the parent's
final one by definition.

FLOPs per token: 6 · N_active + 12 · L · d · S (N_active counts routed experts at top-k/E and the tied embedding
once, as the output head; L layers, d hidden size, S the sequence length: the attention scores and values).

Training goes through `upcycle.train.loop.train`, the function behind `upcycle train`, for every arm: the dense
arms (the parent, and its Net2Net-widened copy) are plain Llama folders, which `upcycle train` trains as they
are (issue 24: no routers, so no balance or z-loss), in the same loop, on the same data, schedule and
checkpoints as the MoEs. The parent is pretrained from scratch the same way; `upcycle convert` then upcycles it.

Text: the Jargon File, `fortunes`, Perl's manual (perl-doc) and Git's (git-doc) from Debian packages (apt-get
download, cached; their versions are recorded), and the source files of this Python's standard library. Whole
FILES are held out, stratified by source, and the training text is cleaned of held-out text (study_corpus.py:
13-word overlap measured and reported); a byte-level BPE tokenizer is trained on the training parts.

Work (corpus, tokenizer, parent, converted models, every run's final model and last two checkpoints) goes to the user
cache, $UPCYCLE_CACHE/studies/upcycle_vs_dense/<preset> (default ~/.cache/upcycle/...), never into the repository.
Outputs under benchmarks/results/: upcycle_vs_dense_<preset>.json (rewritten as each run finishes, so an
interrupted study keeps what it finished; a rerun reuses the runs it finds finished), _tokens.png and _flops.png.

    python benchmarks/upcycle_vs_dense.py --preset cpu              # issue 25's protocol: ~44 min on 2 idle cores
    python benchmarks/upcycle_vs_dense.py --preset cpu --arms dense,moe-all,moe-all-flop
    python benchmarks/upcycle_vs_dense.py --preset cpu-long         # then: cpu's parent, 4x the tokens
    python benchmarks/upcycle_vs_dense.py --preset smoke            # about a minute; what the smoke test runs
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from multiprocessing import get_context
from pathlib import Path
from typing import Any
from urllib.parse import unquote

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CONFIGS = ROOT / "configs"
if str(HERE) not in sys.path:  # the sibling modules, also in spawned workers
    sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
import study_corpus  # noqa: E402

MOE_ALL = ("--experts", "8", "--top-k", "2")


@dataclass(frozen=True)
class Arm:
    """One arm: how its model is made and how it trains."""

    label: str
    flags: tuple[str, ...] | None = None  # `upcycle convert` flags; None: a dense Llama, trained as it is
    model: str = "convert"  # "parent": the parent itself; "wide": the parent widened (Net2Net); "convert"
    rewarm: bool = True  # False: no warmup, the parent's final learning rate
    flop_matched: bool = False  # its tokens cut so that its training FLOPs equal dense's
    uses: str | None = None  # the arm whose model and swept learning rate it takes


ARMS: dict[str, Arm] = {
    "dense": Arm("dense (continued, re-warmed)", model="parent"),
    "dense-nowarm": Arm("dense (continued from the parent's final lr, no re-warm)", model="parent", rewarm=False),
    "dense-wide": Arm("dense widened (Net2Net) to the MoE's active params", model="wide"),
    "moe-all": Arm("clone MoE 8×top-2, every layer", MOE_ALL),
    "moe-all-flop": Arm("clone MoE 8×top-2, every layer, at dense's FLOPs", MOE_ALL, flop_matched=True, uses="moe-all"),
    "moe-every2": Arm("clone MoE 8×top-2, every other layer", (*MOE_ALL, "--every", "2")),
    "drop-r0.5": Arm("Drop-Upcycling r=0.5, 8×top-2", ("--config", str(CONFIGS / "drop-upcycling-r0.5.yaml"))),
}
ARM_LABELS = {name: arm.label for name, arm in ARMS.items()}
DEBIAN = {  # package -> the member folder or file the text is read from
    "jargon-text": "usr/share/doc/jargon-text/jargon.txt.gz",
    "fortunes": "usr/share/games/fortunes",
    "perl-doc": "usr/share/perl",  # Perl's manual: */pod/*.pod
    "git-doc": "usr/share/doc/git-doc",  # Git's manual pages and guides: *.txt (AsciiDoc)
}
MANUALS = {"perl-doc": "*.pod", "git-doc": "*.txt"}  # package -> the files of its folder that are text
SWEEP_LRS = (1e-4, 3e-4, 1e-3)


@dataclass(frozen=True)
class Preset:
    """One size of the study. Token counts are per run; `parent` is "scratch" or a model upcycle can resolve."""

    parent: str = "scratch"
    hidden: int = 128
    layers: int = 4
    intermediate: int = 384
    heads: int = 4
    kv_heads: int = 4
    vocab: int = 4096
    seq_len: int = 256
    micro_batch: int = 16
    parent_tokens: int = 12_000_000  # pretraining of the parent (scratch only)
    parent_lr: float = 3e-3
    arm_tokens: int = 2_000_000
    continue_tokens: int | None = None  # what the continuation part is sized for (None: the base preset's arm_tokens)
    arm_lr: float = 1e-3  # without --lr-sweep
    sweep_lrs: tuple[float, ...] = SWEEP_LRS
    sweep_tokens: int | None = None  # tokens per sweep run (None: arm_tokens)
    warmup_frac: float = 0.02
    seeds: tuple[int, ...] = (0, 1)
    evals: int = 8  # held-out evaluations per arm run (besides the one at the start)
    heldout_bytes: int = 200_000  # whole files held out for the test (~65k tokens)
    valid_bytes: int = 100_000  # whole files held out for choosing the learning rate
    wide_noise: float = 1e-3  # Net2Net's symmetry-breaking noise, relative to the down projection's std
    stdlib: bool = True  # add the Python standard library's source files to the corpus
    manuals: bool = True  # add Perl's and Git's manuals (Debian's perl-doc and git-doc) to the corpus
    text_bytes: int | None = None  # cap on the corpus (smoke)
    device: str = "cpu"
    dtype: str = "fp32"
    jobs: int = 2  # arm runs at a time (processes)
    threads: int = 1  # torch threads per arm process
    parent_threads: int = 0  # torch threads for the parent's pretraining, which runs alone (0: every core)
    base: str | None = None  # a preset whose corpus, tokenizer, parent and converted models this one reuses
    arms: tuple[str, ...] | None = None  # the arms run without --arms (None: every arm)
    lr_sweep: bool = False  # sweep each re-warmed arm's learning rate without --lr-sweep


# Sized for the 45-minute budget of issue 25 on 2 idle cores, measured alone on 2026-12-07 (benchmarks/README.md): a
# 1.1M-parameter parent (0.59M outside the tied embedding) pretrained on 11.5M tokens, 10.3 per parameter (19.4 min
# at 10.1k tokens/s); the learning-rate sweep on the grid the earlier runs found the optimum inside (3e-5, 1e-4,
# 3e-4: every arm best at 1e-4), 400k tokens a run (9 runs; with the conversions 7.6 min, 2 at a time); the arms the
# issue asks for (dense re-warmed and not, Net2Net-widened dense, the every-layer MoE at equal tokens and at equal
# FLOPs) x 2 seeds x 0.75M tokens (16.2 min, 2 at a time): 43.8 min in all. A main run's time is about half fixed
# (its evaluations, checkpoints and start-up: ~1 min dense, ~2 min MoE), so fewer tokens save less than in
# proportion: at 1.0M tokens the same preset took 48.1 min.
# The corpus (~15.7M tokens) holds the pretraining and a 3.3M-token continuation part.
CORE_ARMS = ("dense", "dense-nowarm", "dense-wide", "moe-all", "moe-all-flop")
CPU_SWEEP_LRS = (3e-5, 1e-4, 3e-4)
CPU = Preset(
    intermediate=256,
    kv_heads=2,
    parent_tokens=11_500_000,
    continue_tokens=3_000_000,
    arm_tokens=750_000,
    sweep_lrs=CPU_SWEEP_LRS,
    sweep_tokens=400_000,
    evals=6,
    arms=CORE_ARMS,
    lr_sweep=True,
)

PRESETS: dict[str, Preset] = {
    "smoke": Preset(
        hidden=32,
        layers=2,
        intermediate=64,
        heads=2,
        kv_heads=2,
        vocab=384,
        seq_len=64,
        micro_batch=4,
        parent_tokens=8192,
        arm_tokens=2048,
        seeds=(0,),
        evals=2,
        heldout_bytes=20_000,
        valid_bytes=10_000,
        manuals=False,
        text_bytes=300_000,
        jobs=1,
    ),
    "cpu": CPU,
    # longer (under 2 hours on 2 idle cores once `cpu` has run): cpu's corpus, parent and converted models, every
    # arm, 2 paired seeds and 3M tokens per arm run; its sweep spans 1e-4, 3e-4, 1e-3 (+ an edge step) at cpu's 400k
    # tokens a run, so that cpu's sweep runs (3e-5, 1e-4, 3e-4 of its three arms) are reused and only the rest run.
    # With 3 seeds (`--seeds 0,1,2`) it took 129.8 min on 2026-12-06 (each main run 8-12 min): over the budget
    "cpu-long": replace(
        CPU,
        arm_tokens=3_000_000,
        seeds=(0, 1),
        evals=8,
        base="cpu",
        arms=None,
        sweep_lrs=SWEEP_LRS,
        sweep_tokens=CPU.sweep_tokens,
    ),
}

# fields only the arm runs read: a preset with a `base` may differ from it in these and nothing else
ARM_ONLY = {
    "arm_tokens",
    "arm_lr",
    "sweep_lrs",
    "sweep_tokens",
    "seeds",
    "evals",
    "wide_noise",
    "jobs",
    "threads",
    "parent_threads",
    "base",
    "arms",
    "lr_sweep",
}


def parent_settings(preset: Preset) -> dict[str, Any]:
    """The fields the corpus, tokenizer and parent are made from (as JSON holds them: tuples become lists)."""
    return {k: v for k, v in json.loads(json.dumps(asdict(preset))).items() if k not in ARM_ONLY}


def base_mismatch(name: str) -> list[str]:
    """Fields in which preset NAME differs from its base where it must not (it would reuse the wrong parent)."""
    preset = PRESETS[name]
    if preset.base is None:
        return []
    mine, base = parent_settings(preset), parent_settings(PRESETS[preset.base])
    return [k for k, v in mine.items() if v != base[k]]


def dense_params(preset: Preset) -> int:
    """Parameters of the scratch parent (tied embedding once; norms included)."""
    head_dim = preset.hidden // preset.heads
    attn = 2 * preset.hidden * preset.heads * head_dim + 2 * preset.hidden * preset.kv_heads * head_dim
    layer = attn + 3 * preset.hidden * preset.intermediate + 2 * preset.hidden
    return preset.vocab * preset.hidden + preset.layers * layer + preset.hidden


def scaled(preset: Preset, scale: int, parent_tokens: int | None = None) -> Preset:
    """A larger parent (`--parent-scale`): hidden size, FFN and heads times SCALE (head size kept), pretrained on
    PARENT_TOKENS, else as many tokens per parameter as PRESET's parent. Its own work folder and corpus split."""
    if scale == 1 and parent_tokens is None:
        return preset
    big = replace(
        preset,
        hidden=preset.hidden * scale,
        intermediate=preset.intermediate * scale,
        heads=preset.heads * scale,
        kv_heads=preset.kv_heads * scale,
    )
    tokens = parent_tokens or round(preset.parent_tokens * dense_params(big) / dense_params(preset))
    return replace(big, parent_tokens=tokens)


# one GPU run (benchmarks/gpu/study.sh; ~15 minutes of machine time, no network there): cpu's corpus carried
# pre-tokenised (--export-corpus here, --corpus there), a parent with 4x cpu's non-embedding parameters
# (`--parent-scale 2`'s shape: hidden 256, FFN 512, 8/4 heads; 3.4M parameters) pretrained on the GPU at cpu's
# 10.3 tokens per parameter (35M tokens, 2.9 epochs of the pretraining part), bf16 with fp32 masters,
# deterministic algorithms, so that every run pretrains the same parent; two arms × one seed per run (--arms,
# --seeds), each swept; --merge joins the runs' results
PRESETS["gpu"] = replace(
    scaled(CPU, 2),
    micro_batch=32,
    arm_tokens=3_000_000,
    sweep_lrs=SWEEP_LRS,
    sweep_tokens=1_000_000,
    seeds=(0,),
    evals=8,
    arms=("dense", "moe-all"),
    device="cuda",
    dtype="bf16",
    jobs=1,
    threads=4,
)


# --- text -----------------------------------------------------------------------------------------------


def cache_root() -> Path:
    root = os.environ.get("UPCYCLE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "upcycle"
    )
    return Path(root)


def default_work(name: str) -> Path:
    """The study's work folder for preset NAME: in the user cache, not the repository (it holds every run's final
    model and checkpoint, and a rerun resumes from it)."""
    return cache_root() / "studies" / "upcycle_vs_dense" / name


class TextUnavailable(RuntimeError):
    """apt-get could not provide a Debian text package (no apt, no network): the study cannot build its corpus."""


TEXT_CACHE: list[Path] = []  # --text-cache, when given


def debian_package(name: str) -> Path:
    """The extracted package under the cache (apt-get download + dpkg-deb -x, once)."""
    root = (TEXT_CACHE[0] if TEXT_CACHE else cache_root() / "realtext" / "debian") / name
    if (root / ".complete").is_file():
        return root
    shutil.rmtree(root, ignore_errors=True)
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
        for attempt in range(2):
            try:
                proc = subprocess.run(["apt-get", "download", name], cwd=tmp, capture_output=True, text=True)
            except OSError as exc:
                raise TextUnavailable(f"apt-get download {name}: {exc}") from None
            if proc.returncode == 0:
                break
            if attempt == 0:
                subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=300)
        else:
            raise TextUnavailable(f"apt-get download {name} failed: {proc.stderr.strip().splitlines()[-1:]}")
        deb = sorted(Path(tmp).glob(f"{name}_*.deb"))[-1]
        subprocess.run(["dpkg-deb", "-x", str(deb), str(Path(tmp) / "x")], check=True)
        (Path(tmp) / "x" / ".complete").write_text(deb.name)
        os.replace(Path(tmp) / "x", root)
    return root


def source_texts(preset: Preset) -> list[tuple[str, str]]:
    """(name, text) of every source file, in a fixed order."""
    import gzip

    out = []
    jargon = debian_package("jargon-text") / DEBIAN["jargon-text"]
    out.append(("jargon-text/jargon.txt", gzip.decompress(jargon.read_bytes()).decode("utf-8", "replace")))
    fortunes = debian_package("fortunes") / DEBIAN["fortunes"]
    for f in sorted(fortunes.rglob("*")):
        if f.is_file() and not f.is_symlink() and f.suffix not in (".dat", ".u8"):
            text = f.read_bytes().decode("utf-8", "replace").replace("\n%\n", "\n\n")  # records -> paragraphs
            out.append((f"fortunes/{f.relative_to(fortunes)}", text))
    for package, pattern in MANUALS.items() if preset.manuals else ():
        folder = debian_package(package) / DEBIAN[package]
        for f in sorted(folder.rglob(pattern)):
            if f.is_file() and not f.is_symlink():
                out.append((f"{package}/{f.relative_to(folder)}", f.read_bytes().decode("utf-8", "replace")))
    if preset.stdlib:
        import sysconfig

        lib = Path(sysconfig.get_paths()["stdlib"])
        for f in sorted(lib.rglob("*.py")):
            rel = f.relative_to(lib)
            if rel.parts[0] in ("site-packages", "dist-packages") or not f.is_file():
                continue
            out.append((f"python-stdlib/{rel}", f.read_bytes().decode("utf-8", "replace")))
    return out


def package_versions(preset: Preset) -> dict[str, Any]:
    """Where the corpus comes from: each Debian package's version (from the .deb that was extracted, and from
    dpkg-query where the package is also installed), and the Python whose standard library is read."""
    out: dict[str, Any] = {}
    names = ["jargon-text", "fortunes", *(MANUALS if preset.manuals else ())]
    for name in names:
        deb = (debian_package(name) / ".complete").read_text().strip()
        parts = deb.split("_")
        installed = None
        try:
            proc = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", name], capture_output=True, text=True)
            installed = proc.stdout.strip() if proc.returncode == 0 and proc.stdout.strip() else None
        except OSError:
            pass
        out[name] = {"deb": deb, "version": unquote(parts[1]) if len(parts) > 2 else None, "installed": installed}
    if preset.stdlib:
        import sysconfig

        out["python-stdlib"] = {"version": platform.python_version(), "path": sysconfig.get_paths()["stdlib"]}
    return out


def split_corpus(preset: Preset, folder: Path) -> dict[str, Any]:
    """Whole files into heldout / valid / pretrain / continue .txt files in FOLDER (study_corpus.py), the training
    parts cleaned of held-out text; corpus.json (written last, so a folder without it is rebuilt) says how."""
    done = folder / "corpus.json"
    if done.is_file():
        return json.loads(done.read_text())
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = source_texts(preset)
    docs = study_corpus.documents(files)
    # the continuation gets its share of the training text by the runs' token budgets (the parent's when pretrained)
    cont = preset.continue_tokens or preset.arm_tokens
    share = cont / (cont + (preset.parent_tokens if preset.parent == "scratch" else 0))
    # a parent pretrained on more tokens than the corpus holds (--parent-scale) repeats its part; the arms' part
    # still gets their tokens (at ~3.0 bytes per token, as the 4k BPE cuts this corpus)
    spec = study_corpus.SplitSpec(
        preset.heldout_bytes, preset.valid_bytes, share, preset.text_bytes, continue_min_bytes=3 * cont
    )
    parts, overlap = study_corpus.clean(study_corpus.assign(docs, spec))
    info: dict[str, Any] = {"unit": "file", "files": len(docs), "sources": {}}
    for d in docs:
        row = info["sources"].setdefault(d.source, {"files": 0, "bytes": 0})
        row["files"] += 1
        row["bytes"] += d.size
    info |= study_corpus.write_parts(parts, tmp)
    info["overlap"] = overlap
    info["packages"] = package_versions(preset)
    (tmp / "corpus.json").write_text(json.dumps(info, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return info


def train_tokenizer(corpus: Path, vocab: int, out: Path):
    """Byte-level BPE of `vocab` tokens on the training parts (never the held-out one); EOS <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(corpus / p / f"{p}.txt") for p in ("pretrain", "continue")], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.save_pretrained(out)
    return fast


def study_tokenizer(work: Path, preset: Preset):
    """The study's tokenizer in WORK: trained on the training parts once, then read back (a carried corpus puts
    its own there)."""
    from transformers import AutoTokenizer

    if (work / "tokenizer" / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(work / "tokenizer")
    return train_tokenizer(work / "corpus", preset.vocab, work / "tokenizer")


# --- the corpus carried pre-tokenised (a GPU machine has no network: no Debian packages there) ----------------

CARRIED_PARTS = ("pretrain", "continue", "heldout", "valid")


def _part_files(corpus: Path, info: dict[str, Any]) -> dict[str, Path]:
    """Each text file of the split, by its path under the corpus folder (the by-source held-out files too)."""
    files = {f"{p}/{p}.txt": corpus / p / f"{p}.txt" for p in CARRIED_PARTS}
    for row in info["heldout_by_source"].values():
        files[f"heldout-by-source/{row['path']}"] = corpus / "heldout-by-source" / row["path"]
    return files


def _stream(data: Path, tok: Any, cache: Path, valid: Path, field: dict[str, str]) -> np.ndarray:
    """DATA's token stream as the training loop reads it (each document's ids, then EOS), through its own cache."""
    from upcycle.train.data import prepare

    blocks, _, _ = prepare(str(data), tok, 1, eval_data=str(valid), cache_dir=cache, **field)
    return np.fromfile(blocks.path, dtype=blocks.dtype)[: blocks.n_tokens].astype(np.int64)


def export_corpus(work: Path, preset: Preset, info: dict[str, Any], dest: Path) -> dict[str, Any]:
    """WORK's corpus split, tokenised, into DEST for a machine without the text's sources: the tokenizer, and each
    part as a parquet file of documents' token ids (`input_ids`, EOS left out: `upcycle train` appends it), which
    `upcycle train --text-field input_ids` reads into the very blocks the text gives (checked here, part by part).
    corpus.json: the split's record plus each carried file's tokens, documents and sha256. Built beside DEST and
    renamed into place."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tok = study_tokenizer(work, preset)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save_pretrained(tmp / "tokenizer")
    corpus, eos = work / "corpus", tok.eos_token_id
    valid = corpus / "valid" / "valid.txt"
    carried: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(dir=tmp) as cache:
        for name, text in _part_files(corpus, info).items():
            ids = _stream(text, tok, Path(cache), valid, {})  # (tokens,)
            ends = np.flatnonzero(ids == eos)  # (documents,) where each document's EOS is
            lengths = np.diff(np.concatenate([[-1], ends])) - 1  # (documents,) ids of each, EOS left out
            if not len(ids) or ends[-1] != len(ids) - 1 or (lengths == 0).any():
                raise SystemExit(f"error: {name}: EOS inside a document; it cannot be carried as documents' ids")
            values = np.delete(ids, ends).astype(np.uint16 if len(tok) <= 1 << 16 else np.int32)
            offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]), type=pa.int32())  # (documents+1,)
            out = (tmp / name).with_suffix(".parquet")
            out.parent.mkdir(parents=True, exist_ok=True)
            table = pa.table({"input_ids": pa.ListArray.from_arrays(offsets, pa.array(values))})
            pq.write_table(table, out, compression="zstd")
            back = _stream(out, tok, Path(cache), valid, {"text_field": "input_ids"})
            if not np.array_equal(back, ids):
                raise SystemExit(f"error: {name}: the carried ids do not give the text's token stream")
            rel = out.relative_to(tmp).as_posix()
            carried[rel] = {"tokens": len(ids), "documents": len(ends), "sha256": study_corpus.sha256(out)}
    info = dict(
        info, carried={"files": carried, "tokenizer": study_corpus.sha256(tmp / "tokenizer" / "tokenizer.json")}
    )
    (tmp / "corpus.json").write_text(json.dumps(info, indent=2))
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return info


def carried_corpus(root: Path, work: Path) -> tuple[dict[str, Any], dict[str, str], dict[str, str]]:
    """A corpus made by --export-corpus: its record, the parts' folders and the by-source held-out files; its
    tokenizer goes into WORK (the parent is made with it). The runs read it as token ids (DATA_FIELD)."""
    manifest = root / "corpus.json"
    if not manifest.is_file():
        raise SystemExit(f"error: --corpus {_public(str(root))} has no corpus.json: make it with --export-corpus")
    info = json.loads(manifest.read_text())
    for rel, row in info["carried"]["files"].items():
        if not (root / rel).is_file() or study_corpus.sha256(root / rel) != row["sha256"]:
            raise SystemExit(f"error: --corpus: {rel} is missing or changed since it was exported; export it again")
    if not (work / "tokenizer" / "tokenizer.json").is_file():
        shutil.copytree(root / "tokenizer", work / "tokenizer", dirs_exist_ok=True)
    DATA_FIELD["text_field"] = "input_ids"
    data = {p: str(root / p) for p in CARRIED_PARTS}
    by_source = {
        src: str((root / "heldout-by-source" / row["path"]).with_suffix(".parquet"))
        for src, row in info["heldout_by_source"].items()
    }
    return info, data, by_source


# --- results of several runs as one ---------------------------------------------------------------------


def merge(parts: list[Path], out: Path) -> dict[str, Any]:
    """The results of several runs of one preset (a GPU run holds two arms and one seed) as one record: the runs
    of every part (an arm and seed found twice must agree), their sweeps, sizes and FLOPs. Parts whose parents
    differ (sha256 of the weights) are refused: their arms would not share a starting point."""
    records = [json.loads(p.read_text()) for p in parts]
    parents = {(r.get("parent") or {}).get("sha256") for r in records}
    if len(parents) != 1 or None in parents:
        raise SystemExit(
            "error: --merge: the parts were made from different parents (or one without a recorded "
            "hash); merge only runs that pretrained the same parent (same preset, corpus and GPU kind)"
        )
    keys = [k for k in records[0]["preset"] if k not in ARM_ONLY]
    if any({k: r["preset"][k] for k in keys} != {k: records[0]["preset"][k] for k in keys} for r in records):
        raise SystemExit("error: --merge: the parts ran different presets; merge runs of one preset")
    merged = dict(records[0], runs=[], sweep_runs=[], merged_from=[p.name for p in parts])
    for key in ("arms", "active_params", "total_params", "flops_per_token"):
        merged[key] = {k: v for r in records for k, v in (r.get(key) or {}).items()}
    merged["lr_sweep"] = dict(records[0].get("lr_sweep") or {}, arms={})
    for r in records:
        merged["lr_sweep"]["arms"] |= (r.get("lr_sweep") or {}).get("arms", {})
    for key in ("runs", "sweep_runs"):
        seen: dict[tuple[str, int, float], dict[str, Any]] = {}
        for r in records:
            for run in r.get(key) or []:
                at = (run["arm"], run["seed"], run["lr"])
                if at in seen and seen[at]["evals"] != run["evals"]:
                    raise SystemExit(f"error: --merge: {key} {at} differs between parts (not repeatable runs)")
                seen.setdefault(at, run)
        merged[key] = list(seen.values())
    merged["complete"] = all(r.get("complete") for r in records)
    write(merged, out)
    merged["pngs"] = [_public(p) for p in plot(merged, out.with_suffix(""))]
    write(merged, out)
    return merged


# --- the dense models -----------------------------------------------------------------------------------


def llama_config(preset: Preset, tokenizer) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=preset.hidden,
        intermediate_size=preset.intermediate,
        num_hidden_layers=preset.layers,
        num_attention_heads=preset.heads,
        num_key_value_heads=preset.kv_heads,
        max_position_embeddings=preset.seq_len,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def _shared_fields(cfg: Any) -> dict[str, Any]:
    keys = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "rms_norm_eps",
        "rope_parameters",
        "hidden_act",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
    )
    return {k: getattr(cfg, k) for k in keys if getattr(cfg, k, None) is not None}


def _check_same_logits(a, b, vocab: int, what: str) -> float:
    import torch

    ids = torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (a(ids).logits - b(ids).logits).abs().max().item()
    if diff > 1e-4:
        raise SystemExit(f"{what}: logits differ by {diff}; the mapping is wrong")
    return diff


# --- counting ------------------------------------------------------------------------------------------


def active_params(folder: Path) -> tuple[int, int]:
    """(total, active per token): routed expert tensors count top_k/E of their size; embeddings count once."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None) or 1
    top_k = getattr(cfg, "num_experts_per_tok", 1)
    total = active = 0
    for name, p in model.named_parameters():
        total += p.numel()
        routed = ".experts." in name and "shared" not in name
        active += p.numel() * top_k // experts if routed else p.numel()
    return total, active


def flops_per_token(folder: Path, active: int, seq_len: int) -> int:
    """Training FLOPs per token: 6 · N_active + 12 · L · d · S (forward and backward of the weights, and of the
    attention scores and values over a sequence of S tokens)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(folder)
    return 6 * active + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq_len


FLOPS_FORMULA = "6 · N_active + 12 · L · d · S per token (N_active: routed experts at top-k/E, tied embedding once)"


def widened_parent(parent: Path, wider: int, noise: float, seed: int, out: Path) -> dict[str, Any]:
    """The parent with `wider` FFN neurons per layer (net2net.py), saved as a Llama folder; checked on logits."""
    import net2net
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    src = LlamaForCausalLM.from_pretrained(parent, dtype=torch.float32).eval()
    exact = net2net.widen_llama(src, wider, noise=0.0, seed=seed).eval()
    diff_exact = _check_same_logits(src, exact, src.config.vocab_size, "Net2Net widening (no noise)")
    wide = net2net.widen_llama(src, wider, noise=noise, seed=seed).eval()
    diff = _check_same_logits(src, wide, src.config.vocab_size, "Net2Net widening (with noise)")
    wide.save_pretrained(out)
    AutoTokenizer.from_pretrained(parent).save_pretrained(out)
    return {
        "intermediate": wider,
        "noise": noise,
        "max_abs_logit_diff": diff,
        "max_abs_logit_diff_no_noise": diff_exact,
    }


# --- one run (in a worker process) ----------------------------------------------------------------------


def eval_losses(
    model_dir: Path, evals: dict[str, str], train: str, preset: Preset, text_field: str = "text"
) -> dict[str, float | None]:
    """Mean next-token loss of MODEL over the blocks of each eval text (None: a text shorter than one block)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from upcycle.errors import UpcycleError
    from upcycle.source import cache_dir
    from upcycle.train.data import prepare

    tok = AutoTokenizer.from_pretrained(model_dir)
    device = torch.device(preset.device)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    out: dict[str, float | None] = {}
    for name, path in evals.items():
        try:
            _, blocks, _ = prepare(
                train, tok, preset.seq_len, text_field=text_field, eval_data=path, cache_dir=cache_dir() / "tokens"
            )
        except UpcycleError:
            out[name] = None
            continue
        total, count = 0.0, 0
        with torch.no_grad(), _autocast(preset, device):
            for start in range(0, blocks.n_blocks, preset.micro_batch):
                ids = blocks.blocks(range(start, min(start + preset.micro_batch, blocks.n_blocks))).to(device)
                n = ids.shape[0] * (ids.shape[1] - 1)
                total += model(input_ids=ids, labels=ids).loss.double().item() * n
                count += n
        out[name] = total / count if count else None
    return out


def _autocast(preset: Preset, device):
    import contextlib

    import torch

    return torch.autocast(device.type, dtype=torch.bfloat16) if preset.dtype == "bf16" else contextlib.nullcontext()


def train_run(job: dict[str, Any]) -> dict[str, Any]:
    """Train job["model"] with upcycle's training loop; return its eval curve. Runs in a spawned process.

    job: arm, seed, model, run_dir, train (its text), eval (the text of the curve), by_source ({source: text},
    evaluated at the start and at the end), tokens, lr, warmup (None: the preset's share), evals, aux, z,
    eval_at_start, threads, preset."""
    import torch

    from upcycle.train.checkpoint import latest_checkpoint
    from upcycle.train.loop import train
    from upcycle.train.metrics import read_metrics
    from upcycle.train.spec import TrainSpec

    preset = Preset(**job["preset"])
    torch.set_num_threads(job.get("threads") or preset.threads)
    model = Path(job["model"])
    starts = {"curve": job["eval"], **job.get("by_source", {})} if job["eval_at_start"] else {}
    field = job.get("text_field", "text")  # "input_ids": a carried pre-tokenised corpus (--corpus)
    start = eval_losses(model, starts, job["train"], preset, field) if starts else {}
    steps = max(1, job["tokens"] // (preset.seq_len * preset.micro_batch))
    warmup = job.get("warmup")
    spec = TrainSpec(
        data=job["train"],
        eval_data=job["eval"],
        seq_len=preset.seq_len,
        micro_batch=preset.micro_batch,
        steps=steps,
        lr=job["lr"],
        warmup=max(1, round(preset.warmup_frac * steps)) if warmup is None else warmup,
        eval_every=max(1, steps // job["evals"]),
        # at every eval (and the last step), or more often (job["saves"]): a killed run resumes from the last
        save_every=max(1, steps // max(job["evals"], job.get("saves", 0))),
        keep_last=2,  # the last two: a run killed while writing one still has the other
        log_every=max(1, steps // 50),
        seed=job["seed"],
        aux_loss_coef=job["aux"],
        z_loss_coef=job["z"],
        dtype=preset.dtype,
        text_field=field,
        deterministic=preset.device == "cuda",  # bitwise-repeatable GPU runs: each GPU run pretrains the same parent
    )
    run_dir = Path(job["run_dir"])
    # the same job killed part-way resumes from its last checkpoint (exactly: upcycle train's --resume); any
    # other content of RUN_DIR is moved aside
    stamp = _stamp(run_dir)
    resume = (
        stamp.is_file() and json.loads(stamp.read_text()) == _job_key(job) and latest_checkpoint(run_dir) is not None
    )
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(_job_key(job)))
    t0 = time.perf_counter()
    result = train(str(model), run_dir, spec, resume=resume, force=not resume)
    wall = time.perf_counter() - t0
    records = read_metrics(Path(job["run_dir"]))
    evals = [{"tokens": 0, "eval_loss": start["curve"]}] if "curve" in start else []
    evals += [{"tokens": r["tokens"], "eval_loss": r["eval_loss"]} for r in records if r["kind"] == "eval"]
    train_loss = [{"tokens": r["tokens"], "lm": r["lm"]} for r in records if r["kind"] == "train"]
    final = result.summary.get("final")
    by_source = {}
    if job.get("by_source") and final:
        end = eval_losses(Path(final), job["by_source"], job["train"], preset, field)
        by_source = {k: {"start": start.get(k), "final": v} for k, v in end.items()}
    return {
        "arm": job["arm"],
        "seed": job["seed"],
        "lr": job["lr"],
        "warmup_steps": spec.warmup,
        "steps": steps,
        "tokens": steps * preset.seq_len * preset.micro_batch,
        "train_data": job["train"],
        "eval_data": job["eval"],
        "wall_s": wall,
        "tokens_per_s": result.summary.get("tokens_per_s"),
        "resumed_from_step": result.summary.get("resumed_from"),  # wall_s and tokens_per_s: this process's part
        "part_s": part_seconds(records),
        "evals": evals,
        "heldout_by_source": by_source,
        "train_lm": train_loss,
        "final": final,
    }


# --- the study ------------------------------------------------------------------------------------------


def upcycle_cmd() -> list[str]:
    """`upcycle` as a command: the module, so that it also runs where no console script sits beside the
    interpreter (the GPU machine installs the project with `pip --target`)."""
    return [sys.executable, "-m", "upcycle_cli.main"]


def convert(parent: Path, out: Path, flags: list[str], seed: int, log: Path) -> None:
    cmd = [*upcycle_cmd(), "convert", str(parent), str(out), *flags, "--seed", str(seed), "--force"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    with log.open("a") as f:
        f.write(f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}\n")
    if proc.returncode != 0:
        raise SystemExit(f"upcycle convert failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")


# the parent saves a checkpoint every 1/PARENT_SAVES of its steps (its evals are 4): at --parent-scale 2 on this
# CPU (~2.3 h) a kill loses at most ~4-5 min of pretraining
PARENT_SAVES = 32


def make_parent(preset: Preset, work: Path, data: dict[str, str], log: Path, record: dict[str, Any]) -> Path:
    """The dense parent: SmolLM2 (gpu), or a Llama pretrained from scratch by `upcycle train`'s loop."""
    if preset.parent != "scratch":
        from upcycle.source import resolve

        return resolve(preset.parent).folder
    parent = work / "parent"
    if (parent / ".complete").is_file():
        record["parent"] = json.loads((parent / ".complete").read_text())
        record["parent"].setdefault("sha256", study_corpus.sha256(parent / "model.safetensors"))
        return parent
    import torch
    from transformers import LlamaForCausalLM

    tok = study_tokenizer(work, preset)
    init = work / "parent-init"
    torch.manual_seed(0)
    LlamaForCausalLM(llama_config(preset, tok)).save_pretrained(init)
    tok.save_pretrained(init)
    job = {
        "arm": "parent",
        "seed": 0,
        "model": str(init),
        "run_dir": str(work / "runs" / "parent"),
        "train": data["pretrain"],
        "eval": data["heldout"],
        "tokens": preset.parent_tokens,
        "lr": preset.parent_lr,
        "evals": 4,
        "saves": PARENT_SAVES,
        "aux": 0.0,
        "z": 0.0,
        "eval_at_start": False,
        # every core: alone on an idle machine two threads train 1.8x as fast as one (on a loaded machine they
        # ran at half the speed of one; pass --parent-threads 1 there)
        "threads": preset.parent_threads or os.cpu_count() or 1,
        "preset": asdict(preset),
        **DATA_FIELD,
    }
    print(f"pretraining the parent: {preset.parent_tokens:,} tokens", flush=True)
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        res = pool.submit(train_run, job).result()
    tmp = work / "parent.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(res["final"], tmp)
    total, _ = active_params(tmp)
    parts = res["part_s"] or [res["wall_s"]]
    info = {
        "params": total,
        "non_embedding_params": total - preset.vocab * preset.hidden,
        "train_data": res["train_data"],
        "final_lr": 0.1 * preset.parent_lr,  # cosine decay to 10% of the peak
        "tokens": res["tokens"],
        "tokens_per_param": res["tokens"] / total,
        # the training time of all its processes (a parent killed after a checkpoint resumes: --parent-scale 2's
        # hours span sessions); tokens_per_s is the last process's
        "wall_s": res["wall_s"] if len(parts) == 1 else sum(parts),
        "part_s": parts,
        "tokens_per_s": res["tokens_per_s"],
        "evals": res["evals"],
        "sha256": study_corpus.sha256(tmp / "model.safetensors"),
    }
    (tmp / ".complete").write_text(json.dumps(info))
    shutil.rmtree(parent, ignore_errors=True)
    os.replace(tmp, parent)
    record["parent"] = info
    return parent


def arm_model(arm: str, seed: int, parent: Path, work: Path, log: Path, preset: Preset) -> Path:
    """The folder ARM's run with SEED starts from (made once, then reused)."""
    spec = ARMS[arm]
    (work / "models").mkdir(parents=True, exist_ok=True)
    if spec.model == "parent":  # the parent's own folder: `upcycle train` trains a dense Llama as it is
        return parent
    if spec.model == "wide":
        return wide_model(seed, parent, work, log, preset)
    out = work / "models" / f"{spec.uses or arm}-s{seed}"
    if not (out / "config.json").is_file():  # upcycle convert writes beside and renames: a folder is complete
        convert(parent, out, list(spec.flags or ()), seed, log)
    return out


def wide_model(seed: int, parent: Path, work: Path, log: Path, preset: Preset) -> Path:
    """The parent widened (Net2Net) to the every-layer MoE's active parameters: a Llama folder."""
    out = work / "models" / f"dense-wide-s{seed}"
    if (out / "config.json").is_file():
        return out
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(parent)
    _, moe_active = active_params(arm_model("moe-all", seed, parent, work, log, preset))
    _, dense_active = active_params(parent)
    per_neuron = 3 * cfg.hidden_size * cfg.num_hidden_layers
    # to a multiple of 8 neurons (aligned matmul strides)
    wider = 8 * round((cfg.intermediate_size + (moe_active - dense_active) / per_neuron) / 8)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    info = widened_parent(parent, wider, preset.wide_noise, seed, tmp)
    (tmp / "net2net.json").write_text(json.dumps(info, indent=2))
    os.replace(tmp, out)
    return out


def final_ppl(run: dict[str, Any], last: int = 2) -> float | None:
    """Perplexity of the mean eval loss of RUN's last `last` evals (its start excluded)."""
    tail = [e["eval_loss"] for e in run["evals"] if e["tokens"] > 0][-last:]
    return math.exp(statistics.fmean(tail)) if tail else None


def _paired(mine: dict[int, float], ref: dict[int, float]) -> dict[str, Any]:
    """MINE against REF in %, paired by seed: each seed, the mean and the sd (the resolution) over seeds."""
    diffs = [100 * (v / ref[s] - 1) for s, v in mine.items() if s in ref]
    if not diffs:
        return {}
    return {
        "pct_by_seed": diffs,
        "pct_mean": statistics.fmean(diffs),
        "pct_sd": statistics.stdev(diffs) if len(diffs) > 1 else None,
    }


def summarise(runs: list[dict[str, Any]], last: int = 2) -> dict[str, Any]:
    """Per arm: perplexity of the mean of the last `last` evals, mean/sd/min/max over seeds; paired Δ against
    dense and against the widened dense; per source of the held-out files, the final perplexity and Δ vs dense."""
    per: dict[str, dict[int, float]] = {}
    source_ppl: dict[str, dict[str, dict[int, float]]] = {}
    for r in runs:
        ppl = final_ppl(r, last)
        if ppl is not None:
            per.setdefault(r["arm"], {})[r["seed"]] = ppl
        for source, loss in (r.get("heldout_by_source") or {}).items():
            if loss.get("final") is not None:
                source_ppl.setdefault(r["arm"], {}).setdefault(source, {})[r["seed"]] = math.exp(loss["final"])
    out: dict[str, Any] = {}
    for arm, by_seed in per.items():
        ppl = list(by_seed.values())
        row: dict[str, Any] = {
            "seeds": sorted(by_seed),
            "ppl_mean": statistics.fmean(ppl),
            "ppl_sd": statistics.stdev(ppl) if len(ppl) > 1 else None,
            "ppl_min": min(ppl),
            "ppl_max": max(ppl),
            "ppl_by_seed": {str(s): v for s, v in by_seed.items()},
        }
        for ref, key in (("dense", "vs_dense"), ("dense-wide", "vs_dense_wide")):
            paired = _paired(by_seed, per.get(ref, {})) if arm != ref else {}
            if paired:
                row[f"{key}_pct_by_seed"] = paired["pct_by_seed"]
                row[f"{key}_pct_mean"] = paired["pct_mean"]
                row[f"{key}_pct_sd"] = paired["pct_sd"]
        sources = source_ppl.get(arm, {})
        if sources:
            ref = source_ppl.get("dense", {})
            row["by_source"] = {}
            for src, values in sorted(sources.items()):
                cell = {"ppl_mean": statistics.fmean(values.values())}
                paired = _paired(values, ref.get(src, {})) if arm != "dense" else {}
                if paired:
                    cell["vs_dense_pct_mean"] = paired["pct_mean"]
                row["by_source"][src] = cell
        out[arm] = row
    seeds_dense = list(per.get("dense", {}).values())
    if len(seeds_dense) > 1:
        out["_noise"] = {"dense_seed_spread_pct": 100 * (max(seeds_dense) / min(seeds_dense) - 1)}
    return out


def curves(record: dict[str, Any], arm: str, axis: str) -> dict[int, list[tuple[float, float]]]:
    """seed -> [(x, perplexity)] of ARM's runs; x is tokens, or training FLOPs (the record's FLOPs per token;
    records written before issue 25 have only 6 × active parameters)."""
    runs = [r for r in record["runs"] if r["arm"] == arm]
    scale = 1
    if axis == "flops" and runs:
        scale = (record.get("flops_per_token") or {}).get(arm) or 6 * record["active_params"][arm]
    return {r["seed"]: [(e["tokens"] * scale, math.exp(e["eval_loss"])) for e in r["evals"]] for r in runs}


def vs_dense(record: dict[str, Any], arm: str, axis: str) -> dict[float, list[float]]:
    """x -> ARM's perplexity against dense's at the same x (tokens or FLOPs), in %, one value per paired seed.
    Dense's curve is interpolated linearly between its evals; points past its last eval are left out, and so are
    the runs' starting points (x = 0)."""
    dense, out = curves(record, "dense", axis), {}
    for seed, points in curves(record, arm, axis).items():
        if seed not in dense:
            continue
        xd, yd = zip(*dense[seed], strict=True)
        for x, ppl in points:
            if 0 < x <= xd[-1]:
                i = next(j for j in range(1, len(xd)) if xd[j] >= x)
                ref = yd[i - 1] + (yd[i] - yd[i - 1]) * (x - xd[i - 1]) / (xd[i] - xd[i - 1])
                out.setdefault(x, []).append(100 * (ppl / ref - 1))
    return out


def plot(record: dict[str, Any], stem: Path) -> list[str]:
    """One PNG per x axis (tokens, FLOPs): perplexity per arm, and beside it each arm against dense (paired)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for axis, label in (
        ("tokens", "training tokens (continuation)"),
        ("flops", "training FLOPs (6·N_active + 12·L·d·S per token)"),
    ):
        fig, (ax, rel) = plt.subplots(1, 2, figsize=(13, 4.8))
        shown: list[float] = []
        for arm in record["arms"]:
            per_seed = curves(record, arm, axis)
            if not per_seed:
                continue
            per_x: dict[float, list[float]] = {}
            for points in per_seed.values():
                for x, ppl in points:
                    per_x.setdefault(x, []).append(ppl)
            xs = sorted(per_x)
            mean = [statistics.fmean(per_x[x]) for x in xs]
            n = len(per_seed)
            (line,) = ax.plot(xs, mean, marker="o", ms=3, label=f"{_label(record, arm)} ({n} seed{'s' * (n > 1)})")
            if n > 1:
                ax.fill_between(
                    xs, [min(per_x[x]) for x in xs], [max(per_x[x]) for x in xs], color=line.get_color(), alpha=0.2
                )
            diff = vs_dense(record, arm, axis) if arm != "dense" else {}
            if diff:
                dx = sorted(diff)
                rel.plot(dx, [statistics.fmean(diff[x]) for x in dx], marker="o", ms=3, color=line.get_color())
                lo, hi = [min(diff[x]) for x in dx], [max(diff[x]) for x in dx]
                rel.fill_between(dx, lo, hi, color=line.get_color(), alpha=0.2)
                shown += lo + hi
        ax.set_xlabel(label)
        ax.set_ylabel("held-out perplexity")
        ax.set_yscale("log")
        parent = record.get("parent", {})
        size = f", parent {parent['params'] / 1e6:.2f}M params" if parent.get("params") else ""
        ax.set_title(f"upcycle vs dense, preset {record['preset_name']}{size} (band: min-max over seeds)", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        rel.axhline(0, color="black", lw=1, label="dense")
        rel.set_xlabel(label)
        rel.set_ylabel("perplexity vs dense at the same x, % (paired by seed)")
        rel.set_title("against dense (below 0: better than dense)", fontsize=10)
        if shown:  # the converted models' starting points are left out: Drop-Upcycling's would flatten the rest
            span = max(shown) - min(shown)
            rel.set_ylim(min(min(shown), 0) - 0.1 * span, max(max(shown), 0) + 0.1 * span)
        rel.grid(True, alpha=0.3)
        fig.tight_layout()
        path = stem.with_name(f"{stem.name}_{axis}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))
    return written


def _label(record: dict[str, Any], arm: str) -> str:
    return (record.get("arms") or {}).get(arm, {}).get("label") or ARM_LABELS.get(arm, arm)


def write(record: dict[str, Any], path: Path) -> None:
    record["summary"] = summarise(record["runs"])
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(published(record, WORK[0] if WORK else None), indent=2) + "\n")
    os.replace(tmp, path)


WORK: list[Path] = []  # the work folder of this study (main sets it), written as "<work>" in the results JSON
DATA_FIELD: dict[str, str] = {}  # {"text_field": "input_ids"} when the corpus is a carried pre-tokenised one


def published(value: Any, work: Path | None) -> Any:
    """VALUE with no local path in it (in any string, the command line's too): the work folder as <work>, the
    --text-cache folder as <text-cache>, the repository's paths relative to it, the home folder as ~ (the results
    JSON is committed; a local path is nobody else's)."""
    if isinstance(value, dict):
        return {k: published(v, work) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [published(v, work) for v in value]
    if not isinstance(value, str):
        return value
    if work is not None:  # first: the work folder may be in the home folder
        value = value.replace(str(work), "<work>")
    for cache in TEXT_CACHE:  # --text-cache, likewise
        value = value.replace(str(cache), "<text-cache>")
    value = value.replace(f"{ROOT}/", "")
    home = str(Path.home())
    return value.replace(f"{home}/", "~/") if home != "/" else value


def _pkg(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def machine(preset: Preset) -> dict[str, Any]:
    import torch

    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    gpu = torch.cuda.get_device_name(0) if preset.device == "cuda" and torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "load_avg_at_start": os.getloadavg(),
        "gpu": gpu,
        "os": platform.platform(),
        "versions": {k: _pkg(k) for k in ("torch", "transformers", "tokenizers", "upcycle")}
        | {"python": platform.python_version()},
    }


def parse(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument(
        "--arms", help="comma-separated subset of: " + ", ".join(ARMS) + " (default: the preset's; cpu: the core five)"
    )
    parser.add_argument("--seeds", help="comma-separated seeds (default: the preset's)")
    parser.add_argument("--jobs", type=int, help="runs at a time (default: the preset's)")
    parser.add_argument("--arm-tokens", type=int, help="tokens per arm run (default: the preset's)")
    parser.add_argument(
        "--lr-sweep",
        action=argparse.BooleanOptionalAction,
        help="first train each arm at the preset's sweep lrs (one step more past an edge best), then at its best "
        "(default: the preset's; on for cpu and cpu-long)",
    )
    parser.add_argument("--parent-scale", type=int, default=1, help="a larger parent: hidden, FFN and heads times N")
    parser.add_argument("--parent-tokens", type=int, help="pretraining tokens of a --parent-scale parent")
    parser.add_argument("--parent-threads", type=int, help="torch threads for the parent (default: every core)")
    parser.add_argument(
        "--keep-checkpoints",
        nargs="?",
        type=Path,
        const=True,
        default=True,
        metavar="PATH",
        help="keep each run's last checkpoint beside final/ (the default); with PATH, also copy final/ there (another "
        "job's copy of the same run name is set aside as RUN@<digest>)",
    )
    parser.add_argument("--no-keep-checkpoints", dest="keep_checkpoints", action="store_const", const=False)
    parser.add_argument(
        "--work", type=Path, help="work folder (default: the user cache, studies/upcycle_vs_dense/<preset>)"
    )
    parser.add_argument(
        "--results", type=Path, help="JSON path (default benchmarks/results/upcycle_vs_dense_<preset>.json)"
    )
    parser.add_argument("--text-cache", type=Path, help="where Debian's packages are kept (default: in the cache)")
    parser.add_argument("--replot", type=Path, metavar="JSON", help="only redraw the PNGs of a saved results file")
    parser.add_argument(
        "--export-corpus",
        type=Path,
        metavar="DIR",
        help="only write the preset's corpus split, tokenised (parquet token ids + the tokenizer), to DIR, to carry "
        "to a machine without the text's sources (the GPU's)",
    )
    parser.add_argument("--corpus", type=Path, metavar="DIR", help="train on a corpus written by --export-corpus")
    parser.add_argument(
        "--merge", type=Path, nargs="+", metavar="JSON", help="only merge results files of one preset into --results"
    )
    return parser, parser.parse_args(argv)


def configure(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Preset:
    if base_mismatch(args.preset):
        parser.error(f"preset {args.preset} differs from its base in {base_mismatch(args.preset)}")
    preset = PRESETS[args.preset]
    if args.parent_scale < 1 or (args.parent_tokens is not None and args.parent_tokens < 1):
        parser.error("--parent-scale and --parent-tokens take a whole number, 1 or more")
    base = PRESETS[preset.base] if preset.base else preset
    preset = replace(scaled(base, args.parent_scale, args.parent_tokens), **{k: getattr(preset, k) for k in ARM_ONLY})
    # the continuation part is sized by the base's arm tokens unless set: stated, so that another --arm-tokens (or a
    # preset on a base) reads the same corpus and the work folder's stamp says what it was made for
    preset = replace(preset, continue_tokens=preset.continue_tokens or base.arm_tokens)
    if args.seeds:
        preset = replace(preset, seeds=tuple(int(s) for s in args.seeds.split(",")))
    if args.jobs:
        preset = replace(preset, jobs=args.jobs)
    if args.arm_tokens:  # the corpus split and the parent stay the preset's, so they are reused
        preset = replace(preset, arm_tokens=args.arm_tokens)
    if args.parent_threads:
        preset = replace(preset, parent_threads=args.parent_threads)
    return preset


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser, args = parse(argv)
    if args.replot:
        saved = json.loads(args.replot.read_text())
        for png in plot(saved, args.replot.with_suffix("")):
            print(f"wrote {_public(png)}")
        return saved
    if args.merge:
        if not args.results:
            parser.error("--merge needs --results, the merged file to write")
        merged = merge(args.merge, args.results.resolve())
        print_table(merged)
        print(f"wrote {_public(str(args.results))}")
        return merged
    if args.text_cache:
        TEXT_CACHE[:] = [args.text_cache]
    preset = configure(parser, args)
    arms = [a for a in args.arms.split(",") if a] if args.arms else list(preset.arms or ARMS)
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        parser.error(f"unknown arm(s) {unknown}; choose from {', '.join(ARMS)}")
    big = args.parent_scale > 1 or args.parent_tokens is not None
    suffix = f"-x{args.parent_scale}" + (f"-{args.parent_tokens}" if args.parent_tokens else "") if big else ""
    work = (args.work or default_work(f"{preset.base or args.preset}{suffix}")).resolve()
    WORK[:] = [work]
    made_for = parent_settings(preset)
    if args.corpus:
        made_for["carried_corpus"] = study_corpus.sha256(args.corpus / "corpus.json")
    stamp = work / "made_for.json"  # what the corpus and parent in WORK were made with
    if stamp.is_file() and json.loads(stamp.read_text()) != made_for:
        parser.error(
            f"{_public(str(work))} holds a corpus and parent made with other settings: remove it or pass --work"
        )
    # the main runs' folder: the preset's, or its own for another --arm-tokens, so that runs of one length never
    # replace the kept runs of another in the same work folder (their job keys differ, so each would be rerun)
    own = args.arm_tokens and args.arm_tokens != PRESETS[args.preset].arm_tokens
    runs_name = f"{args.preset}-{preset.arm_tokens}" if own else args.preset
    (work / "runs" / runs_name).mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(made_for, indent=2))
    log = work / "log.txt"
    path = (args.results or HERE / "results" / f"upcycle_vs_dense_{args.preset}{suffix}.json").resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    record: dict[str, Any] = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python benchmarks/upcycle_vs_dense.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "preset_name": args.preset,
        "preset": asdict(preset),
        "machine": machine(preset),
        "arms": {a: {"label": ARMS[a].label, "flags": " ".join(_public(f) for f in ARMS[a].flags or [])} for a in arms},
        "flops_formula": FLOPS_FORMULA,
        "keep_checkpoints": _public(str(keep)) if isinstance(keep := args.keep_checkpoints, Path) else keep,
        "runs": [],
        "complete": False,
    }
    if args.export_corpus:
        info = export_corpus(work, preset, split_corpus(preset, work / "corpus"), args.export_corpus.resolve())
        total = sum(row["tokens"] for row in info["carried"]["files"].values())
        size = sum(f.stat().st_size for f in args.export_corpus.rglob("*") if f.is_file())
        print(f"wrote {_public(str(args.export_corpus))}: {total:,} tokens, {size / 2**20:.1f} MiB")
        return info
    if args.corpus:
        record["corpus"], data, by_source = carried_corpus(args.corpus.resolve(), work)
    else:
        record["corpus"] = split_corpus(preset, work / "corpus")
        data = {p: str(work / "corpus" / p) for p in CARRIED_PARTS}
        by_source = {
            src: str(work / "corpus" / "heldout-by-source" / row["path"])
            for src, row in record["corpus"]["heldout_by_source"].items()
        }
    parent = make_parent(preset, work, data, log, record)
    record["data_tokens"] = count_tokens(parent, data, preset)
    record["arm_epochs"] = preset.arm_tokens / record["data_tokens"]["continue"]  # above 1: the arms repeat text
    if "pretrain" in record["data_tokens"]:
        record["parent_epochs"] = preset.parent_tokens / record["data_tokens"]["pretrain"]
    print(f"parent ready ({time.perf_counter() - t_start:.0f} s); tokens: {record['data_tokens']}", flush=True)

    models = describe_models(arms, preset, parent, work, log, record)
    runner = Runner(preset, record, path, args.keep_checkpoints, args.preset, t_start)
    lrs = {a: preset.arm_lr for a in ARMS}
    if preset.lr_sweep if args.lr_sweep is None else args.lr_sweep:
        lrs |= sweep(arms, preset, models, data, work, runner, record)
    jobs = arm_jobs(arms, preset, models, data, by_source, lrs, work / "runs" / runs_name, record)
    write(record, path)
    runner.run(jobs, "runs")
    record["complete"] = True
    record["wall_s"] = time.perf_counter() - t_start
    write(record, path)
    record["pngs"] = [_public(p) for p in plot(record, path.with_suffix(""))]
    write(record, path)
    print_table(record)
    print(f"wrote {_public(str(path))}")
    return published(record, work)  # as the JSON has it


def describe_models(
    arms: list[str], preset: Preset, parent: Path, work: Path, log: Path, record: dict[str, Any]
) -> dict[tuple[str, int], Path]:
    """Each (arm, seed)'s starting folder; the arms' parameters (total, active) and FLOPs per token in RECORD."""

    models: dict[tuple[str, int], Path] = {}
    record["active_params"], record["total_params"], record["flops_per_token"] = {}, {}, {}
    _, dense_active = active_params(parent)
    record["flops_per_token"]["_parent"] = flops_per_token(parent, dense_active, preset.seq_len)
    for seed in preset.seeds:
        for arm in arms:
            model = models[arm, seed] = arm_model(arm, seed, parent, work, log, preset)
            total, active = active_params(model)
            record["total_params"][arm], record["active_params"][arm] = total, active
            record["flops_per_token"][arm] = flops_per_token(model, active, preset.seq_len)
            if ARMS[arm].model == "wide":
                record["net2net"] = json.loads((model / "net2net.json").read_text())
    return models


def arm_jobs(
    arms: list[str],
    preset: Preset,
    models: dict[tuple[str, int], Path],
    data: dict[str, str],
    by_source: dict[str, str],
    lrs: dict[str, float],
    runs: Path,
    record: dict[str, Any],
) -> list[dict[str, Any]]:
    """The main runs: dense and the every-layer MoE first, every seed, so that a study cut short has them."""
    first = [a for a in arms if a in ("dense", "moe-all", "moe-all-flop")]
    order = [(a, s) for group in (first, [a for a in arms if a not in first]) for s in preset.seeds for a in group]
    fpt = record["flops_per_token"]
    jobs = []
    for arm, seed in order:
        spec = ARMS[arm]
        tokens = preset.arm_tokens
        if spec.flop_matched:  # its own full schedule, ending where dense's FLOPs end
            block = preset.seq_len * preset.micro_batch
            tokens = max(1, preset.arm_tokens * fpt["_parent"] // fpt[arm] // block) * block
        lr = lrs[spec.uses or arm]
        if not spec.rewarm:
            lr = (record.get("parent") or {}).get("final_lr") or preset.arm_lr
        jobs.append(
            {
                "arm": arm,
                "seed": seed,
                "model": str(models[arm, seed]),
                "run_dir": str(runs / f"{arm}-s{seed}"),
                "train": data["continue"],
                "eval": data["heldout"],
                "by_source": by_source,
                "tokens": tokens,
                "lr": lr,
                "warmup": None if spec.rewarm else 0,
                "evals": preset.evals,
                "aux": 0.0 if spec.flags is None else 0.01,
                "z": 0.0 if spec.flags is None else 0.001,
                "eval_at_start": True,
                "preset": asdict(preset),
                **DATA_FIELD,
            }
        )
    return jobs


def sweep(
    arms: list[str],
    preset: Preset,
    models: dict[tuple[str, int], Path],
    data: dict[str, str],
    work: Path,
    runner: Runner,
    record: dict[str, Any],
) -> dict[str, float]:
    """Each re-warmed arm at every sweep lr (first seed, sweep tokens, judged on the validation part), the best lr
    of each by the perplexity of the mean of its last two validation evals; an arm whose best is at an edge of the
    grid gets one run more, one step (1-3-10) beyond that edge, and one whose best is still at an edge is flagged."""
    seed, tokens = preset.seeds[0], preset.sweep_tokens or preset.arm_tokens
    swept = sorted({ARMS[a].uses or a for a in arms if ARMS[a].rewarm})
    model = {arm: next(models[a, seed] for a in arms if (ARMS[a].uses or a) == arm) for arm in swept}  # flop: moe-all's

    def job(arm: str, lr: float) -> dict[str, Any]:
        return {
            "arm": arm,
            "seed": seed,
            "model": str(model[arm]),
            "run_dir": str(work / "runs" / f"sweep-{tokens}" / f"{arm}-lr{lr:g}-s{seed}"),
            "train": data["continue"],
            "eval": data["valid"],
            "tokens": tokens,
            "lr": lr,
            "warmup": None,
            "evals": 4,
            "aux": 0.0 if ARMS[arm].flags is None else 0.01,
            "z": 0.0 if ARMS[arm].flags is None else 0.001,
            "eval_at_start": False,
            "preset": asdict(preset),
            **DATA_FIELD,
        }

    record["lr_sweep"] = {"seed": seed, "tokens": tokens, "judged_on": "valid", "lrs": list(preset.sweep_lrs)}
    record["sweep_runs"] = []
    runner.run([job(arm, lr) for arm in swept for lr in preset.sweep_lrs], "sweep_runs")
    extra = {arm: lr for arm in swept if (lr := beyond_edge(sweep_table(record, arm, preset.sweep_lrs)[1]))}
    runner.run([job(arm, lr) for arm, lr in extra.items()], "sweep_runs")
    best, table = {}, {}
    for arm in swept:
        grid = sorted({*preset.sweep_lrs, *([extra[arm]] if arm in extra else [])})
        ppl, edge = sweep_table(record, arm, grid)
        best[arm] = min(ppl, key=lambda lr: _or_inf(ppl[lr]))
        table[arm] = {
            "valid_ppl": {f"{lr:g}": v for lr, v in sorted(ppl.items())},
            "best_lr": best[arm],
            "extended_to": extra.get(arm),
            "at_edge": edge is not None,  # best at an edge of its (extended) grid: the optimum may lie beyond
        }
    record["lr_sweep"]["arms"] = table
    print("lr sweep: " + ", ".join(f"{a} {lr:g}" + " (at edge)" * table[a]["at_edge"] for a, lr in best.items()))
    return best


def sweep_table(record: dict[str, Any], arm: str, grid: list[float] | tuple[float, ...]) -> tuple[dict, Any]:
    """ARM's validation perplexity at each lr of GRID it ran, and which edge its best sits at: (lr, +1 above the
    grid's top or -1 below its bottom), or None when the best is inside the grid."""
    ppl = {r["lr"]: final_ppl(r) for r in record["sweep_runs"] if r["arm"] == arm and r["lr"] in grid}
    best = min(ppl, key=lambda lr: _or_inf(ppl[lr]))
    edge = (best, 1) if best == max(grid) else (best, -1) if best == min(grid) else None
    return ppl, edge


def _or_inf(ppl: float | None) -> float:
    """A perplexity to rank by: a missing or diverged (nan) run ranks last."""
    return ppl if ppl is not None and math.isfinite(ppl) else math.inf


def beyond_edge(edge: tuple[float, int] | None) -> float | None:
    """The next learning rate past an edge on the 1-3-10 ladder (1e-3 -> 3e-3, 1e-4 -> 3e-5); None: no edge."""
    if edge is None:
        return None
    lr, direction = edge
    exp = math.floor(math.log10(lr) + 1e-9)
    ladder = [m * 10.0**e for e in range(exp - 1, exp + 2) for m in (1, 3)]
    i = min(range(len(ladder)), key=lambda j: abs(math.log(ladder[j] / lr)))
    return float(f"{ladder[i + direction]:.3g}")


PLOT_EVERY_S = 60.0  # redraw the figures after a finished run at most this often (and once at the end)


@dataclass
class Runner:
    """Runs jobs in worker processes, reusing runs already finished with the same job; keeps or drops their
    checkpoints; appends each result to record[key] and rewrites the JSON as each finishes. The figures are redrawn
    after a run when PLOT_EVERY_S have passed since they were last drawn (a short preset's runs take a second each,
    its plots as long), and always at the end of the study."""

    preset: Preset
    record: dict[str, Any]
    path: Path
    keep: bool | Path
    preset_name: str
    t_start: float
    plotted_at: float = -math.inf

    def run(self, jobs: list[dict[str, Any]], key: str) -> None:
        todo = []
        for job in jobs:
            Path(job["run_dir"]).parent.mkdir(parents=True, exist_ok=True)
            saved = reusable_run(job)
            if saved is not None:
                self._finish(job, saved["result"], key, reused=True)
            else:
                todo.append(job)
        if not todo:
            return
        todo = longest_first(todo, self.record)
        with ProcessPoolExecutor(self.preset.jobs, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(train_run, job): job for job in todo}
            for fut in as_completed(futures):
                job, res = futures[fut], fut.result()
                res["kept"] = self._keep(job, res)
                (Path(job["run_dir"]) / "study_run.json").write_text(json.dumps({"job": _job_key(job), "result": res}))
                self._finish(job, res, key, reused=False)

    def _keep(self, job: dict[str, Any], res: dict[str, Any]) -> dict[str, Any]:
        run_dir = Path(job["run_dir"])
        if not self.keep:
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        kept: dict[str, Any] = {"final": _public(res["final"]) if res["final"] else None}
        kept["checkpoints"] = _public(str(run_dir / "checkpoints")) if (run_dir / "checkpoints").is_dir() else None
        weights = sorted(Path(res["final"]).glob("*.safetensors")) if res["final"] else []
        kept["final_sha256"] = {w.name: study_corpus.sha256(w) for w in weights}
        if isinstance(self.keep, Path) and res["final"]:
            dest = self.keep / self.preset_name / run_dir.parent.name / run_dir.name
            keep_copy(Path(res["final"]), dest, _job_key(job))
            kept["copy"] = str(dest)
        return kept

    def _finish(self, job: dict[str, Any], res: dict[str, Any], key: str, reused: bool) -> None:
        res = dict(res, reused=reused, flops=res["tokens"] * (self.record["flops_per_token"].get(res["arm"]) or 0))
        self.record.setdefault(key, []).append(res)
        write(self.record, self.path)
        if key == "runs" and time.perf_counter() - self.plotted_at >= PLOT_EVERY_S:
            self.record["pngs"] = [_public(p) for p in plot(self.record, self.path.with_suffix(""))]
            self.plotted_at = time.perf_counter()
        ppl = final_ppl(res)  # what the tables read: the mean loss of the last two evals
        print(
            f"{'reused' if reused else 'done'} {key} {res['arm']} seed {res['seed']} lr {res['lr']:g}: "
            f"ppl {ppl if ppl is not None else math.nan:.2f} (last 2 evals), "
            f"{res['wall_s']:.0f} s; {time.perf_counter() - self.t_start:.0f} s in all",
            flush=True,
        )


def finished_run(folder: Path) -> dict[str, Any] | None:
    """The saved job and result of the finished run in FOLDER (its study_run.json, with its final/ still there), or
    None. FOLDER may be a run folder set aside under another name: final/ is looked for in FOLDER itself."""
    done = folder / "study_run.json"
    saved = json.loads(done.read_text()) if done.is_file() else None
    final = saved["result"]["final"] if saved else None
    return saved if final and (folder / Path(final).name).is_dir() else None


def aside_name(run_dir: Path, job_key: dict[str, Any], finished: bool = True) -> Path:
    """Where a run of RUN_DIR's name but another job is kept: RUN_DIR@<12 hex digits of its job key>, with
    `-unfinished` after them for a run that has not finished (it resumes once moved back)."""
    digest = hashlib.sha256(json.dumps(job_key, sort_keys=True).encode()).hexdigest()[:12]
    return run_dir.with_name(f"{run_dir.name}@{digest}{'' if finished else '-unfinished'}")


def set_aside(folder: Path, job_key: dict[str, Any], finished: bool = True) -> Path:
    """Move FOLDER, which holds JOB_KEY's run or copy, to its aside_name (replacing an older one there); that name."""
    aside = aside_name(folder, job_key, finished=finished)
    shutil.rmtree(aside, ignore_errors=True)
    folder.rename(aside)
    return aside


def keep_copy(final: Path, dest: Path, job_key: dict[str, Any]) -> None:
    """Copy FINAL to DEST (--keep-checkpoints PATH), with the job it belongs to beside it (_stamp). A copy of another
    job's final/ at DEST (the same run name: another lr, --no-lr-sweep) is set aside first as aside_name says, as
    reusable_run does with run folders, instead of being replaced; this job's own copy set aside earlier is
    replaced. The copy is made beside DEST and renamed into place."""
    stamp = _stamp(dest)
    if dest.exists():
        held = json.loads(stamp.read_text()) if stamp.is_file() else None
        if held is not None and held != job_key:
            stamp.replace(_stamp(set_aside(dest, held)))
        else:
            shutil.rmtree(dest)
    own = aside_name(dest, job_key)
    shutil.rmtree(own, ignore_errors=True)
    _stamp(own).unlink(missing_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(final, partial)
    partial.rename(dest)
    stamp.write_text(json.dumps(job_key, sort_keys=True))


def _stamp(run_dir: Path) -> Path:
    """train_run's record of which job RUN_DIR's checkpoints belong to (what it resumes)."""
    return run_dir.with_name(run_dir.name + ".job.json")


def reusable_run(job: dict[str, Any]) -> dict[str, Any] | None:
    """The saved run of JOB if one finished (what Runner reuses), else None, with RUN_DIR left for JOB to train.

    A run folder is named by arm and seed (and the run's length), not by everything its job holds, so two jobs can
    share one: the same arm under `--no-lr-sweep` or another preset setting. Training one there used to replace the
    other's kept final/. Now a run of another job in RUN_DIR, finished or not, is set aside beside it (aside_name)
    before JOB trains, and JOB's own run set aside earlier is moved back: reused if it finished, resumed by
    train_run from its last checkpoint if not. So switching between two settings retrains neither and loses no
    step. A folder with no record of its job is left to train_run (upcycle train --force moves it aside)."""
    run_dir = Path(job["run_dir"])
    stamp = _stamp(run_dir)
    if not run_dir.exists() and not stamp.exists() and not any(run_dir.parent.glob(f"{glob.escape(run_dir.name)}@*")):
        return None  # no run of this name yet
    key = _job_key(job)
    saved = finished_run(run_dir)
    if saved is not None and saved["job"] == key:
        return saved
    holder = saved["job"] if saved is not None else (json.loads(stamp.read_text()) if stamp.is_file() else None)
    if run_dir.exists() and holder is not None and holder != key:
        aside = set_aside(run_dir, holder, finished=saved is not None)
        print(f"set aside {run_dir.name}: a run of another job, now {aside.name}", flush=True)
    if not run_dir.exists():
        for twin in (aside_name(run_dir, key), aside_name(run_dir, key, finished=False)):
            if twin.is_dir():
                twin.rename(run_dir)
                stamp.write_text(json.dumps(key))
                print(f"moved back {twin.name} to {run_dir.name}: this job's own run", flush=True)
                break
    restored = finished_run(run_dir)
    return restored if restored is not None and restored["job"] == key else None


def speed_key(arm: str) -> str:
    """The arm whose model ARM trains (so runs at the same speed per token): dense-nowarm trains dense's parent,
    moe-all-flop moe-all's MoE."""
    spec = ARMS[arm]
    return "dense" if spec.model == "parent" else spec.uses or arm


def longest_first(jobs: list[dict[str, Any]], record: dict[str, Any]) -> list[dict[str, Any]]:
    """JOBS, the longest first, so that the runs end close together instead of one long run finishing alone on one
    core while the other idles. A run's length: its tokens times its model's wall seconds per token in this study's
    runs so far (the sweep's, before the main runs: an MoE run is slower per FLOP than a dense one), where every
    job's model has one; else its tokens times FLOPs per token. A stable sort keeps the given order among equals."""
    measured: dict[str, list[float]] = {}
    for r in (*record.get("sweep_runs", []), *record.get("runs", [])):
        if r.get("wall_s") and r.get("tokens") and not r.get("resumed_from_step"):  # a resumed run's wall is partial
            measured.setdefault(speed_key(r["arm"]), []).append(r["wall_s"] / r["tokens"])
    rate = {k: statistics.median(v) for k, v in measured.items()}
    if not all(speed_key(job["arm"]) in rate for job in jobs):
        rate = {}
    fpt = record.get("flops_per_token", {})
    per_token = (lambda job: rate[speed_key(job["arm"])]) if rate else (lambda job: fpt.get(job["arm"], 1))
    return sorted(jobs, key=lambda job: -job["tokens"] * per_token(job))


def part_seconds(records: list[dict[str, Any]]) -> list[float]:
    """The training time of each process a run took (one, or one more per resume), from its metrics records: each
    process stamps `elapsed_s` from its own start, and a resumed run has dropped what was logged after its
    checkpoint, so a part counts up to its last kept record (the steps redone after a kill are not counted twice)."""
    parts: list[float] = []
    last = None
    for r in records:
        t = r.get("elapsed_s")
        if t is None:
            continue
        if last is None or t < last:
            parts.append(t)
        parts[-1] = t
        last = t
    return parts


def _job_key(job: dict[str, Any]) -> dict[str, Any]:
    """What decides a run's result, as JSON holds it: the job, less how many threads ran it, and of the preset only
    what the run reads (not its seeds, token budgets, lr grid or --jobs, which the job itself carries or which do
    not touch one run): so cpu-long reuses cpu's sweep runs, and a rerun with other --jobs or --seeds reuses all."""
    key = {k: v for k, v in job.items() if k not in ("threads", "preset")}
    key["preset"] = {k: v for k, v in job["preset"].items() if k not in ARM_ONLY}
    return json.loads(json.dumps(key))


def count_tokens(parent: Path, data: dict[str, str], preset: Preset) -> dict[str, int]:
    """Tokens of each part with the parent's tokenizer (through the training loop's own cache)."""
    from transformers import AutoTokenizer

    from upcycle.source import cache_dir
    from upcycle.train.data import prepare

    tok = AutoTokenizer.from_pretrained(parent)
    field = {"text_field": DATA_FIELD["text_field"]} if DATA_FIELD else {}
    out = {}
    for phase in ("pretrain", "continue"):
        if phase == "pretrain" and preset.parent != "scratch":
            continue
        train_blocks, heldout, _ = prepare(
            data[phase], tok, preset.seq_len, eval_data=data["heldout"], cache_dir=cache_dir() / "tokens", **field
        )
        out[phase] = train_blocks.n_tokens
        out["heldout"] = heldout.n_tokens
    _, valid, _ = prepare(
        data["continue"], tok, preset.seq_len, eval_data=data["valid"], cache_dir=cache_dir() / "tokens", **field
    )
    out["valid"] = valid.n_tokens
    return out


def print_table(record: dict[str, Any]) -> None:
    print("\n| arm | active params | FLOPs/token | lr | tokens | final ppl (last 2 evals) | sd | vs dense | vs wide |")
    print("|---|---|---|---|---|---|---|---|---|")
    runs = {r["arm"]: r for r in record["runs"]}
    for arm, row in record["summary"].items():
        if arm.startswith("_"):
            continue
        sd = f"{row['ppl_sd']:.2f}" if row["ppl_sd"] is not None else "-"
        vs = [f"{row[k]:+.2f}%" if k in row else "-" for k in ("vs_dense_pct_mean", "vs_dense_wide_pct_mean")]
        run = runs[arm]
        print(
            f"| {_label(record, arm)} | {record['active_params'][arm]:,} | {record['flops_per_token'][arm]:.3g} | "
            f"{run['lr']:g} | {run['tokens']:,} | {row['ppl_mean']:.2f} | {sd} | {vs[0]} | {vs[1]} |"
        )


def _public(arg: str) -> str:
    return os.path.relpath(arg, ROOT) if str(arg).startswith(str(ROOT)) else str(arg)


if __name__ == "__main__":
    main()

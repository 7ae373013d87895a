"""Training text -> tokenised, packed, cached blocks of `seq_len` token ids (which blocks a step reads: sampler.py).

What DATA may be: a `.txt`, `.jsonl`/`.json` or `.parquet` file (the text ones may be `.gz`/`.bz2`/`.xz`
compressed), a folder of those (read recursively in sorted path order; hidden files and other extensions are
skipped), a folder written by `datasets`' `save_to_disk`, or a `datasets` Hub id, `org/name` or `org/name:config`
(its "train" split, read through the datasets cache, so HF_HUB_OFFLINE works once it is cached).

What a document is: a row of a json(l)/parquet file or dataset (its `text_field`), and for `.txt` files a
*paragraph*, i.e. text between blank lines (`datasets`' text builder with `sample_by="paragraph"`; the newlines
around a paragraph are dropped, the ones inside kept). Paragraphs rather than whole files so that a single long
text can still give a held-out eval set of documents the training never sees. Empty or whitespace-only documents
are skipped; a row without `text_field` (or a null one) is refused unless `skip_bad_rows` (rows.py); both are
counted. A field of integer lists (`input_ids`) is read as documents already tokenised, their ids as they are.
Each document is tokenised without special tokens and followed by the tokenizer's EOS; the stream
of all documents is cut into blocks of `seq_len` tokens (blocks may straddle documents; the last
`n_tokens % seq_len` tokens are unused).

Cache: one folder per key under `cache_dir`, the key being the sha256 of the tokenizer (its serialised
tokenizers backend), the EOS id, the data identity (file names relative to DATA, sizes and mtimes, not contents,
so a run over 100 GB starts at once; a saved dataset by its files, a Hub dataset by its fingerprint),
`text_field`, `seq_len` and the eval settings. It holds `train.bin` and `eval.bin` (flat token ids, the smallest of
uint16/uint32/int64 that holds the vocabulary) and `meta.json`. The folder is built beside its final name and
renamed into place, so a killed run leaves no entry that looks complete; entries that fail the size check are
rebuilt. Reading streams the files through `datasets` (`streaming=True` + `map(batched=True)`), writing ids in
pieces: neither the text nor the ids of the whole data are ever held in memory, and no Arrow copy of the text is
made. One document's text is held whole while it is read, but a long one is given to the tokenizer in pieces
(tokenise.py), so memory grows with the document's length, not ~200 bytes per character of it.

A single document cannot be split into train and eval (the split is by documents): it is refused saying so.

Eval split without `eval_data`: a seeded permutation of the documents; its first `eval_fraction` of them (at least
one, and as many more as it takes to fill one block) form the eval stream, the rest the train stream, each kept in
document order. The two never share a document.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..compat import dataset_fingerprint
from ..errors import UpcycleError
from ..outdir import staged_folder
from ..seeds import generator as seeded_generator
from .rows import RowCounts, bad_row_message, locate_row
from .tokenise import encode_documents

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

FORMAT = 2  # bump when the cache layout or the meaning of a key changes
BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
COMPRESSED = (".gz", ".bz2", ".xz")  # datasets decompresses these on the fly (not for parquet)
BATCH_DOCS = 1000  # documents per tokeniser call and per write
COPY_TOKENS = 1 << 24  # tokens per piece when splitting the stream into train and eval
EXTENSIONS = ".txt, .jsonl, .json or .parquet"

Progress = Callable[[str, int, int], None]


# ---------------------------------------------------------------------------------------------------
# What prepare() returns


@dataclass(frozen=True)
class TokenBlocks:
    """Packed blocks of seq_len token ids, memory-mapped from the cache."""

    path: Path
    seq_len: int
    n_blocks: int
    n_tokens: int  # tokens in the file; the last n_tokens % seq_len belong to no block
    dtype: str = "uint32"  # how the ids are stored on disk; blocks come out as int64

    @cached_property
    def _ids(self) -> np.memmap:
        return np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.n_tokens,))

    def __len__(self) -> int:
        return self.n_blocks

    def __getstate__(self) -> dict[str, Any]:
        # A pickled memmap would carry its whole content: send the fields and map again on the other side.
        return {k: v for k, v in self.__dict__.items() if k != "_ids"}

    def block(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.n_blocks:
            raise IndexError(f"block {i} out of range: there are {self.n_blocks}")
        start = i * self.seq_len
        return torch.from_numpy(self._ids[start : start + self.seq_len].astype(np.int64))  # (seq_len,)

    def blocks(self, idx: Sequence[int], device: torch.device | None = None) -> torch.Tensor:
        """(len(idx), seq_len) int64 token ids, on `device` when given: a GPU gets them through pinned memory with a
        copy that does not make the host wait for the GPU (a plain .to(cuda) would)."""
        rows = np.asarray(idx, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n_blocks):
            raise IndexError(f"block ids {list(idx)} out of range: there are {self.n_blocks}")
        grid = self._ids[: self.n_blocks * self.seq_len].reshape(self.n_blocks, self.seq_len)
        ids = torch.from_numpy(grid[rows].astype(np.int64))  # (len(idx), seq_len)
        if device is not None and device.type == "cuda":
            return ids.pin_memory().to(device, non_blocking=True)
        return ids if device is None else ids.to(device)


@dataclass(frozen=True)
class DataInfo:
    """What was read, for the run record (names only, never absolute paths)."""

    sources: list[str]  # DATA's file names (a folder's files as folder/relative/name), or the dataset name or id
    documents: int  # documents read from DATA, including any held out for eval
    train_tokens: int
    eval_tokens: int
    cache_hit: bool
    key: str
    eval_sources: list[str] = field(default_factory=list)  # --eval-data's names; empty when held out from DATA
    eval_documents: int = 0  # documents in the eval stream
    dtype: str = "uint32"
    skipped_empty: int = 0  # rows or paragraphs (of DATA and --eval-data) whose text is empty or whitespace only
    skipped_bad: int = 0  # rows without the text field (or with a null one), left out with skip_bad_rows
    unit: str = "documents"  # what `documents` counts: "documents" (text) or "conversations" (chat data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self, text_field: str) -> str:
        """One line for the start of a run: the documents (or conversations) used and the rows skipped."""
        if self.eval_sources:
            line = f"data: {self.documents:,} {self.unit}, {self.eval_documents:,} in --eval-data"
        else:
            line = f"data: {self.documents:,} {self.unit} ({self.eval_documents:,} of them held out for eval)"
        skipped = []
        if self.skipped_bad:
            skipped.append(f"{self.skipped_bad:,} rows without {text_field!r} (--skip-bad-rows)")
        if self.skipped_empty:
            skipped.append(f"{self.skipped_empty:,} empty")
        return line + (f"; skipped {' and '.join(skipped)}" if skipped else "")


# ---------------------------------------------------------------------------------------------------
# prepare()


def prepare(
    data: str,
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    *,
    text_field: str = "text",
    eval_data: str | None = None,
    eval_fraction: float = 0.01,
    cache_dir: Path,
    seed: int = 0,
    skip_bad_rows: bool = False,
    progress: Progress | None = None,
) -> tuple[TokenBlocks, TokenBlocks, DataInfo]:
    """Train and eval blocks of DATA, tokenised once and cached; see the module docstring for the rules.

    Under torchrun, call it on rank 0 first and on the other ranks after a barrier (then a cache hit).
    `progress(stage, done, total)` is called while building: stage "tokenise" or "tokenise eval" counts
    documents (total 0 when unknown, as for streamed files), "split" counts tokens.
    A row without `text_field` (or with a null one) is refused, naming the first, unless `skip_bad_rows`; the cache
    entry records how many it left out, so a later call without `skip_bad_rows` is refused the same way.
    """
    if not data:
        raise UpcycleError("give the training text: --data FILE, FOLDER or a datasets Hub id")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise UpcycleError(f"--seq-len {seq_len!r} must be a whole number, 1 or more")
    if eval_data is None and not 0 < eval_fraction < 1:
        raise UpcycleError(f"--eval-fraction {eval_fraction} must be between 0 and 1")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UpcycleError("the model's tokenizer has no EOS token, which packing needs between documents")
    train_src = _open_source(data, "--data")
    eval_src = _open_source(eval_data, "--eval-data") if eval_data else None
    dtype = _token_dtype(len(tokenizer))
    key = _cache_key(tokenizer, eos, train_src, eval_src, text_field, seq_len, eval_fraction, seed)

    root = Path(cache_dir)
    entry = root / key
    meta = _read_entry(entry, key)
    hit = meta is not None
    if meta is None:
        root.mkdir(parents=True, exist_ok=True)
        with staged_folder(entry, force=False, keep_existing=True) as tmp:  # a lost race keeps the winner's
            job = _Job(tmp, tokenizer, eos, dtype, text_field, seq_len, progress, skip_bad_rows)
            _build(job, key, train_src, eval_src, eval_fraction, seed)
        meta = _read_entry(entry, key)
        if meta is None:  # only if something removed or damaged it between the rename and now
            raise UpcycleError(f"the token cache {entry.name} was damaged while it was written; run again")
    if meta["skipped_bad"] and not skip_bad_rows:  # a cache entry built with skip_bad_rows
        raise UpcycleError(bad_row_message(meta["first_bad"], text_field))

    def blocks(name: str) -> TokenBlocks:
        n = meta[f"{name}_tokens"]
        return TokenBlocks(entry / f"{name}.bin", seq_len, n // seq_len, n, meta["dtype"])

    info = DataInfo(
        sources=train_src.names,
        documents=meta["documents"],
        train_tokens=meta["train_tokens"],
        eval_tokens=meta["eval_tokens"],
        cache_hit=hit,
        key=key,
        eval_sources=eval_src.names if eval_src else [],
        eval_documents=meta["eval_documents"],
        dtype=meta["dtype"],
        skipped_empty=meta["skipped_empty"],
        skipped_bad=meta["skipped_bad"],
    )
    return blocks("train"), blocks("eval"), info


# ---------------------------------------------------------------------------------------------------
# Sources: what the user named, resolved without reading any text


@dataclass
class _Source:
    flag: str  # "--data" or "--eval-data", for messages
    label: str  # what the user typed, for messages
    names: list[str]  # for the record
    identity: Any  # for the cache key
    groups: list[tuple[str, list[Path]]] = field(default_factory=list)  # (builder, files) runs of local files
    saved: Path | None = None  # a save_to_disk folder
    dataset: Any = None  # a datasets.Dataset loaded from the Hub cache


def _open_source(arg: str, flag: str) -> _Source:
    path = Path(arg).expanduser()
    if path.is_file():
        builder = _builder(path)
        if builder is None:
            raise UpcycleError(
                f"{flag} {arg}: unknown extension {path.suffix or '(none)'}; "
                f"give {EXTENSIONS} files, a folder of them, a saved dataset or a datasets Hub id"
            )
        return _Source(flag, arg, [path.name], [_stat(path, path.name)], groups=[(builder, [path])])
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            files = sorted(p for p in path.rglob("*") if p.is_file())
            identity = ["saved", *(_stat(p, p.relative_to(path).as_posix()) for p in files)]
            return _Source(flag, arg, [path.name], identity, saved=path)
        return _folder(path, arg, flag)
    if _looks_like_path(arg):
        raise UpcycleError(f"{flag} {arg} does not exist")
    return _hub(arg, flag)


def _builder(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSED:
        suffixes = suffixes[:-1]
        if suffixes and suffixes[-1] == ".parquet":
            return None
    return BUILDERS.get(suffixes[-1]) if suffixes else None


def _folder(path: Path, arg: str, flag: str) -> _Source:
    def visible(p: Path) -> bool:
        return p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)

    found = sorted((p for p in path.rglob("*") if visible(p)), key=lambda p: p.relative_to(path).as_posix())
    files = [p for p in found if _builder(p)]
    if not files:
        other = sorted({"".join(p.suffixes[-1:]) or "(none)" for p in found})
        seen = f" (it holds {', '.join(other)})" if other else " (it is empty)"
        raise UpcycleError(f"{flag} {arg}: the folder has no {EXTENSIONS} files{seen}")
    groups: list[tuple[str, list[Path]]] = []
    # Consecutive text files are read by one builder, keeping the sorted order. JSON and parquet files are read one
    # by one: datasets takes one schema from the first file of a run, so a later file with other fields (columns we
    # do not read) would fail its cast. The rows, their order and so the tokens are the same either way.
    for p in files:
        builder = _builder(p)
        if groups and groups[-1][0] == builder == "text":
            groups[-1][1].append(p)
        else:
            groups.append((builder, [p]))
    rel = [f"{path.name}/{p.relative_to(path).as_posix()}" for p in files]
    return _Source(flag, arg, rel, [_stat(p, r) for p, r in zip(files, rel, strict=True)], groups=groups)


def _stat(path: Path, name: str) -> list[Any]:
    st = path.stat()
    return [name, st.st_size, st.st_mtime_ns]


def _looks_like_path(arg: str) -> bool:
    """A Hub id is `name` or `org/name` (plus `:config`); a data extension, a leading ./~ or two slashes: a path."""
    return (
        arg.startswith((".", "/", "~"))
        or arg.count("/") > 1
        or "\\" in arg
        or _builder(Path(arg)) is not None
        or Path(arg).suffix.lower() in COMPRESSED
    )


def _hub(arg: str, flag: str) -> _Source:
    """`org/name` or `org/name:config`, loaded through the datasets cache (downloaded first when online)."""
    import datasets

    name, _, config = arg.partition(":")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on") or bool(
        getattr(datasets.config, "HF_HUB_OFFLINE", False)
    )
    try:
        with _quiet_datasets():
            loaded = datasets.load_dataset(name, config or None)
    except Exception as exc:  # datasets raises many types (ConnectionError, DatasetNotFoundError, ValueError)
        missing = isinstance(exc, ConnectionError | FileNotFoundError) or "NotFound" in type(exc).__name__
        if offline and missing:
            raise UpcycleError(
                f"{flag} {arg} is neither a local path nor a dataset in the datasets cache, and HF_HUB_OFFLINE "
                "is set; give a local file or folder, or fetch the dataset once while online"
            ) from None
        raise UpcycleError(f"{flag} {arg}: could not load it as a datasets Hub id: {_first_line(exc)}") from None
    dataset = _train_split(loaded, flag, arg)
    return _Source(flag, arg, [arg], ["hub", arg, dataset_fingerprint(dataset)], dataset=dataset)


def _train_split(loaded: Any, flag: str, label: str) -> Any:
    import datasets

    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise UpcycleError(f"{flag} {label} has no 'train' split (it has: {', '.join(loaded)})")
        return loaded["train"]
    if isinstance(loaded, datasets.Dataset):
        return loaded
    raise UpcycleError(f"{flag} {label} is not a datasets Dataset")


def _token_dtype(vocab: int) -> str:
    if vocab <= 1 << 16:
        return "uint16"
    return "uint32" if vocab <= 1 << 32 else "int64"


def _cache_key(
    tokenizer: Any,
    eos: int,
    train: _Source,
    evals: _Source | None,
    text_field: str,
    seq_len: int,
    eval_fraction: float,
    seed: int,
) -> str:
    split = {"data": evals.identity} if evals else {"fraction": eval_fraction, "seed": seed}
    record = {
        "format": FORMAT,
        "tokenizer": _tokenizer_hash(tokenizer),
        "eos": eos,
        "data": train.identity,
        "text_field": text_field,
        "seq_len": seq_len,
        "eval": split,
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _tokenizer_hash(tokenizer: Any) -> str:
    """The tokenizer's whole definition (vocabulary, merges, normaliser, added tokens), hashed."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
    else:  # a slow tokenizer: its vocabulary and settings stand in for the files
        settings = {k: v for k, v in getattr(tokenizer, "init_kwargs", {}).items() if isinstance(v, str | int | bool)}
        text = json.dumps([type(tokenizer).__name__, sorted(tokenizer.get_vocab().items()), settings], default=str)
    return hashlib.sha256(f"{type(tokenizer).__name__}\n{len(tokenizer)}\n{text}".encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------
# The cache entry


def _read_entry(entry: Path, key: str) -> dict[str, Any] | None:
    """The entry's meta if it is complete and consistent; a damaged entry is removed so it can be rebuilt."""
    if not entry.is_dir():
        return None
    try:
        meta = json.loads((entry / "meta.json").read_text())
        itemsize = np.dtype(meta["dtype"]).itemsize
        ok = meta["format"] == FORMAT and meta["key"] == key
        for name in ("train", "eval"):
            ok = ok and (entry / f"{name}.bin").stat().st_size == meta[f"{name}_tokens"] * itemsize
        ok = ok and meta["train_tokens"] >= meta["seq_len"] and meta["eval_tokens"] >= meta["seq_len"]
    except (OSError, ValueError, KeyError, TypeError):
        ok = False
    if ok:
        return meta
    shutil.rmtree(entry, ignore_errors=True)
    return None


# ---------------------------------------------------------------------------------------------------
# Building an entry


class _Writer:
    """Appends arrays to a flat binary file, counting items; flushed to disk before the entry is published."""

    def __init__(self, path: Path, dtype: str) -> None:
        self.path = path
        self.dtype = np.dtype(dtype)
        self.count = 0
        self._file = open(path, "wb")  # noqa: SIM115 - closed in close()

    def write(self, values: np.ndarray) -> None:
        values.astype(self.dtype, copy=False).tofile(self._file)
        self.count += len(values)

    def close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


@dataclass
class _Job:
    """What building one cache entry needs, passed around as one thing."""

    tmp: Path  # the entry's folder while it is built
    tokenizer: Any
    eos: int
    dtype: str
    text_field: str
    seq_len: int
    progress: Progress | None
    skip_bad_rows: bool = False
    rows: RowCounts = field(default_factory=RowCounts)  # over every source of the entry

    def tokenise(self, src: _Source, out: _Writer, lengths: _Writer | None, stage: str) -> int:
        """Stream SRC's documents through the tokenizer into OUT (and their lengths into LENGTHS); -> documents."""
        documents = 0
        total = len(src.dataset) if src.dataset is not None else 0
        limit = np.iinfo(out.dtype).max
        lists = _token_lists(src, self, self.tmp / "hf")
        with contextlib.closing(lists):  # closed on any exit, so datasets' verbosity is put back at once
            for ids in lists:
                flat = ids.flatten().to_numpy(zero_copy_only=False)  # (tokens,) the batch's documents, each + EOS
                if flat.size and int(flat.max()) > limit:
                    raise UpcycleError(f"the tokenizer produced id {int(flat.max())}, beyond its own vocabulary")
                out.write(flat)
                if lengths is not None:
                    lengths.write(ids.value_lengths().to_numpy(zero_copy_only=False))
                documents += len(ids)
                if self.progress:
                    self.progress(stage, documents, total)
        self.check_enough(src, documents, out.count)
        return documents

    def check_enough(self, src: _Source, documents: int, tokens: int) -> None:
        if documents == 0:
            raise UpcycleError(f"{src.flag} {src.label} holds no text (0 non-empty documents)")
        if tokens < self.seq_len:
            raise UpcycleError(
                f"{src.flag} {src.label} has only {tokens} tokens, fewer than one block of --seq-len {self.seq_len}; "
                f"give more text or a --seq-len of at most {tokens}"
            )

    def split(self, src: _Source, eval_fraction: float, seed: int) -> tuple[int, int, int]:
        """Hold out a seeded `eval_fraction` of the documents (enough for a block): all.bin -> train/eval.bin.

        Returns (train tokens, eval tokens, eval documents)."""
        lengths = np.fromfile(self.tmp / "docs.bin", dtype=np.int64)  # (docs,) tokens of each document, EOS included
        n_docs, total = len(lengths), int(lengths.sum())
        gen = seeded_generator("eval", seed)
        order = torch.randperm(n_docs, generator=gen).numpy()
        filled = np.cumsum(lengths[order])  # (docs,) eval tokens if the first i+1 documents of `order` are held out
        count = max(1, round(eval_fraction * n_docs), int(np.searchsorted(filled, self.seq_len)) + 1)
        if n_docs == 1:
            raise UpcycleError(
                f"{src.flag} {src.label} is a single document ({total:,} tokens), and the eval set is held out as "
                "whole documents (paragraphs of a .txt, rows of a .jsonl): give --eval-data, or text in several "
                "paragraphs (separated by blank lines) or rows"
            )
        if count >= n_docs or total - int(filled[count - 1]) < self.seq_len:
            raise UpcycleError(
                f"{src.flag} {src.label} has {total} tokens in {n_docs} documents, too few to hold out an eval "
                f"block of --seq-len {self.seq_len} and keep one to train on; give a smaller --seq-len, more text "
                "or --eval-data"
            )
        held = np.zeros(n_docs, dtype=bool)
        held[order[:count]] = True

        offsets = np.concatenate([[0], np.cumsum(lengths)])  # (docs+1,) token offset of each document
        change = np.flatnonzero(held[1:] != held[:-1]) + 1
        starts, ends = np.concatenate([[0], change]), np.concatenate([change, [n_docs]])
        source = np.memmap(self.tmp / "all.bin", dtype=self.dtype, mode="r", shape=(total,))
        train, evals = _Writer(self.tmp / "train.bin", self.dtype), _Writer(self.tmp / "eval.bin", self.dtype)
        with contextlib.closing(train), contextlib.closing(evals):
            for first, stop in zip(starts, ends, strict=True):  # runs of documents on the same side
                out = evals if held[first] else train
                lo, hi = int(offsets[first]), int(offsets[stop])
                for piece in range(lo, hi, COPY_TOKENS):
                    out.write(np.asarray(source[piece : min(hi, piece + COPY_TOKENS)]))
                if self.progress:
                    self.progress("split", train.count + evals.count, total)
        del source
        return train.count, evals.count, count


def _build(
    job: _Job, key: str, train_src: _Source, eval_src: _Source | None, eval_fraction: float, seed: int
) -> dict[str, Any]:
    """Write train.bin, eval.bin and meta.json into job.tmp; -> the meta."""
    if eval_src is not None:
        with contextlib.closing(_Writer(job.tmp / "train.bin", job.dtype)) as train:
            documents = job.tokenise(train_src, train, None, "tokenise")
        with contextlib.closing(_Writer(job.tmp / "eval.bin", job.dtype)) as evals:
            eval_documents = job.tokenise(eval_src, evals, None, "tokenise eval")
        train_tokens, eval_tokens = train.count, evals.count
    else:
        stream, lengths = _Writer(job.tmp / "all.bin", job.dtype), _Writer(job.tmp / "docs.bin", "int64")
        with contextlib.closing(stream), contextlib.closing(lengths):
            documents = job.tokenise(train_src, stream, lengths, "tokenise")
        train_tokens, eval_tokens, eval_documents = job.split(train_src, eval_fraction, seed)
        (job.tmp / "all.bin").unlink()
        (job.tmp / "docs.bin").unlink()
    shutil.rmtree(job.tmp / "hf", ignore_errors=True)  # datasets' lock files
    meta = {
        "format": FORMAT,
        "key": key,
        "dtype": job.dtype,
        "seq_len": job.seq_len,
        "eos": job.eos,
        "documents": documents,
        "eval_documents": eval_documents,
        "skipped_empty": job.rows.empty,
        "skipped_bad": job.rows.bad,
        "first_bad": job.rows.first_bad,
        "train_tokens": train_tokens,
        "eval_tokens": eval_tokens,
        "sources": train_src.names,
        "eval_sources": eval_src.names if eval_src else [],
        "eval_fraction": None if eval_src else eval_fraction,
        "seed": None if eval_src else seed,
    }
    (job.tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def _token_lists(src: _Source, job: _Job, hf_cache: Path) -> Iterator[Any]:
    """Per batch, an Arrow list array: one list of token ids (EOS appended) per non-empty document. Rows that give
    no document are counted in job.rows; a bad one is refused unless job.skip_bad_rows (see rows.py)."""
    import datasets
    import pyarrow as pa

    text_field, rows = job.text_field, job.rows

    def bad_row(index: int, column: str, locate: Callable[[int], str]) -> None:
        """A row without COLUMN (or a null one): refused, naming it, unless job.skip_bad_rows; then counted."""
        where = f"{src.flag}: {locate(index)}"
        if not job.skip_bad_rows:
            raise UpcycleError(bad_row_message(where, column))
        rows.bad += 1
        rows.first_bad = rows.first_bad or where

    def encoder(
        column: str, label: str, strip_newlines: bool, locate: Callable[[int], str]
    ) -> Callable[[pa.Table, list[int]], pa.Table]:
        def encode(batch: pa.Table, indices: list[int]) -> pa.Table:
            values = batch.column(column)
            if _is_token_ids(values.type):
                return pa.table({"ids": _given_ids(values, indices, column, locate)})
            if not (
                pa.types.is_string(values.type)
                or pa.types.is_large_string(values.type)
                or pa.types.is_null(values.type)
            ):
                raise UpcycleError(
                    f"{src.flag}: field {column!r} of {label} holds {values.type}, neither text nor token ids; "
                    "pick another with --text-field"
                )
            texts = []
            for index, text in zip(indices, values.to_pylist(), strict=True):
                if text is None:
                    bad_row(index, column, locate)
                    continue
                if strip_newlines:
                    text = text.strip("\n")
                if text.strip():
                    texts.append(text)
                else:
                    rows.empty += 1
            enc = encode_documents(job.tokenizer, texts, job.eos)
            rows.empty += len(texts) - len(enc.lengths)  # texts that gave no ids
            offsets = np.concatenate([[0], np.cumsum(enc.lengths)])  # (documents+1,)
            ids = pa.ListArray.from_arrays(pa.array(offsets, type=pa.int32()), pa.array(enc.ids, type=pa.int64()))
            return pa.table({"ids": ids})

        return encode

    def _given_ids(values: Any, indices: list[int], column: str, locate: Callable[[int], str]) -> Any:
        """Documents already tokenised: each row's ids as they are, EOS appended (as after a text document)."""
        vocab = len(job.tokenizer)
        docs: list[np.ndarray] = []
        for index, row in zip(indices, values.to_pylist(), strict=True):
            if row is None:
                bad_row(index, column, locate)
                continue
            if not row:
                rows.empty += 1
                continue
            ids = np.asarray(row, dtype=np.int64)  # (tokens,)
            if int(ids.min()) < 0 or int(ids.max()) >= vocab:
                bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
                raise UpcycleError(
                    f"{src.flag}: {locate(index)} holds token id {bad}, outside the tokenizer's vocabulary "
                    f"(0..{vocab - 1}): pre-tokenised data must come from the model's own tokenizer"
                )
            docs.append(np.append(ids, job.eos))
        offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs], dtype=np.int64)])  # (documents+1,)
        flat = np.concatenate(docs) if docs else np.zeros(0, dtype=np.int64)
        return pa.ListArray.from_arrays(pa.array(offsets, type=pa.int32()), pa.array(flat, type=pa.int64()))

    def stream(
        ds: Any, columns: list[str], column: str, label: str, strip: bool, locate: Callable[[int], str]
    ) -> Iterator[Any]:
        # Arrow in, Arrow out: the map never turns rows into Python dicts, which would cost 3x the tokenising.
        encode = encoder(column, label, strip, locate)
        mapped = ds.with_format("arrow").map(
            encode, batched=True, batch_size=BATCH_DOCS, remove_columns=columns, with_indices=True
        )
        for table in mapped.iter(batch_size=BATCH_DOCS):
            yield table.column("ids").combine_chunks()

    with _quiet_datasets():
        for builder, files in src.groups:
            label = ", ".join(p.name for p in files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
            options = {"sample_by": "paragraph"} if builder == "text" else {}
            column = "text" if builder == "text" else text_field
            try:
                ds = datasets.load_dataset(
                    builder,
                    data_files=[str(p) for p in files],
                    split="train",
                    streaming=True,
                    cache_dir=str(hf_cache),
                    **options,
                )
                first = next(iter(ds), None)
                if first is None:
                    continue
                _check_field(list(first), column, src.flag, label)
                where = functools.partial(locate_row, builder, files)
                yield from stream(ds, list(first), column, label, builder == "text", where)
            except (ValueError, OSError, pa.ArrowException, datasets.exceptions.DatasetGenerationError) as exc:
                if isinstance(exc, UnicodeDecodeError):
                    raise UpcycleError(f"{src.flag}: {label} is not UTF-8 text ({_first_line(exc)})") from None
                raise UpcycleError(f"{src.flag}: could not read {label} as {builder}: {_first_line(exc)}") from None
        if src.saved is not None or src.dataset is not None:
            ds = src.dataset if src.dataset is not None else _load_saved(src)
            _check_field(ds.column_names, text_field, src.flag, src.label)
            ds = ds.select_columns([text_field]).to_iterable_dataset()
            yield from stream(ds, [text_field], text_field, src.label, False, lambda i: f"{src.label} row {i + 1}")


def _is_token_ids(kind: Any) -> bool:
    """A field of lists of integers: documents already tokenised (`input_ids`), read as they are."""
    import pyarrow as pa

    list_like = pa.types.is_list(kind) or pa.types.is_large_list(kind)
    return list_like and pa.types.is_integer(kind.value_type)


def _check_field(fields: list[str], column: str, flag: str, label: str) -> None:
    if column not in fields:
        raise UpcycleError(
            f"{flag}: {label} has no field {column!r} (its fields: {', '.join(fields) or 'none'}); "
            "pick one with --text-field"
        )


def _load_saved(src: _Source) -> Any:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(src.saved))
    except (OSError, ValueError) as exc:
        raise UpcycleError(f"{src.flag} {src.label}: not a readable saved dataset: {_first_line(exc)}") from None
    return _train_split(loaded, src.flag, src.label)


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """datasets logs read failures at error level and draws progress bars; prepare() reports through UpcycleError.
    Process-wide while it lasts (datasets' verbosity and bars are global); both are put back when it ends."""
    import datasets
    from datasets.utils import logging as ds_logging

    level = ds_logging.get_verbosity()
    bars = not datasets.are_progress_bars_disabled()
    ds_logging.set_verbosity(ds_logging.CRITICAL + 10)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        ds_logging.set_verbosity(level)
        if bars:
            datasets.enable_progress_bars()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

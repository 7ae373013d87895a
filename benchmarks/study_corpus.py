"""The upcycling study's corpus split: whole files held out, stratified by source, and training text cleaned of them.

The unit held out is a FILE (one fortunes file, one Perl or Git manual page, one stdlib module), never a paragraph
of a file that also feeds training. A file's *source* is its package; the standard library's tests (files under a
`test/`, `tests/` or `idle_test/` folder) are a source of their own (a large share of the corpus, unlike the
rest). Files are shuffled once (seed 0); from each source, files go to the held-out part (the test set) and the
validation part (what the learning-rate sweep picks on) until each has about that source's share of its target
bytes; a file larger than 1.5x what is still wanted is skipped, so a source made of one big file (the Jargon File)
is only trained on. The other files are cut, by bytes, into the parent's pretraining part and the arms'
continuation part.

Then the training parts are cleaned of held-out and validation text: a training paragraph is dropped if it equals
an evaluation paragraph of 8 words or more (whitespace aside) or shares a 13-word sequence with evaluation text
(words: lower-cased `\\w+` runs, windows taken over each part's text as written, across paragraph ends). Shorter
equal paragraphs stay: they are markup and boilerplate that every file of a format has (POD's `=back` and
`=item *` alone are 20,000 of the 22,000 training paragraphs equal to a held-out one in the `cpu` corpus), and
dropping them would make the held-out files' markup unseen; they are counted (`verbatim_short_paragraphs`).
Dropping can join two neighbours into a new shared window, so the scan is repeated until it finds none; the last
scan is the measurement reported (`overlap.after`), beside the one before cleaning (`overlap.before`): the share
of evaluation words that sit in a 13-word window also found in training text, and the evaluation paragraphs found
verbatim in it.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

NGRAM = 13
WORD = re.compile(r"\w+")
TRAIN_PARTS = ("pretrain", "continue")
EVAL_PARTS = ("heldout", "valid")
MAX_ROUNDS = 6
TEST_FOLDERS = {"test", "tests", "idle_test"}
MIN_EXACT_WORDS = 8  # shorter paragraphs ("=back", "=item *", "unittest.main()") are format, not content


@dataclass(frozen=True)
class Doc:
    """One file of the corpus, as the paragraphs the training loop will read."""

    name: str  # "<package>/<path in it>"
    source: str
    paragraphs: tuple[str, ...]

    @property
    def size(self) -> int:
        return sum(len(p.encode()) + 2 for p in self.paragraphs)


@dataclass(frozen=True)
class SplitSpec:
    heldout_bytes: int
    valid_bytes: int
    continue_share: float  # of the training bytes, for the continuation part
    text_bytes: int | None = None  # cap on the corpus (whole files, in shuffled order)
    continue_min_bytes: int = 0  # the continuation part gets at least this much (when the parent's share is large)
    seed: int = 0


def source_of(name: str) -> str:
    package, *folders = name.split("/")[:-1]
    if package == "python-stdlib" and TEST_FOLDERS.intersection(folders):
        return "python-stdlib/test"
    return package


def paragraphs(text: str) -> tuple[str, ...]:
    """Text between blank lines, as `upcycle train` reads a .txt file."""
    return tuple(d.strip("\n") for d in re.split(r"\n\s*\n", text) if d.strip())


def documents(files: Iterable[tuple[str, str]]) -> list[Doc]:
    docs = [Doc(name, source_of(name), paragraphs(text)) for name, text in files]
    return [d for d in docs if d.paragraphs]


def _take(group: list[Doc], want: float) -> tuple[list[Doc], list[Doc]]:
    """Files of GROUP (in order) until about WANT bytes; files over 1.5x what is still wanted are passed over."""
    taken, rest, got = [], [], 0
    for d in group:
        if got < want and d.size <= 1.5 * (want - got):
            taken.append(d)
            got += d.size
        else:
            rest.append(d)
    return taken, rest


def assign(docs: list[Doc], spec: SplitSpec) -> dict[str, list[Doc]]:
    """Whole files into heldout / valid / pretrain / continue, held-out and validation stratified by source."""
    order = sorted(docs, key=lambda d: d.name)
    random.Random(spec.seed).shuffle(order)
    if spec.text_bytes:
        kept, total = [], 0
        for d in order:
            if total + d.size <= spec.text_bytes:
                kept.append(d)
                total += d.size
        order = kept
    total = sum(d.size for d in order) or 1
    parts: dict[str, list[Doc]] = {p: [] for p in (*EVAL_PARTS, *TRAIN_PARTS)}
    train: list[Doc] = []
    for source in sorted({d.source for d in order}):
        group = [d for d in order if d.source == source]
        share = sum(d.size for d in group) / total
        held, group = _take(group, spec.heldout_bytes * share)
        valid, group = _take(group, spec.valid_bytes * share)
        parts["heldout"] += held
        parts["valid"] += valid
        train += group
    want = max(spec.continue_share * sum(d.size for d in train), spec.continue_min_bytes)
    got = 0
    for d in sorted(train, key=order.index):
        if got < want:
            parts["continue"].append(d)
            got += d.size
        else:
            parts["pretrain"].append(d)
    return parts


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def _norm(paragraph: str) -> str:
    return " ".join(paragraph.split())


def _long(paragraph: str) -> bool:
    return len(words(paragraph)) >= MIN_EXACT_WORDS


def _windows(paras: list[str]) -> tuple[list[str], list[int]]:
    flat: list[str] = []
    owner: list[int] = []
    for i, p in enumerate(paras):
        ws = words(p)
        flat += ws
        owner += [i] * len(ws)
    return flat, owner


@dataclass(frozen=True)
class Probe:
    """The evaluation text, as 13-word windows (hash -> where each starts) and normalised paragraphs."""

    starts: dict[int, list[tuple[str, int]]]
    words: dict[str, int]  # part -> how many words
    paragraphs: dict[str, set[str]]

    @classmethod
    def of(cls, parts: dict[str, list[Doc]]) -> Probe:
        starts: dict[int, list[tuple[str, int]]] = {}
        counts, paras = {}, {}
        for part in EVAL_PARTS:
            flat, _ = _windows([p for d in parts[part] for p in d.paragraphs])
            counts[part] = len(flat)
            for j in range(len(flat) - NGRAM + 1):
                starts.setdefault(hash(tuple(flat[j : j + NGRAM])), []).append((part, j))
            paras[part] = {_norm(p) for d in parts[part] for p in d.paragraphs}  # _norm: whitespace collapsed
        return cls(starts, counts, paras)


def scan(paras: list[str], probe: Probe) -> tuple[set[int], set[int]]:
    """(paragraphs to drop, window hashes found): PARAS as one text, against the evaluation text."""
    flat, owner = _windows(paras)
    drop: set[int] = set()
    found: set[int] = set()
    for j in range(len(flat) - NGRAM + 1):
        h = hash(tuple(flat[j : j + NGRAM]))
        if h in probe.starts:
            found.add(h)
            drop.update(range(owner[j], owner[j + NGRAM - 1] + 1))
    every = probe.paragraphs["heldout"] | probe.paragraphs["valid"]
    drop.update(i for i, p in enumerate(paras) if _norm(p) in every and _long(p))
    return drop, found


def measure(probe: Probe, found: set[int], train_paras: list[str]) -> dict[str, Any]:
    """Per evaluation part: the share of its words inside a 13-word window found in training text, and how many of
    its paragraphs occur verbatim (whitespace aside) as training paragraphs."""
    seen = {_norm(p) for p in train_paras}
    out: dict[str, Any] = {}
    for part in EVAL_PARTS:
        covered: set[int] = set()
        for h in found:
            for where, j in probe.starts[h]:
                if where == part:
                    covered.update(range(j, j + NGRAM))
        n = probe.words[part]
        verbatim = [p for p in probe.paragraphs[part] if p in seen]
        long = [p for p in verbatim if _long(p)]
        out[part] = {
            "words": n,
            "ngram13_words": len(covered),
            "ngram13_share": len(covered) / n if n else 0.0,
            "verbatim_paragraphs": len(long),  # of 8 words or more
            "verbatim_short_paragraphs": len(verbatim) - len(long),
            "paragraphs": len(probe.paragraphs[part]),
        }
    return out


def clean(parts: dict[str, list[Doc]]) -> tuple[dict[str, list[Doc]], dict[str, Any]]:
    """Training parts without any paragraph that shares a 13-word window with, or equals, evaluation text."""
    probe = Probe.of(parts)
    report: dict[str, Any] = {"ngram": NGRAM, "rounds": 0, "dropped_paragraphs": 0, "dropped_bytes": 0}
    parts = dict(parts)
    original = _train_paragraphs(parts)
    for rnd in range(MAX_ROUNDS):
        found_all: set[int] = set()
        dropped_now = 0
        for part in TRAIN_PARTS:
            index = [(i, k) for i, d in enumerate(parts[part]) for k in range(len(d.paragraphs))]
            paras = [parts[part][i].paragraphs[k] for i, k in index]
            drop, found = scan(paras, probe)
            found_all |= found
            if not drop:
                continue
            dropped_now += len(drop)
            report["dropped_bytes"] += sum(len(paras[j].encode()) + 2 for j in drop)
            keep: dict[int, list[str]] = {}
            for j, (i, k) in enumerate(index):
                if j not in drop:
                    keep.setdefault(i, []).append(parts[part][i].paragraphs[k])
            docs = [replace(d, paragraphs=tuple(keep.get(i, ()))) for i, d in enumerate(parts[part])]
            parts[part] = [d for d in docs if d.paragraphs]
        if rnd == 0:
            report["before"] = measure(probe, found_all, original)
            del original
        report["rounds"] = rnd + 1
        report["dropped_paragraphs"] += dropped_now
        if not dropped_now:
            report["after"] = measure(probe, found_all, _train_paragraphs(parts))
            break
    else:
        _, found = scan(_train_paragraphs(parts), probe)
        report["after"] = measure(probe, found, _train_paragraphs(parts))
    return parts, report


def _train_paragraphs(parts: dict[str, list[Doc]]) -> list[str]:
    return [p for part in TRAIN_PARTS for d in parts[part] for p in d.paragraphs]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def slug(source: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", source)


def write_parts(parts: dict[str, list[Doc]], folder: Path) -> dict[str, Any]:
    """<part>/<part>.txt for each part, heldout-by-source/<source>.txt; returns what corpus.json records."""
    info: dict[str, Any] = {"parts": {}, "heldout_by_source": {}}
    for name, docs in parts.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        path = folder / name / f"{name}.txt"
        path.write_text("\n\n".join(p for d in docs for p in d.paragraphs) + "\n")
        by_source: dict[str, int] = {}
        for d in docs:
            by_source[d.source] = by_source.get(d.source, 0) + 1
        info["parts"][name] = {
            "files": len(docs),
            "documents": sum(len(d.paragraphs) for d in docs),
            "bytes": path.stat().st_size,
            "sha256": sha256(path),
            "files_by_source": dict(sorted(by_source.items())),
            "file_names": sorted(d.name for d in docs),
        }
    (folder / "heldout-by-source").mkdir(exist_ok=True)
    for source in sorted({d.source for d in parts["heldout"]}):
        path = folder / "heldout-by-source" / f"{slug(source)}.txt"
        docs = [d for d in parts["heldout"] if d.source == source]
        path.write_text("\n\n".join(p for d in docs for p in d.paragraphs) + "\n")
        info["heldout_by_source"][source] = {"path": path.name, "files": len(docs), "bytes": path.stat().st_size}
    return info

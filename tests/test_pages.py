"""upcycle/pages.py: after a model loads, the pages of its weight files that no tensor is read from any more (the
per-expert tensors transformers stacked into new ones, weights cast to another dtype) leave the process; the kept
ones stay; no value changes. The memory this saves in whole runs is measured in benchmarks/README.md."""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import pytest
import torch
from tiny import make_dense
from transformers import AutoModelForCausalLM

from upcycle import heap, pages
from upcycle.convert.pipeline import convert
from upcycle.convert.spec import build_spec
from upcycle.train.model import load_model
from upcycle.train.spec import build_train_spec

PAGE = 4096
LINUX = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/maps and madvise")


def test_unread_ranges_keep_every_page_a_live_tensor_touches():
    m = pages.Mapping(start=10 * PAGE, end=30 * PAGE, path="/w/model.safetensors")
    live = [
        (12 * PAGE + 100, 13 * PAGE + 1),  # ends one byte into page 13: pages 12 and 13 kept
        (13 * PAGE + 50, 14 * PAGE),  # overlaps the first
        (20 * PAGE, 20 * PAGE),  # empty: keeps nothing
        (29 * PAGE, 40 * PAGE),  # runs past the mapping's end
        (1 * PAGE, 5 * PAGE),  # another mapping's
    ]
    assert pages.unread_ranges(m, live, PAGE) == [(10 * PAGE, 12 * PAGE), (14 * PAGE, 29 * PAGE)]
    assert pages.unread_ranges(m, [], PAGE) == [(m.start, m.end)]
    assert pages.unread_ranges(m, [(0, 50 * PAGE)], PAGE) == []


def test_mapped_files_finds_the_folders_weight_files_by_their_real_paths(tmp_path):
    """Matched by real path: a folder of the Hub's cache holds links to blobs named by their hash, and the kernel
    names the blob; other files, mapped or not, are left out."""
    folder = tmp_path / "my model"
    blobs = tmp_path / "blobs"
    folder.mkdir()
    blobs.mkdir()
    inside = folder / "model-00001-of-00002.safetensors"
    inside.write_bytes(b"")
    blob = blobs / "3f2a9c"
    blob.write_bytes(b"")
    (folder / "model-00002-of-00002.safetensors").symlink_to(blob)
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"")
    (folder / "config.json").write_text("{}")
    maps = tmp_path / "maps"
    maps.write_text(
        f"7f0000000000-7f0000100000 r--p 00000000 08:01 11 {inside}\n"
        f"7f0000100000-7f0000180000 r--p 00100000 08:01 11 {inside}\n"
        f"7f0000200000-7f0000300000 r--p 00000000 08:01 12 {other}\n"
        f"7f0000300000-7f0000301000 r--p 00000000 08:01 13 {folder}/config.json\n"
        f"7f0000380000-7f0000390000 r--p 00000000 08:01 14 {blob}\n"
        "7f0000400000-7f0000500000 rw-p 00000000 00:00 0 \n"
        "7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]\n"
    )
    assert pages.mapped_files(folder, maps) == [
        pages.Mapping(0x7F0000000000, 0x7F0000100000, str(inside)),
        pages.Mapping(0x7F0000100000, 0x7F0000180000, str(inside)),
        pages.Mapping(0x7F0000380000, 0x7F0000390000, str(blob)),
    ]
    assert pages.mapped_files(folder, tmp_path / "no-such-maps") == []


def _resident(folder: Path) -> int:
    """Bytes of this process's mappings of FOLDER's weight files resident now (/proc/self/smaps)."""
    root, total, inside = str(folder.resolve()), 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(maxsplit=5)
        if "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
            inside = len(head) == 6 and head[5].startswith(root) and head[5].endswith(".safetensors")
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total


@pytest.fixture(scope="module")
def wide_moe(tmp_path_factory) -> Path:
    """A float32 Mixtral with 4 experts of width 1,024 over hidden 256, 2 layers: 25 MB of experts in one file
    (per-expert tensors, which transformers stacks when it loads them) and 1.8 MB of everything else."""
    root = tmp_path_factory.mktemp("pages")
    dense = make_dense(
        root / "dense", hidden_size=256, intermediate_size=1024, num_hidden_layers=2, head_dim=64, shard_size=None
    )
    out = root / "moe"
    convert(str(dense), out, build_spec(experts=4, top_k=2))
    return out


@LINUX
def test_the_stacked_experts_file_pages_leave_and_the_logits_stay(wide_moe):
    model = AutoModelForCausalLM.from_pretrained(wide_moe, dtype=torch.float32).eval()
    experts = sum(p.nbytes for n, p in model.named_parameters() if ".experts." in n)
    rest = sum(p.nbytes for n, p in model.named_parameters() if ".experts." not in n)
    assert experts > 24e6 and rest < 2e6
    ids = torch.arange(3, 60)[None]
    with torch.no_grad():
        before = model(ids).logits
    held = _resident(wide_moe)
    assert held > 0.9 * experts  # the loader read every expert through the mapping and left those pages resident
    advised = pages.release_unread_pages(model, wide_moe)
    assert advised > 0
    assert advised > experts - 2 * PAGE * 2 * 4 * 3  # a page at each end of an expert tensor may be shared
    after = _resident(wide_moe)
    assert after < rest + 64 * PAGE  # what stays is the weights that are still views of the file
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    # dropping even the pages that live (never written) tensors read changes no value either: they come back from
    # the page cache, which still holds the file
    madvise = heap.libc_function("madvise")
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for m in pages.mapped_files(wide_moe):
        assert madvise(m.start, m.end - m.start, pages.MADV_DONTNEED) == 0
    assert _resident(wide_moe) < after
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


@LINUX
def test_training_loads_the_moe_with_its_experts_file_pages_gone(wide_moe):
    spec = build_train_spec(seq_len=32, micro_batch=2)
    model = load_model(wide_moe, torch.float32, spec, torch.device("cpu"))
    rest = sum(p.nbytes for n, p in model.named_parameters() if ".experts." not in n)
    if not pages.mapped_files(wide_moe):
        pytest.skip("transformers kept no mapping of the file")
    assert _resident(wide_moe) < rest + 64 * PAGE

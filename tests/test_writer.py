"""The streaming writer: planned shards, exact bytes, a valid index."""

from __future__ import annotations

import json

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from upcycle.convert.writer import Entry, ShardedWriter, plan_shards
from upcycle.source import read_header


def _bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().view(torch.uint8).reshape(-1).numpy())


def test_shards_cut_by_size():
    entries = [Entry(f"t{i}", "F32", (10,), 40) for i in range(10)]
    shards = plan_shards(entries, 100)
    assert [len(s) for s in shards] == [2, 2, 2, 2, 2]
    big = [Entry("a", "F32", (100,), 400), Entry("b", "F32", (1,), 4)]
    assert [len(s) for s in plan_shards(big, 100)] == [1, 1]  # an oversized tensor sits alone


def test_writer_roundtrip_from_buffers_and_file_ranges(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(7, 5, generator=gen),
        "b": torch.randn(3, generator=gen).to(torch.bfloat16),
        "c": torch.zeros(0, 4),
        "d": torch.randn(16, 16, generator=gen).to(torch.float16),
    }
    save_file(tensors, tmp_path / "src.safetensors")
    infos = {i.name: i for i in read_header(tmp_path / "src.safetensors")}
    out = tmp_path / "out"
    out.mkdir()
    dtypes = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
    order = ["d", "a", "c", "b", "a_again"]
    entries = []
    for name in order:
        t = tensors[name.split("_")[0]]
        entries.append(Entry(name, dtypes[t.dtype], tuple(t.shape), t.numel() * t.element_size()))
    writer = ShardedWriter(out, entries, max_shard_size=300, metadata={"format": "pt"})
    writer.put("d", [_bytes(tensors["d"])[:100], _bytes(tensors["d"])[100:]])  # chunks
    placed = writer.put_range("a", infos["a"].file, infos["a"].offset, infos["a"].nbytes)
    writer.put("c", [])
    writer.put_range("b", infos["b"].file, infos["b"].offset, infos["b"].nbytes)
    writer.put_range("a_again", placed.path, placed.offset, placed.nbytes)  # copy from our own output
    writer.finish(total_parameters=123)

    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"] == {"total_parameters": 123, "total_size": sum(e.nbytes for e in entries)}
    assert set(index["weight_map"]) == set(order)
    assert len(set(index["weight_map"].values())) == len(writer.shards) > 1
    for name, shard in index["weight_map"].items():
        with safe_open(out / shard, "pt") as fh:
            assert fh.metadata() == {"format": "pt"}
            assert torch.equal(fh.get_tensor(name), tensors[name.split("_")[0]])
    for shard in writer.names:
        read_header(out / shard)  # our own validator accepts it: fully covered, aligned
        assert ((out / shard).read_bytes()[:8] != b"") and int.from_bytes(
            (out / shard).read_bytes()[:8], "little"
        ) % 8 == 0


def test_copy_without_copy_file_range(tmp_path, monkeypatch):
    """The portable path (macOS has no copy_file_range) gives the same bytes."""
    import os

    from upcycle.convert.writer import copy_range

    src = tmp_path / "src.bin"
    src.write_bytes(bytes(range(256)) * 1000)
    monkeypatch.delattr(os, "copy_file_range")
    fd = os.open(tmp_path / "dst.bin", os.O_WRONLY | os.O_CREAT)
    try:
        copy_range(src, 1000, 50_000, fd)
    finally:
        os.close(fd)
    assert (tmp_path / "dst.bin").read_bytes() == src.read_bytes()[1000:51_000]

"""Expert tensors made in the written dtype (LayerBuilder.written, what convert writes) are byte for byte the
float32 arithmetic they replace (LayerBuilder.tensor, then one cast), for every transform, dtype and scale; the
tensors made ahead in worker threads (methods/ahead.py) are the same whatever the order they are asked for in."""

from __future__ import annotations

import random
import threading

import pytest
import torch
from safetensors import safe_open

from upcycle.convert.execute import LayerFFNs, Sources, as_bytes, produce
from upcycle.convert.methods import LayerBuilder, drop, noise
from upcycle.convert.methods.base import generator, scales_exactly
from upcycle.convert.ops import Drop, Expert, Noise, Parts
from upcycle.convert.pipeline import convert
from upcycle.convert.spec import build_spec
from upcycle.source import Checkpoint

INTERMEDIATE, HIDDEN = 64, 48
SCALES = [1.0, 0.5, 2.0, 4.0, 8.0, 3.0, 4 ** (1 / 3)]  # shared halves, N/k, split N, fine-grained G, cube root
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _dense(dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """gate/up [I, H] and down [H, I] with the awkward values: zeros of both signs, subnormals, values that a
    scale of 8 takes past the dtype's largest."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    shapes = {"gate": (INTERMEDIATE, HIDDEN), "up": (INTERMEDIATE, HIDDEN), "down": (HIDDEN, INTERMEDIATE)}
    for role, shape in shapes.items():
        w = torch.randn(shape, generator=g) * 0.02
        flat = w.view(-1)
        flat[:4] = torch.tensor([0.0, -0.0, 1e-40, -3e-39])  # float32 subnormals (bf16 keeps some; f16 flushes)
        big = torch.finfo(dtype).max / 4
        flat[4:6] = torch.tensor([big, -big])
        out[role] = w.to(dtype)
    return out


def _transforms(scale: float) -> list:
    return [
        Drop(1, 0.5, scale),
        Drop(2, 0.25, scale),
        Noise(3, 0.1, scale),
        Parts("random", 4, (1,), scale),
        Parts("random", 4, (0, 3), scale),
        Parts("contiguous", 4, (2,), scale),  # one range of neurons: a view of the dense tensor
        Parts("contiguous", 1, (0,), scale),  # clone's scaled down_proj
    ]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scale", SCALES)
def test_written_is_the_float32_arithmetic_byte_for_byte(dtype, scale):
    dense = _dense(dtype)
    made, reference = LayerBuilder(dense, 7, 3), LayerBuilder(dense, 7, 3)
    for t in _transforms(scale):
        for role in ("gate", "up", "down"):
            want = reference.tensor(role, t).to(dtype)
            got = made.written(role, t, dtype)
            assert got.dtype == dtype and got.shape == want.shape
            assert as_bytes(got) == as_bytes(want), (t, role)
            if isinstance(t, Drop | Noise):  # into a given buffer: the same bytes, and that buffer returned
                buf = torch.full(want.shape, 5.0, dtype=dtype)
                assert made.written(role, t, dtype, buf) is buf and torch.equal(buf.view(-1), want.view(-1))
    for role, w in dense.items():  # nothing changed the dense tensors (views, in-place arithmetic)
        assert torch.equal(w, _dense(dtype)[role])


def test_drop_bytes_are_the_documented_draw():
    """Kept neurons are the dense bytes; the re-initialised ones are N(mean, std) of the dense matrix, drawn in one
    float32 block per (seed, layer, expert, role) and cast once: the bytes a seed has always given."""
    dense = _dense(torch.bfloat16)
    got = LayerBuilder(dense, 11, 2).written("down", Drop(5, 0.5, 2.0), torch.bfloat16)
    idx = torch.randperm(INTERMEDIATE, generator=generator(11, "drop", 2, 5))[: INTERMEDIATE // 2].sort().values
    w = dense["down"].float()
    draw = generator(11, "drop", 2, 5, "down")
    fresh = torch.empty(HIDDEN, len(idx)).normal_(*drop.stats(dense["down"]), generator=draw)
    keep = torch.ones(INTERMEDIATE, dtype=torch.bool)
    keep[idx] = False
    assert torch.equal(got[:, keep], (w[:, keep] * 2.0).bfloat16())
    assert torch.equal(got[:, idx], (fresh * 2.0).bfloat16())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_scaling_in_the_dtype_is_exact_for_the_scales_methods_use(dtype):
    """Checked on every bit pattern at run time; if a torch version rounded differently, written() would fall back
    to float32 (slower, the same bytes) and this test would say so."""
    assert all(scales_exactly(dtype, s) for s in [*SCALES, 16.0, 0.25, 1 / 3])


def test_nan_weights_keep_their_bytes():
    """A copied neuron keeps its bytes, NaN payloads and signs included (clone's byte copies do the same)."""
    dense = _dense(torch.bfloat16)
    dense["gate"].view(torch.int16)[0, :2] = torch.tensor([0x7FC1, -0x40], dtype=torch.int16)  # payload, -NaN
    got = LayerBuilder(dense, 0, 0).written("gate", Parts("contiguous", 4, (0,), 1.0), torch.bfloat16)
    assert torch.equal(got.view(torch.int16), dense["gate"][:16].view(torch.int16))


@pytest.mark.parametrize("spec", [dict(init="drop", experts=4), dict(experts=4, noise=0.05)], ids=["drop", "noise"])
def test_tensors_made_ahead_do_not_depend_on_the_order_asked(spec, dense_store, tmp_path):
    """Ask for the written expert tensors in reverse and shuffled order (verify --layerwise skips some; made-ahead
    tensors are then dropped, buffers recycled): every one is still the bytes convert wrote."""
    src = dense_store("llama", dtype=torch.bfloat16)
    out = tmp_path / "moe"
    plan = convert(str(src), out, build_spec(seed=4, **spec)).plan
    written = {}
    for shard in out.glob("*.safetensors"):
        with safe_open(shard, "pt") as fh:
            written |= {k: as_bytes(fh.get_tensor(k)).tobytes() for k in fh.keys()}
    ops = [op for op in plan.ops if isinstance(op, Expert) and op.transform is not None]
    assert len(ops) == 4 * 4 * 3  # every routed expert tensor of the 4 layers is computed
    ckpt = Checkpoint.open(src)
    for order in (ops[::-1], random.Random(0).sample(ops, len(ops)), ops[::2]):
        sources = Sources(ckpt, LayerFFNs(ckpt, plan, 4))
        for op in order:
            got = b"".join(bytes(memoryview(c).cast("B")) for c in produce(op, sources))
            assert got == written[op.name], op.name


# --- the draws: one stream per (seed, layer, expert, role), their moments, and a machine-independent mean/std ------


def test_each_layer_expert_and_role_draws_its_own_stream():
    """Drop's fresh blocks and noise's factors: the same keys give the same values, any other (seed, layer, expert,
    role) another stream, not a shifted or equal copy (the blocks are uncorrelated)."""
    keys = [
        (s, layer, e, role) for s in (0, 1) for layer in (0, 3) for e in (0, 1, 7) for role in ("gate", "up", "down")
    ]
    for draw in (
        lambda s, layer, e, role: drop.fresh((32, 64), (0.0, 1.0), s, layer, e, role),
        lambda s, layer, e, role: noise.factors((32, 64), 0.5, s, layer, e, role) - 1.0,
    ):
        blocks = torch.stack([draw(*k).reshape(-1) for k in keys])  # [K, 2048]
        assert torch.equal(blocks, torch.stack([draw(*k).reshape(-1) for k in keys]))  # same keys, same values
        corr = torch.corrcoef(blocks)  # [K, K]
        off = corr[~torch.eye(len(keys), dtype=torch.bool)]
        assert off.abs().max() < 0.12  # 2048 pairs: |r| of independent normals stays under ~4.5/sqrt(2048) = 0.1
    a, b = drop.fresh((8, 8), (0.0, 1.0), 0, 0, 0, "gate"), noise.factors((8, 8), 1.0, 0, 0, 0, "gate") - 1.0
    assert not torch.equal(a, b)  # drop and noise use different streams for the same keys


def test_drawn_values_have_the_requested_moments():
    """N(mean, std) of a real-size block (1M values): the sample mean within 5 standard errors, the std within 1%."""
    mean, std = -0.003, 0.021
    x = drop.fresh((1024, 1024), (mean, std), 5, 2, 3, "down").double()
    assert abs(x.mean().item() - mean) < 5 * std / 1024
    assert abs(x.std().item() / std - 1) < 0.01
    f = noise.factors((1024, 1024), 0.01, 5, 2, 3, "up").double()
    assert abs(f.mean().item() - 1.0) < 5 * 0.01 / 1024 and abs(f.std().item() / 0.01 - 1) < 0.01


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_drop_stats_do_not_depend_on_torch_threads(dtype):
    """The mean/std drop draws from are float64 sums in a fixed order: equal (to the bit) under 1, 2 and 5 torch
    threads, and within 1e-6 of the exact float64 moments (torch's float32 mean/std changed with the thread count)."""
    g = torch.Generator().manual_seed(9)
    w = (torch.randn(700, 3001, generator=g) * 0.02 + 0.004).to(dtype)  # 2.1M values: several chunks, a ragged end
    threads = torch.get_num_threads()
    try:
        got = []
        for n in (1, 2, 5):
            torch.set_num_threads(n)
            got.append(drop.stats(w))
    finally:
        torch.set_num_threads(threads)
    assert got[0] == got[1] == got[2]
    exact = w.double()
    mean, std = got[0]
    assert abs(mean - exact.mean().item()) < 1e-6 * exact.std().item()
    assert abs(std / exact.std().item() - 1) < 1e-6
    assert drop.stats(w[:1, :1])[0] == w[0, 0].item()  # one value: its mean (std undefined)


def test_drop_bytes_do_not_depend_on_torch_threads():
    """The bytes of a seed are the same under any torch thread count, so `verify --layerwise` on another machine
    reproduces them (with torch's float32 mean/std, 1 and 2 threads already gave other bytes for this tensor)."""
    g = torch.Generator().manual_seed(0)
    dense = {r: (torch.randn(512, 384, generator=g) * 0.02 + 0.001).bfloat16() for r in ("gate", "up")}
    dense["down"] = (torch.randn(384, 512, generator=g) * 0.02).bfloat16()
    threads = torch.get_num_threads()
    try:
        made = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            b = LayerBuilder(dense, 0, 0)
            made.append([as_bytes(b.written(r, Drop(e, 0.5, 1.0), torch.bfloat16)) for e in (0, 1) for r in dense])
    finally:
        torch.set_num_threads(threads)
    assert made[0] == made[1] == made[2]


@pytest.mark.parametrize("n", [*range(1, 70), 1000, 4099, 65536, 65551])
def test_drawing_in_spans_gives_the_values_of_one_draw(n):
    """noise.spans: the spans cover n values in order, and `normal_` over them one after another (one generator)
    gives the bytes of one `normal_` of all n: what lets --noise draw a tensor in small buffers."""
    whole = torch.empty(n).normal_(1.0, 0.3, generator=generator(0, "x", n))
    got, gen, covered = torch.empty(n), generator(0, "x", n), 0
    for start, stop in noise.spans(n, 32):
        assert start == covered and stop > start
        covered = stop
        got[start:stop].normal_(1.0, 0.3, generator=gen)
    assert covered == n and torch.equal(got, whole)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("chunk", "block"), [(16, 1), (48, 1), (48, 3), (1024, 1), (16, 16)])
def test_noise_made_in_spans_is_the_float32_arithmetic(dtype, chunk, block, monkeypatch):
    """--noise made DRAW_CHUNK values a span and DRAW_SPANS spans a block (many spans and blocks here, and a dense
    size 16 does not divide) is byte for byte the whole-tensor float32 arithmetic, for every scale."""
    monkeypatch.setattr(noise, "DRAW_CHUNK", chunk)
    monkeypatch.setattr(noise, "DRAW_SPANS", block)
    g = torch.Generator().manual_seed(2)
    dense = {"gate": (torch.randn(61, 47, generator=g) * 0.02).to(dtype), "down": _dense(dtype)["down"]}
    for scale in SCALES:
        made, reference = LayerBuilder(dense, 5, 1), LayerBuilder(dense, 5, 1)
        for role in dense:
            want = reference.tensor(role, Noise(2, 0.1, scale)).to(dtype)
            assert as_bytes(made.written(role, Noise(2, 0.1, scale), dtype)) == as_bytes(want), (role, scale)


# --- --noise as convert writes it: the documented per-tensor draw, across layers, whatever is made ahead ----------


@pytest.mark.parametrize(("chunk", "block"), [(noise.DRAW_CHUNK, noise.DRAW_SPANS), (48, 1), (48, 5)])
def test_converted_noise_is_the_per_tensor_reference(chunk, block, dense_store, tmp_path, monkeypatch):
    """Every expert tensor convert writes with --noise is `perturb` of its dense tensor (one `normal_` of the whole
    tensor from the generator of (seed, layer, expert, role), times the dense weights, cast once), byte for byte:
    the bytes a seed gives do not depend on the spans it is drawn in, on the workers making the next layer's
    tensors while the writer finishes a layer, nor on which thread made which."""
    monkeypatch.setattr(noise, "DRAW_CHUNK", chunk)
    monkeypatch.setattr(noise, "DRAW_SPANS", block)
    src = dense_store("llama", dtype=torch.bfloat16)
    out = tmp_path / "moe"
    plan = convert(str(src), out, build_spec(seed=9, experts=4, noise=0.05)).plan
    dense, moe = {}, {}
    for folder, into in ((src, dense), (out, moe)):
        for shard in folder.glob("*.safetensors"):
            with safe_open(shard, "pt") as fh:
                into |= {k: fh.get_tensor(k) for k in fh.keys()}
    ops = [op for op in plan.ops if isinstance(op, Expert) and isinstance(op.transform, Noise)]
    assert len(ops) == 4 * 4 * 3 and {op.layer for op in ops} == {0, 1, 2, 3}
    for op in ops:
        t = op.transform
        want = noise.perturb(dense[op.src], op.role, t.sigma, 9, op.layer, t.expert, t.scale).to(moe[op.name].dtype)
        assert as_bytes(moe[op.name]) == as_bytes(want), op.name


def test_the_window_runs_into_the_next_layer_but_not_beyond():
    """Ahead starts the next AHEAD tensors after the one asked for, across a layer's end (the next layer's first
    tensors are drawn while the writer finishes this one), but never a tensor two layers on (whose dense FFN would
    be a third layer in memory)."""
    from upcycle.convert.methods import ahead

    made, lock = [], threading.Lock()

    def make(key, out):
        with lock:
            made.append(key[:3])
        return torch.zeros(1)

    sequence = [((layer, 0, role, Noise(0, 0.1, 1.0)), (1,)) for layer in range(4) for role in ("gate", "up")]
    a = ahead.Ahead(make, sequence)
    a.start(torch.float32)
    a.get((0, 0, "gate", Noise(0, 0.1, 1.0)), (1,), torch.float32)
    a.get((0, 0, "up", Noise(0, 0.1, 1.0)), (1,), torch.float32)  # window: layer 1's gate and up, not layer 2's
    a._pool.shutdown(wait=True)
    assert sorted(made) == [(0, 0, "gate"), (0, 0, "up"), (1, 0, "gate"), (1, 0, "up")]


def test_layer_ffns_hold_at_most_two_layers(dense_store, tmp_path):
    """The dense FFN of a layer the writer has gone past is dropped; while the next layer's tensors are made ahead,
    two layers are held, never more (a third loaded drops the oldest)."""
    src = dense_store("llama", dtype=torch.bfloat16)
    plan = convert(str(src), tmp_path / "moe", build_spec(seed=1, experts=4, noise=0.05)).plan
    ckpt = Checkpoint.open(src)
    layers = LayerFFNs(ckpt, plan, 1)
    ops = [op for op in plan.ops if isinstance(op, Expert) and op.transform is not None]
    seen = set()
    for op in ops:
        layers.release(layers.written(op, torch.bfloat16))
        held = {layer for _, layer in layers._held}
        assert len(held) <= 2 and op.layer in held and min(held) == op.layer
        seen |= held
    assert seen == {0, 1, 2, 3}
    first = layers.builder(3)
    for layer in (0, 1, 2):  # loaded one after another: the oldest dropped each time
        layers.builder(layer)
        assert len(layers._held) == 2
    assert layers.builder(3) is not first  # layer 3 was dropped: loaded again

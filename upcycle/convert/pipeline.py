"""`upcycle convert`: run a plan tensor by tensor and write a complete, natively loadable MoE folder."""

from __future__ import annotations

import math
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UpcycleError
from ..generic import MODEL_TYPE as GENERIC_MODEL_TYPE
from ..generic import register as register_generic
from ..generic import write_code as write_generic_code
from ..outdir import check_target, staged_folder
from ..publish.card import hub_card_license, source_license, write_card_and_recipe
from ..source import (
    DTYPE_BYTES,
    EMBEDDED,
    Checkpoint,
    SourceRef,
    TensorInfo,
    file_sha256,
    looks_like_repo_id,
    read_config,
    resolve,
)
from .methods import LayerBuilder
from .plan import LOSSLESS, ST_TO_TORCH, CastCheck, Plan, make_plan
from .router_init import init_router
from .spec import ConvertSpec
from .writer import Entry, Placed, ShardedWriter

if TYPE_CHECKING:
    from transformers import PretrainedConfig

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
)
CHUNK_BYTES = 16 << 20  # large enough to amortise Python, small enough for fast writes


@dataclass(frozen=True)
class ConvertResult:
    out: Path | None  # None for a dry run
    plan: Plan
    source: SourceRef
    recipe: dict[str, Any] | None
    pushed: Any = None  # hub.PushResult when --push-to-hub was given


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("upcycle")
    except PackageNotFoundError:
        return "0+unknown"


def dense_config(folder: Path) -> PretrainedConfig:
    """The dense config (a transformers config, class defaults filled in: what the model really uses)."""
    from transformers import AutoConfig

    from ..arch import family_for
    from .plan import check_causal_lm

    raw = read_config(folder)
    family_for(raw.get("model_type"))  # an unsupported family fails here, with the list of supported ones
    check_causal_lm(raw)
    try:
        return AutoConfig.from_pretrained(folder)
    except Exception as exc:  # transformers validates configs with several exception types
        raise UpcycleError(f"{folder}/config.json could not be read by transformers: {exc}".splitlines()[0]) from None


def gguf_config(gguf: Path) -> PretrainedConfig:
    """The config transformers derives from a GGUF file's metadata (no tensor is read)."""
    from transformers import AutoConfig

    from ..arch import family_for

    try:
        cfg = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as exc:  # transformers raises many types for unreadable GGUF files
        raise UpcycleError(f"could not read {gguf.name} as a GGUF model: {exc}".splitlines()[0]) from None
    family_for(cfg.model_type)
    return cfg


def class_keys(cfg: PretrainedConfig) -> tuple[dict[str, tuple[int, ...]], frozenset[str]]:
    """Every key (with its shape) that the dense class holds for `cfg`, and the tied ones a checkpoint may omit.

    The model is built on the meta device, so this costs no memory whatever the model's size.
    """
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
    except Exception as exc:  # transformers rejects inconsistent configs with several exception types
        raise UpcycleError(f"transformers cannot build this {cfg.model_type} model: {exc}".splitlines()[0]) from None
    unique = {name for name, _ in model.named_parameters()}
    tied = {name for name, _ in model.named_parameters(remove_duplicate=False)} - unique
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}, frozenset(tied)


@dataclass(frozen=True)
class Dense:
    """What a plan is made from: the dense config, the source tensor index and the keys the class holds."""

    config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    expected: frozenset[str]
    optional: frozenset[str]
    checkpoint: Checkpoint | None  # None for a GGUF file not dequantized yet: its tensors come from the config

    def plan(self, spec: ConvertSpec, measured: dict[tuple[str, str], CastCheck] | None = None) -> Plan:
        return make_plan(
            self.config, self.tensors, spec, expected=self.expected, optional=self.optional, measured=measured
        )


def read_dense(source: SourceRef) -> Dense:
    if source.folder is None:  # GGUF, dry run: the tensors it will hold once dequantized to float32
        cfg = gguf_config(source.gguf_file)
        keys, tied = class_keys(cfg)
        tensors = {
            name: TensorInfo(name, "F32", shape, source.gguf_file, 0, math.prod(shape) * 4)
            for name, shape in keys.items()
            if name not in tied  # save_pretrained writes tied weights once
        }
        return Dense(cfg.to_dict(), tensors, frozenset(keys), tied, None)
    ckpt = Checkpoint.open(source.folder)
    cfg = dense_config(source.folder)
    keys, tied = class_keys(cfg)
    return Dense(cfg.to_dict(), ckpt.tensors, frozenset(keys), tied, with_family_views(ckpt, cfg.to_dict()))


def with_family_views(ckpt: Checkpoint, cfg: dict[str, Any]) -> Checkpoint:
    """CKPT, able to read the family's views and untied aliases too (the keys plans name as sources)."""
    from ..arch import family_for
    from .views import ViewCheckpoint

    return ViewCheckpoint.of(ckpt, family_for(cfg.get("model_type")), cfg)


def plan_for(source: SourceRef, spec: ConvertSpec, *, measure: bool = True) -> tuple[Dense, Plan]:
    """The plan for SOURCE; with `measure`, lossy dtype casts are measured on the weights (a read-only pass)."""
    dense = read_dense(source)
    plan = dense.plan(spec)
    if measure and plan.lossy_casts() and dense.checkpoint is not None:
        plan = dense.plan(spec, measure_casts(dense.checkpoint.tensors, plan))
    return dense, plan


def check_not_source(src: str, out: Path) -> None:
    """Refuse an OUT that is, holds or lies inside a local source folder, before any work is done."""
    path = Path(src).expanduser()
    if path.is_dir():
        refuse_overlap(path, Path(out).expanduser(), out, f"the source model {src}")


def convert(
    src: str,
    out: Path,
    spec: ConvertSpec,
    *,
    force: bool = False,
    dry_run: bool = False,
    progress: Callable[[int, int], None] | None = None,
    push_to_hub: str | None = None,
    private: bool = False,
    base_model: str | None = None,
) -> ConvertResult:
    """Convert the dense model SRC into an MoE at OUT. `progress(done_bytes, total_bytes)` is called as it goes.

    `base_model` names the Hub model a local source was made from, for the card's metadata.
    """
    out = Path(out)
    max_shard = shard_size(spec.max_shard_size)
    if base_model is not None and not looks_like_repo_id(base_model):
        raise UpcycleError(f"--base-model {base_model!r} is not a Hub id; give it as org/name")
    check_not_source(src, out)
    if not dry_run:
        check_target(out, force)  # fail before any download or heavy work
        if push_to_hub:
            from ..publish.hub import require_token

            require_token()
    source = resolve(src, spec.revision, materialize=not dry_run)
    dense, plan = plan_for(source, spec, measure=dry_run)
    if dry_run:
        return ConvertResult(out=None, plan=plan, source=source, recipe=None)
    ckpt = dense.checkpoint
    check_room(source, out, plan)
    routers, partitions, calibration = None, None, {}
    if spec.calibration or spec.router_init == "hidden":  # a read-only pass over the dense model, before writing
        from .calibrate import calibrate

        routers, partitions, calibration = calibrate(source.folder, ckpt, plan, spec)
    hashes = BackgroundHashes(ckpt.files)  # overlaps the copying; stopped at once if the conversion fails
    try:
        with staged_folder(out, force) as tmp:
            measured = write_weights(ckpt, plan, spec, tmp, max_shard, progress, routers, partitions)
            plan = dense.plan(spec, measured) if plan.lossy_casts() else plan
            write_config(plan, tmp)
            copy_side_files(source.folder, tmp, plan)
            label = src if src in EMBEDDED else source.id  # how the command names the source: never a path
            command = _command(label, out, spec, source, base_model)
            recipe = make_recipe(source, ckpt, plan, spec, hashes.result(), command, base_model)
            recipe |= calibration  # which text (by name) and how many tokens made routers or partitions
            write_card_and_recipe(tmp, recipe | {"name": out.name})
    finally:
        hashes.cancel()
    pushed = None
    if push_to_hub:
        from ..publish.hub import push

        pushed = push(out, push_to_hub, private=private)
    return ConvertResult(out=out, plan=plan, source=source, recipe=recipe, pushed=pushed)


# --- weights -------------------------------------------------------------------------------------------


def refuse_overlap(src: Path, out: Path, shown: Path | str, where: str) -> None:
    """Refuse an OUT that is the source folder, holds it, or lies inside it (`where` names the source)."""
    s, o = src.resolve(), out.resolve()
    if s == o or o in s.parents:
        raise UpcycleError(f"{shown} holds the source model; replacing it would delete the source. Choose another OUT")
    if s in o.parents:
        raise UpcycleError(
            f"{shown} lies inside {where}; upcycle does not write into a source folder. Choose an OUT outside it"
        )


def check_room(source: SourceRef, out: Path, plan: Plan) -> None:
    """Refuse an OUT that would replace, contain or lie inside the source, or that the disk cannot hold."""
    refuse_overlap(source.folder, out, out, "the source model's folder")
    dst = out.resolve()
    free = shutil.disk_usage(dst.parent).free
    side = side_bytes(source.folder, plan)
    need = plan.total_bytes + side
    if free < need:
        from ..publish.card import human_bytes

        raise UpcycleError(
            f"{dst.parent} has {human_bytes(free)} free, but the MoE needs {human_bytes(need)} "
            f"({human_bytes(plan.total_bytes)} of weights plus {human_bytes(side)} for the tokenizer, config, "
            "card and file headers); free some space or choose another OUT"
        )


def side_bytes(src: Path, plan: Plan) -> int:
    """What OUT holds besides the tensors' bytes: the tokenizer and generation config copied from the source
    (their real sizes), each tensor's entry in its shard header and in the index (under 512 bytes), and 1 MiB
    for config.json, upcycle.json, the card and the generic code."""
    copied = sum((src / n).stat().st_size for n in (*TOKENIZER_FILES, "generation_config.json") if (src / n).is_file())
    return copied + 512 * len(plan.ops) + (1 << 20)


def shard_size(text: str) -> int:
    from transformers.utils.hub import convert_file_size_to_int

    try:
        size = convert_file_size_to_int(text)
    except (ValueError, TypeError):
        size = 0
    if not isinstance(size, int) or size <= 0:
        raise UpcycleError(f"--max-shard-size {text!r} is not a size such as 5GB or 500MB")
    return size


class BackgroundHashes:
    """SHA-256 of the source files, computed in a daemon thread while the weights are copied."""

    def __init__(self, paths: list[Path]):
        self._stop = threading.Event()
        self._done: dict[str, str] = {}
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(list(paths),), daemon=True)
        self._thread.start()

    def _run(self, paths: list[Path]) -> None:
        try:
            for p in paths:
                digest = file_sha256(p, stop=self._stop)
                if digest is None:
                    return
                self._done[p.name] = digest
        except BaseException as exc:  # reported by result()
            self._error = exc

    def result(self) -> dict[str, str]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return dict(self._done)

    def cancel(self) -> None:
        self._stop.set()


def write_weights(
    ckpt: Checkpoint,
    plan: Plan,
    spec: ConvertSpec,
    folder: Path,
    max_shard: int,
    progress: Callable[[int, int], None] | None = None,
    routers: dict | None = None,
    partitions: dict | None = None,
) -> dict[tuple[str, str], CastCheck]:
    """Write every tensor of the plan; returns what the lossy casts did to the values they cast.

    `routers` (layer -> [E, H] float32) holds router rows computed beforehand (--router-init kmeans/hidden),
    `partitions` (layer -> (by, parts) -> neuron groups) the --split-by coactivation groups.
    """
    meter = CastMeter()
    entries = [Entry(op.name, op.dtype, op.shape, op.nbytes) for op in plan.ops]
    writer = ShardedWriter(folder, entries, max_shard, {"format": "pt"})
    seen: dict[tuple, Placed] = {}  # identical expert tensors already on disk: copy those bytes again
    layers = LayerFFNs(ckpt, plan, spec.seed, partitions)
    total, done = plan.total_bytes, 0
    try:
        for op in plan.ops:
            key = (op.src, op.transform, op.dtype)
            if op.kind in ("expert", "shared") and key in seen:  # the same bytes are already in the output
                place = seen[key]
                writer.put_range(op.name, place.path, place.offset, place.nbytes)
            elif op.kind in ("expert", "shared") and op.transform is not None:  # computed from the layer's FFN
                built = layers.builder(op.layer).tensor(op.role, op.transform)
                written = built.to(_torch_dtype(op.dtype))
                src_dtype = ckpt.tensors[op.src].dtype
                if src_dtype != op.dtype and (src_dtype, op.dtype) not in LOSSLESS:
                    meter.add(src_dtype, op.dtype, built, written)
                seen[key] = writer.put(op.name, [_as_bytes(written)])
            elif op.values is not None:  # a copied tensor the family changes element-wise (Gemma's 1+w)
                writer.put(op.name, transform_chunks(ckpt.tensors[op.src], op.dtype, op.values))
            elif op.kind in ("copy", "expert", "shared"):
                info = ckpt.tensors[op.src]
                if info.dtype == op.dtype:
                    placed = writer.put_range(op.name, info.file, info.offset, info.nbytes)
                else:
                    lossy = (info.dtype, op.dtype) not in LOSSLESS
                    placed = writer.put(op.name, cast_chunks(info, op.dtype, meter if lossy else None))
                if op.kind in ("expert", "shared"):
                    seen[key] = placed
            elif op.kind == "router" and routers is not None:
                writer.put(op.name, [_as_bytes(routers[op.layer].to(_torch_dtype(op.dtype)))])
            elif op.kind == "router":
                weight = init_router(
                    spec.router_init,
                    spec.experts,
                    op.shape[1],
                    std=spec.router_std,
                    seed=spec.seed,
                    layer=op.layer,
                    dtype=_torch_dtype(op.dtype),
                    group=op.transform[1] if op.transform else 1,
                )
                writer.put(op.name, [_as_bytes(weight)])
            elif op.kind == "zeros":
                writer.put(op.name, [bytes(op.nbytes)])
            elif op.kind == "fused":
                writer.put(op.name, fused_pieces(op, ckpt, writer, layers, seen, meter))
            else:
                raise RuntimeError(f"unknown op kind {op.kind}")
            done += op.nbytes
            if progress:
                progress(done, total)
        writer.finish(plan.total_params)
    finally:
        writer.abort()
    return meter.result()


def fused_pieces(op, ckpt: Checkpoint, writer: ShardedWriter, layers: LayerFFNs, seen: dict, meter: CastMeter):
    """The bytes of a fused expert tensor, part by part (expert by expert): a source byte range where a part is the
    dense tensor unchanged, bytes already written where an equal part is on disk, else the part computed or cast."""
    for part in op.parts:
        key = (part.src, part.transform, part.dtype)
        if key in seen:
            yield seen[key]
            continue
        here = writer.tell()
        info = ckpt.tensors[part.src]
        if part.transform is not None:
            built = layers.builder(part.layer).tensor(part.role, part.transform)
            written = built.to(_torch_dtype(part.dtype))
            if info.dtype != part.dtype and (info.dtype, part.dtype) not in LOSSLESS:
                meter.add(info.dtype, part.dtype, built, written)
            yield _as_bytes(written)
        elif info.dtype == part.dtype:
            yield Placed(info.file, info.offset, info.nbytes)
        else:
            lossy = (info.dtype, part.dtype) not in LOSSLESS
            yield from cast_chunks(info, part.dtype, meter if lossy else None)
        seen[key] = Placed(here.path, here.offset, part.nbytes)


class LayerFFNs:
    """The dense FFN tensors of one MoE layer at a time, for the expert methods that compute from them.

    A layer's gate/up/down are loaded when its first computed expert tensor is asked for and dropped when the
    next layer's are, so memory holds one layer's FFN (plus one expert) whatever the model's size.
    """

    def __init__(self, ckpt: Checkpoint, plan: Plan, seed: int, partitions: dict | None = None):
        self.ckpt, self.seed, self.partitions = ckpt, seed, partitions or {}
        self.keys: dict[int, dict[str, str]] = {}  # layer -> role -> source key
        for op in plan.flat_ops():
            if op.role is not None:
                self.keys.setdefault(op.layer, {})[op.role] = op.src
        self._layer: int | None = None
        self._builder: LayerBuilder | None = None

    def builder(self, layer: int) -> LayerBuilder:
        if layer != self._layer:
            self._builder = None  # free the previous layer first
            dense = {role: self.ckpt.load(key) for role, key in self.keys[layer].items()}
            built = LayerBuilder(dense, self.seed, layer, self.partitions.get(layer))
            self._builder, self._layer = built, layer
        return self._builder


def _torch_dtype(st_dtype: str):
    import torch

    return getattr(torch, ST_TO_TORCH[st_dtype])


def _as_bytes(t) -> memoryview:
    import torch

    return memoryview(t.contiguous().view(torch.uint8).reshape(-1).numpy())


def read_chunks(info: TensorInfo, out_item_bytes: int = 0) -> Iterator:
    """A source tensor as flat torch tensors of at most CHUNK_BYTES each (counting the larger of the item sizes
    in and out), read through one reused buffer.

    Reads are plain file reads, not a memory map, so memory stays at a few chunks whatever the tensor's size
    (a mapped 1 GB embedding would stay resident until done). Each piece is only valid until the next one.
    """
    import torch

    src_dtype, item = _torch_dtype(info.dtype), DTYPE_BYTES[info.dtype]
    numel = info.nbytes // item
    if numel == 0:
        return
    step = max(1, CHUNK_BYTES // max(item, out_item_bytes))  # row boundaries do not matter element-wise
    buf = bytearray(min(numel, step) * item)
    with open(info.file, "rb", buffering=0) as fh:
        for start in range(0, numel, step):
            count = min(step, numel - start)
            view = memoryview(buf)[: count * item]
            fh.seek(info.offset + start * item)
            got = 0
            while got < len(view):
                n = fh.readinto(view[got:])
                if not n:
                    raise UpcycleError(f"{info.file} ended early while reading {info.name}; the file is truncated")
                got += n
            yield torch.frombuffer(view, dtype=src_dtype)


def cast_chunks(info: TensorInfo, dtype: str, meter: CastMeter | None = None) -> Iterator[memoryview]:
    """The bytes of a source tensor cast to `dtype`, piece by piece; `meter` tallies what the cast changes."""
    for x in read_chunks(info, DTYPE_BYTES[dtype]):
        y = x.to(_torch_dtype(dtype))
        if meter is not None:
            meter.add(info.dtype, dtype, x, y)
        yield _as_bytes(y)


def transform_chunks(info: TensorInfo, dtype: str, values: tuple) -> Iterator[memoryview]:
    """The source tensor changed element-wise (views.apply_values) and written in `dtype`, piece by piece."""
    from .views import apply_values

    for x in read_chunks(info, max(DTYPE_BYTES[dtype], 4)):  # float32 arithmetic may be needed on the way
        yield _as_bytes(apply_values(x, values, _torch_dtype(dtype)))


class CastMeter:
    """Tallies, per (source dtype, written dtype), what a cast does to the values: rounding and overflow."""

    def __init__(self, pairs: Iterable[tuple[str, str]] = ()) -> None:
        # pair -> [values, largest |x|, rounded, overflow]; `pairs` get a record even if no value is cast
        self._acc: dict[tuple[str, str], list] = {pair: [0, 0.0, 0, 0] for pair in pairs}

    def add(self, src: str, dst: str, x, y) -> None:
        import torch

        finite = torch.isfinite(x)
        overflow = torch.isinf(y) & finite
        rounded = (y.to(x.dtype) != x) & finite & ~overflow
        acc = self._acc.setdefault((src, dst), [0, 0.0, 0, 0])
        acc[0] += x.numel()
        if x.numel():
            acc[1] = max(acc[1], float(x.abs().masked_fill(~finite, 0).max()))
        acc[2] += int(rounded.sum())
        acc[3] += int(overflow.sum())

    def result(self) -> dict[tuple[str, str], CastCheck]:
        return {pair: CastCheck(pair[0], pair[1], n, big, r, o) for pair, (n, big, r, o) in self._acc.items()}


def measure_casts(tensors: dict[str, TensorInfo], plan: Plan) -> dict[tuple[str, str], CastCheck]:
    """Measure the plan's lossy casts on the source weights, reading each cast tensor once, writing nothing."""
    lossy = set(plan.lossy_casts())
    meter = CastMeter(lossy)
    done: set[str] = set()
    for op in plan.ops:
        if op.src is None or op.src in done or (tensors[op.src].dtype, op.dtype) not in lossy:
            continue
        done.add(op.src)
        for _ in cast_chunks(tensors[op.src], op.dtype, meter):
            pass
    return meter.result()


# --- config, tokenizer, recipe ---------------------------------------------------------------------------


def write_config(plan: Plan, folder: Path) -> None:
    from transformers import AutoConfig

    if plan.config.get("model_type") == GENERIC_MODEL_TYPE:  # upcycle's wrapper: its code goes beside the weights
        register_generic()
        write_generic_code(folder)
    kwargs = {k: v for k, v in plan.config.items() if k != "model_type"}
    config = AutoConfig.for_model(plan.config["model_type"], **kwargs)
    written = config.to_dict()
    for key, value in plan.config.items():
        if key in ("model_type", "dtype"):
            continue
        if written.get(key) != value and getattr(config, key, None) != value:
            raise RuntimeError(f"{plan.target} config dropped {key}={value!r} (got {written.get(key)!r})")
    config.save_pretrained(folder)


def copy_side_files(src: Path, dst: Path, plan: Plan) -> None:
    from transformers import GenerationConfig

    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    gen = src / "generation_config.json"
    if gen.is_file():
        shutil.copyfile(gen, dst / "generation_config.json")
    else:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(dst)
        GenerationConfig.from_model_config(cfg).save_pretrained(dst)


def _command(label: str, out: Path, spec: ConvertSpec, source: SourceRef, base_model: str | None) -> str:
    """The command that reproduces the model, naming the source and OUT without their folders."""
    parts = ["upcycle", "convert", label, out.name]
    defaults = ConvertSpec()
    options = spec.to_dict()
    if source.kind == "hub" and source.revision:
        options["revision"] = source.revision  # pin the commit that was converted
    for key, value in options.items():
        if value != getattr(defaults, key) and value is not None:
            if key == "layers":
                value = ",".join(map(str, value))
            parts.append(f"--{key.replace('_', '-')} {value}")
    if base_model:
        parts.append(f"--base-model {base_model}")
    return " ".join(parts)


def make_recipe(
    source: SourceRef,
    ckpt: Checkpoint,
    plan: Plan,
    spec: ConvertSpec,
    hashes: dict[str, str],
    command: str,
    base_model: str | None = None,
) -> dict[str, Any]:
    """upcycle.json: how the model was made. Local sources are named by their folder or file name only."""
    if base_model is None and source.kind in ("hub", "gguf") and looks_like_repo_id(source.id):
        base_model = source.id
    license_ = source.license or source_license(source.folder) or (base_model and hub_card_license(base_model))
    return {
        "tool": {"name": "upcycle", "version": _version()},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command,
        "source": {
            "id": source.id,
            "kind": source.kind,
            "revision": source.revision,
            "base_model": base_model,
            "gguf_sha256": file_sha256(source.gguf_file) if source.gguf_file else None,
            "license": license_ or None,
            "config_sha256": file_sha256(ckpt.folder / "config.json"),
            "files_sha256": hashes,
        },
        "recipe": spec.to_dict(),
        "plan": plan.summary(),
        "dtype": plan.config["dtype"],
        "config": plan.config,
    }

"""`upcycle convert`: run a plan tensor by tensor and write a complete, natively loadable MoE folder."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..errors import UpcycleError
from ..outdir import check_target, staged_folder
from ..publish.card import source_license, write_card_and_recipe
from ..source import DTYPE_BYTES, Checkpoint, SourceRef, TensorInfo, file_sha256, read_config, resolve
from .plan import ST_TO_TORCH, Plan, make_plan
from .router_init import init_router
from .spec import ConvertSpec
from .writer import Entry, Placed, ShardedWriter

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


def dense_config(folder: Path) -> dict[str, Any]:
    """The dense config as a dict with the class defaults filled in (what the model really uses)."""
    from transformers import AutoConfig

    from ..arch import family_for
    from .plan import check_causal_lm

    raw = read_config(folder)
    family_for(raw.get("model_type"))  # an unsupported family fails here, with the list of supported ones
    check_causal_lm(raw)
    try:
        cfg = AutoConfig.from_pretrained(folder)
    except Exception as exc:  # transformers validates configs with several exception types
        raise UpcycleError(f"{folder}/config.json could not be read by transformers: {exc}".splitlines()[0]) from None
    return cfg.to_dict()


def plan_for(source: SourceRef, spec: ConvertSpec) -> tuple[Checkpoint, Plan]:
    ckpt = Checkpoint.open(source.folder)
    cfg = dense_config(source.folder)
    return ckpt, make_plan(cfg, ckpt.tensors, spec)


def convert(
    src: str,
    out: Path,
    spec: ConvertSpec,
    *,
    force: bool = False,
    dry_run: bool = False,
    command: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    push_to_hub: str | None = None,
    private: bool = False,
) -> ConvertResult:
    """Convert the dense model SRC into an MoE at OUT. `progress(done_bytes, total_bytes)` is called as it goes."""
    out = Path(out)
    max_shard = shard_size(spec.max_shard_size)
    if not dry_run:
        check_target(out, force)  # fail before any download or heavy work
        if push_to_hub:
            from ..publish.hub import require_token

            require_token()
    source = resolve(src, spec.revision)
    ckpt, plan = plan_for(source, spec)
    if dry_run:
        return ConvertResult(out=None, plan=plan, source=source, recipe=None)
    check_room(source, out, plan)
    hashes = BackgroundHashes(ckpt.files)  # overlaps the copying; stopped at once if the conversion fails
    try:
        with staged_folder(out, force) as tmp:
            write_weights(ckpt, plan, spec, tmp, max_shard, progress)
            write_config(plan, tmp)
            copy_side_files(source.folder, tmp, plan)
            recipe = make_recipe(source, ckpt, plan, spec, hashes.result(), command or _command(src, out, spec))
            write_card_and_recipe(tmp, recipe | {"name": out.name})
    finally:
        hashes.cancel()
    pushed = None
    if push_to_hub:
        from ..publish.hub import push

        pushed = push(out, push_to_hub, private=private)
    return ConvertResult(out=out, plan=plan, source=source, recipe=recipe, pushed=pushed)


# --- weights -------------------------------------------------------------------------------------------


def check_room(source: SourceRef, out: Path, plan: Plan) -> None:
    """Refuse an OUT that would replace or contain the source, or that the disk cannot hold."""
    src, dst = source.folder.resolve(), out.resolve()
    if src == dst or dst in src.parents:
        raise UpcycleError(f"{out} holds the source model; replacing it would delete the source. Choose another OUT")
    free = shutil.disk_usage(dst.parent).free
    need = plan.total_bytes + (64 << 20)  # weights plus room for the side files
    if free < need:
        raise UpcycleError(
            f"{dst.parent} has {free / 1e9:.2f} GB free, but the MoE needs {need / 1e9:.2f} GB; "
            "free some space or choose another OUT"
        )


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
) -> None:
    entries = [Entry(op.name, op.dtype, op.shape, op.nbytes) for op in plan.ops]
    writer = ShardedWriter(folder, entries, max_shard, {"format": "pt"})
    seen: dict[tuple, Placed] = {}  # identical expert tensors already on disk: copy those bytes again
    total, done = plan.total_bytes, 0
    try:
        for op in plan.ops:
            key = (op.src, op.transform, op.dtype)
            if op.kind in ("copy", "expert") and op.transform is not None:
                raise RuntimeError(f"{op.name}: transform {op.transform!r} has no executor yet")
            if op.kind == "expert" and key in seen:  # the same bytes are already in the output: copy them
                place = seen[key]
                writer.put_range(op.name, place.path, place.offset, place.nbytes)
            elif op.kind in ("copy", "expert"):
                info = ckpt.tensors[op.src]
                if info.dtype == op.dtype:
                    placed = writer.put_range(op.name, info.file, info.offset, info.nbytes)
                else:
                    placed = writer.put(op.name, cast_chunks(info, op.dtype))
                if op.kind == "expert":
                    seen[key] = placed
            elif op.kind == "router":
                weight = init_router(
                    spec.router_init,
                    spec.experts,
                    op.shape[1],
                    std=spec.router_std,
                    seed=spec.seed,
                    layer=op.layer,
                    dtype=_torch_dtype(op.dtype),
                )
                writer.put(op.name, [_as_bytes(weight)])
            elif op.kind == "zeros":
                writer.put(op.name, [bytes(op.nbytes)])
            else:
                raise RuntimeError(f"unknown op kind {op.kind}")
            done += op.nbytes
            if progress:
                progress(done, total)
        writer.finish(plan.total_params)
    finally:
        writer.abort()


def _torch_dtype(st_dtype: str):
    import torch

    return getattr(torch, ST_TO_TORCH[st_dtype])


def _as_bytes(t) -> memoryview:
    import torch

    return memoryview(t.contiguous().view(torch.uint8).reshape(-1).numpy())


def cast_chunks(info: TensorInfo, dtype: str) -> Iterator[memoryview]:
    """The bytes of a source tensor cast to `dtype`, read in pieces of at most CHUNK_BYTES (in or out).

    Reads go through a reused buffer with plain file reads, not through a memory map, so memory stays at
    a few chunks whatever the tensor's size (a mapped 1 GB embedding would stay resident until done).
    """
    import torch

    src_dtype, dst_dtype = _torch_dtype(info.dtype), _torch_dtype(dtype)
    numel = info.nbytes // DTYPE_BYTES[info.dtype]
    if numel == 0:
        return
    per_item = max(DTYPE_BYTES[info.dtype], DTYPE_BYTES[dtype])
    step = max(1, CHUNK_BYTES // per_item)  # elements per piece; row boundaries do not matter for a cast
    buf = bytearray(min(numel, step) * DTYPE_BYTES[info.dtype])
    with open(info.file, "rb", buffering=0) as fh:
        for start in range(0, numel, step):
            count = min(step, numel - start)
            view = memoryview(buf)[: count * DTYPE_BYTES[info.dtype]]
            fh.seek(info.offset + start * DTYPE_BYTES[info.dtype])
            got = 0
            while got < len(view):
                n = fh.readinto(view[got:])
                if not n:
                    raise UpcycleError(f"{info.file} ended early while reading {info.name}; the file is truncated")
                got += n
            yield _as_bytes(torch.frombuffer(view, dtype=src_dtype).to(dst_dtype))


# --- config, tokenizer, recipe ---------------------------------------------------------------------------


def write_config(plan: Plan, folder: Path) -> None:
    from transformers import AutoConfig

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


def _command(src: str, out: Path, spec: ConvertSpec) -> str:
    parts = ["upcycle", "convert", src, str(out)]
    defaults = ConvertSpec()
    for key, value in spec.to_dict().items():
        if value != getattr(defaults, key) and value is not None:
            if key == "layers":
                value = ",".join(map(str, value))
            parts.append(f"--{key.replace('_', '-')} {value}")
    return " ".join(parts)


def make_recipe(
    source: SourceRef,
    ckpt: Checkpoint,
    plan: Plan,
    spec: ConvertSpec,
    hashes: dict[str, str],
    command: str,
) -> dict[str, Any]:
    return {
        "tool": {"name": "upcycle", "version": _version()},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command,
        "source": {
            "id": source.id,
            "kind": source.kind,
            "revision": source.revision,
            "gguf_sha256": file_sha256(source.gguf_file) if source.gguf_file else None,
            "license": source.license or source_license(source.folder),
            "config_sha256": file_sha256(ckpt.folder / "config.json"),
            "files_sha256": hashes,
        },
        "recipe": spec.to_dict(),
        "plan": plan.summary(),
        "dtype": plan.config["dtype"],
        "config": plan.config,
    }

"""`upcycle convert`: run a plan tensor by tensor and write a complete, natively loadable MoE folder."""

from __future__ import annotations

import math
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..collector import quiet_start_up
from ..errors import UpcycleError
from ..generic import MODEL_TYPE as GENERIC_MODEL_TYPE
from ..generic import register as register_generic
from ..generic import write_code as write_generic_code
from ..heap import hold_mmap_threshold
from ..options import command_line
from ..outdir import check_target, staged_folder
from ..publish.card import hub_card_license, source_license, write_card_and_recipe
from ..source import (
    EMBEDDED,
    Checkpoint,
    SourceRef,
    TensorInfo,
    file_sha256,
    looks_like_repo_id,
    public_name,
    read_config,
    resolve,
)
from .execute import CastMeter, LayerFFNs, Reuse, RouterInit, Sources, cast_chunks, in_place, produce
from .ops import CastCheck, Copy, Expert, Plan
from .plan import check_causal_lm
from .planner import make_plan
from .sources import check_compatible, check_vocabulary, differences
from .spec import ConvertSpec
from .views import with_views
from .writer import Entry, ShardedWriter

if TYPE_CHECKING:
    from transformers import PretrainedConfig

# True: the calibration pass runs beside the writer (beside.py); False: the whole pass before it. Off: on the
# 2-core machine it was no faster (the pass already keeps both cores busy) and peaked 0.1 GiB higher
# (benchmarks/README.md, "The pass beside the writer"); same bytes either way
CALIBRATE_BESIDE = False

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

    views = with_views(family_for(cfg.get("model_type")), cfg, ckpt.tensors)
    return ckpt.with_virtual({k: v for k, v in views.items() if k not in ckpt.tensors})


def plan_for(
    source: SourceRef,
    spec: ConvertSpec,
    *,
    measure: bool = True,
    others: tuple[Dense, ...] = (),
    names: tuple[str, ...] = (),
) -> tuple[Dense, Plan]:
    """The plan for SOURCE; with `measure`, lossy dtype casts are measured on the weights (a read-only pass).
    `others`: the --expert-from models (`names`: theirs, public), whose differences from SOURCE in the non-expert
    tensors and whose own casts into the written dtype are measured; a GGUF file not dequantized yet (a dry run)
    is named as not measured instead."""
    dense = read_dense(source)
    plan = dense.plan(spec)
    if measure and plan.lossy_casts() and dense.checkpoint is not None:
        plan = dense.plan(spec, measure_casts(dense.checkpoint.tensors, plan))
    if not others:
        return dense, plan
    from .sources import source_casts, unread_why

    models = (dense.checkpoint, *(d.checkpoint for d in others))
    names = names or tuple(f"--expert-from #{i}" for i in range(1, len(others) + 1))
    if all(m is not None for m in models):
        plan = replace(plan, differences=differences(plan, models))
    else:
        unread = (
            unread_why(source.id, base=True)
            if dense.checkpoint is None
            else next(unread_why(n) for n, d in zip(names, others, strict=True) if d.checkpoint is None)
        )
        plan = replace(plan, unmeasured=unread)
    readable = [(n, d.checkpoint.tensors if d.checkpoint else d.tensors, d.checkpoint is not None)
                for n, d in zip(names, others, strict=True)]  # fmt: skip
    return dense, replace(plan, source_casts=source_casts(plan, readable))


@dataclass(frozen=True)
class ExpertSource:
    """One --expert-from model: as given, resolved, and read."""

    given: str
    ref: SourceRef
    dense: Dense


def expert_sources(
    src: str, source: SourceRef, spec: ConvertSpec, out: Path | None, materialize: bool
) -> tuple[ExpertSource, ...]:
    """The --expert-from models, each checked to be a fine-tune of SRC (family, shapes, tensors, vocabulary)."""
    if not spec.expert_from:
        return ()
    base = read_dense(source)
    found = []
    for given in spec.expert_from:
        if out is not None:
            check_not_source(given, out)
        ref = source if given == src else resolve(given, None, materialize=materialize)
        dense = base if given == src else read_dense(ref)
        check_compatible(src, base.config, base.tensors, given, dense.config, dense.tensors)
        check_vocabulary(src, source.folder, given, ref.folder)
        found.append(ExpertSource(given, ref, dense))
    return tuple(found)


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
    mergekit_config: Path | None = None,
) -> ConvertResult:
    """Convert the dense model SRC into an MoE at OUT. `progress(done_bytes, total_bytes)` is called as it goes.

    `base_model` names the Hub model a local source was made from, for the card's metadata. `mergekit_config`:
    the mergekit-moe YAML SPEC was read from; OUT keeps a copy and the recorded command converts from it.
    """
    with quiet_start_up() as started:  # Python's collector off until the plan is made, then off its objects
        out = Path(out)
        hold_mmap_threshold()  # large buffers back to the system when freed: the calibration pass's peak (heap.py)
        max_shard = shard_size(spec.max_shard_size)
        if base_model is not None and not looks_like_repo_id(base_model):
            raise UpcycleError(f"--base-model {base_model!r} is not a Hub id; give it as org/name")
        check_not_source(src, out)
        if not dry_run:
            check_target(out, force)  # fail before any download or heavy work
            if push_to_hub:
                from ..publish.hub import require_token

                require_token()
        shared = spec.shared_from
        if shared not in (None, "base", *spec.expert_from) and public_name(shared) == public_name(src):
            spec = replace(spec, shared_from="base")  # --shared-from SRC: BASE's FFN
        spec.shared_source  # noqa: B018 - refuses a --shared-from that is neither SRC nor an --expert-from model
        source = resolve(src, spec.revision, materialize=not dry_run)
        extra = expert_sources(src, source, spec, None if dry_run else out, materialize=not dry_run)
        others = tuple(e.dense for e in extra)
        names = tuple(public_name(e.given) for e in extra)
        dense, plan = plan_for(source, spec, measure=dry_run, others=others, names=names)
        started()  # what start-up made stays out of the collections of the calibration pass and the writing
        if dry_run:
            return ConvertResult(out=None, plan=plan, source=source, recipe=None)
        ckpt = dense.checkpoint
        check_room(source, out, plan)
        routers, partitions, calibration, beside = None, None, {}, None
        if spec.router_init == "cheap_embed":  # reads the embedding only: no forward pass
            from .cheap_embed import cheap_embed_rows

            routers, calibration = cheap_embed_rows(source.folder, ckpt, plan, spec)
        elif spec.calibration or spec.router_init == "hidden":  # a read-only pass over the dense model
            from .calibrate import calibrate, prepare

            if CALIBRATE_BESIDE:  # inputs checked now; the pass runs beside the writer, layer l ready by its router
                from .beside import Beside

                work = prepare(source.folder, ckpt, plan, spec)
                beside = Beside(work)
                routers, partitions, calibration = beside.routers, beside.partitions, work.records
            else:  # the whole pass first
                routers, partitions, calibration = calibrate(source.folder, ckpt, plan, spec)
        hashes = BackgroundHashes(ckpt.files)  # overlaps the copying; stopped at once if the conversion fails
        try:
            with staged_folder(out, force) as tmp:
                measured = write_weights(
                    ckpt, plan, spec, tmp, max_shard, progress, routers, partitions, tuple(d.checkpoint for d in others)
                )
                if beside is not None:
                    beside.finish()  # every layer served; an error of the pass after its last layer fails here
                if plan.lossy_casts():
                    kept = {"differences": plan.differences, "source_casts": plan.source_casts}
                    plan = replace(dense.plan(spec, measured), **kept, unmeasured=plan.unmeasured)
                write_config(plan, tmp)
                copy_side_files(source.folder, tmp, plan)
                label = src if src in EMBEDDED else source.id  # how the command names the source: never a path
                if mergekit_config is not None:
                    from .mergekit import RECORDED, recorded_config

                    (tmp / RECORDED).write_text(recorded_config(mergekit_config), encoding="utf-8")
                    command = _mergekit_command(mergekit_config, out, spec, source, base_model)
                else:
                    command = _command(label, out, spec, source, base_model)
                recipe = make_recipe(source, ckpt, plan, spec, hashes.result(), command, base_model)
                recipe |= calibration  # which text (by name) and how many tokens made routers or partitions
                if extra:
                    recipe |= sources_record(extra, plan, spec)
                if mergekit_config is not None:
                    recipe["mergekit_config"] = RECORDED  # the YAML beside the weights, which the command names
                write_card_and_recipe(tmp, recipe | {"name": out.name})
        finally:
            hashes.cancel()
            if beside is not None:
                beside.cancel()
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
    from ..compat import file_size

    try:
        size = file_size(text)
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
    others: tuple[Checkpoint, ...] = (),
) -> dict[tuple[str, str], CastCheck]:
    """Write every tensor of the plan as `execute.produce` makes it; returns what the lossy casts did to the values
    they cast.

    `routers` (layer -> [E, H] float32) holds router rows computed beforehand (--router-init kmeans/hidden),
    `partitions` (layer -> (by, parts) -> neuron groups) the --split-by coactivation groups (either may be a
    beside.LayerView: each layer looked up once the pass running beside the writer has reached it), `others` the
    --expert-from models (source i is others[i - 1]).
    """
    entries = [Entry(op.name, op.dtype, op.shape, op.nbytes) for op in plan.ops]
    writer = ShardedWriter(folder, entries, max_shard, {"format": "pt"})
    layers = LayerFFNs(ckpt, plan, spec.seed, partitions, others)  # layer by layer: one layer's FFN per source
    folders = tuple(c.folder for c in (ckpt, *others))
    sources = Sources(ckpt, layers, RouterInit.of(spec, routers), CastMeter(), Reuse(writer, folders))
    total, done = plan.total_bytes, 0
    try:
        layers.start()  # the first computed expert tensors, made while the embeddings and first layers are written
        for op in plan.ops:
            place = in_place(op, sources)
            if place is None:
                writer.put(op.name, produce(op, sources))
            else:  # one byte range: the kernel copies it
                placed = writer.put_range(op.name, place.path, place.offset, place.nbytes)
                if isinstance(op, Expert):
                    sources.reuse.remember(op, placed)
            done += op.nbytes
            if progress:
                progress(done, total)
        writer.finish(plan.total_params)
    finally:
        writer.abort()
    return sources.meter.result()


def measure_casts(tensors: dict[str, TensorInfo], plan: Plan) -> dict[tuple[str, str], CastCheck]:
    """Measure the plan's lossy casts on the source weights, reading each cast tensor once, writing nothing."""
    lossy = set(plan.lossy_casts())
    meter = CastMeter(lossy)
    done: set[str] = set()
    for op in plan.ops:
        if not isinstance(op, Copy | Expert) or op.src in done or (tensors[op.src].dtype, op.dtype) not in lossy:
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
    options = spec.to_dict()
    froms = [word for name in options.pop("expert_from") for word in ("--expert-from", name)]  # a repeated flag
    if source.kind == "hub" and source.revision:
        options["revision"] = source.revision  # pin the commit that was converted
    options["base_model"] = base_model
    return command_line(["upcycle", "convert", label, out.name, *froms], options, ConvertSpec().to_dict())


def _mergekit_command(config: Path, out: Path, spec: ConvertSpec, source: SourceRef, base_model: str | None) -> str:
    """`upcycle convert --mergekit-config mergekit_moe_config.yml OUT` (the copy in OUT), then the flags given
    beside it: those whose value differs from what the YAML maps to."""
    from .mergekit import RECORDED, mapped_options

    options, mapped = spec.to_dict(), mapped_options(config)
    sources = options.pop("expert_from")
    froms = [] if sources == mapped.pop("expert_from") else [w for name in sources for w in ("--expert-from", name)]
    if source.kind == "hub" and source.revision:
        options["revision"] = source.revision  # pin the commit that was converted
    options["base_model"] = base_model
    return command_line(["upcycle", "convert", "--mergekit-config", RECORDED, out.name, *froms], options, mapped)


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


def sources_record(extra: tuple[ExpertSource, ...], plan: Plan, spec: ConvertSpec) -> dict[str, Any]:
    """upcycle.json's `sources`: each --expert-from model (Hub id and revision, or folder name: never a path),
    which experts it gave, and their prompts; `base_model` for the card lists them all."""
    per = spec.experts // len(extra)
    prompts = None
    if spec.expert_prompts:
        from .prompts import prompts_by_source

        prompts = prompts_by_source(Path(spec.expert_prompts), len(extra))
    rows = []
    for i, e in enumerate(extra):
        hub = e.ref.kind in ("hub", "gguf") and looks_like_repo_id(e.ref.id)
        row = {"id": e.ref.id, "kind": e.ref.kind, "revision": e.ref.revision, "hub": hub,
               "experts": list(range(i * per, (i + 1) * per))}  # fmt: skip
        if prompts is not None:
            row["prompts"] = prompts[i]
        rows.append(row)
    return {"sources": rows, "shared_weights": spec.shared_weights}

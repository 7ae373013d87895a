"""Several source models (`--expert-from`): checking that they are fine-tunes of BASE, and measuring how their
non-expert tensors differ (what `--shared-weights average` changes).

A source is anything `upcycle convert` reads (folder, Hub id, GGUF); it must have BASE's family, config shapes,
tensor names and shapes, and vocabulary, or the experts would not fit BASE's attention and embeddings. Each
check refuses in one line naming both models.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UpcycleError
from .ops import Cast, Copy, Expert, Mean, Plan, SourceCasts, TensorDiff

if TYPE_CHECKING:
    from ..source import Checkpoint, TensorInfo

SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size")  # fmt: skip
VOCAB_FILES = ("tokenizer.model", "vocab.json", "merges.txt", "vocab.txt")


def check_compatible(
    base: str, base_cfg: dict[str, Any], base_tensors: dict[str, TensorInfo],
    other: str, cfg: dict[str, Any], tensors: dict[str, TensorInfo],
) -> None:  # fmt: skip
    """Refuse OTHER (an --expert-from source) unless it has BASE's family, shapes and tensors."""
    rule = "every --expert-from model must be a fine-tune of BASE"
    if cfg.get("model_type") != base_cfg.get("model_type"):
        raise UpcycleError(
            f"--expert-from {other} is a {cfg.get('model_type')} model, but BASE {base} is a "
            f"{base_cfg.get('model_type')} model; {rule}"
        )
    for key in SHAPE_FIELDS:
        if cfg.get(key) != base_cfg.get(key):
            raise UpcycleError(
                f"--expert-from {other} has {key}={cfg.get(key)}, but BASE {base} has {key}={base_cfg.get(key)}; {rule}"
            )
    names = sorted(set(tensors) ^ set(base_tensors))
    if names:
        where = "BASE " + base if names[0] in base_tensors else other
        raise UpcycleError(
            f"--expert-from {other} and BASE {base} hold different tensors ({names[0]} is only in {where}); {rule}"
        )
    for name, info in base_tensors.items():
        if tensors[name].shape != info.shape:
            raise UpcycleError(
                f"--expert-from {other} has {name} of shape {list(tensors[name].shape)}, but BASE {base} has "
                f"{list(info.shape)}; {rule}"
            )


def vocabulary(folder: Path | None) -> str | None:
    """A fingerprint of the tokenizer's vocabulary (tokens, merges, added tokens), or None without a tokenizer.

    Chat templates and other tokenizer_config settings a fine-tune may change are left out: they do not change
    which id a token has, which is what the embeddings and the experts depend on."""
    if folder is None:
        return None
    digest = hashlib.sha256()
    found = False
    tok = folder / "tokenizer.json"
    if tok.is_file():
        data = json.loads(tok.read_text(encoding="utf-8"))
        kept = {"model": data.get("model"), "added_tokens": data.get("added_tokens")}
        digest.update(json.dumps(kept, sort_keys=True).encode())
        found = True
    for name in VOCAB_FILES:
        if (folder / name).is_file():
            digest.update(name.encode() + (folder / name).read_bytes())
            found = True
    return digest.hexdigest() if found else None


def check_vocabulary(base: str, base_folder: Path | None, other: str, folder: Path | None) -> None:
    a, b = vocabulary(base_folder), vocabulary(folder)
    if a is not None and b is not None and a != b:
        raise UpcycleError(
            f"--expert-from {other} has a different tokenizer vocabulary from BASE {base}; the experts would read "
            "other token ids than BASE's embeddings give: every --expert-from model must use BASE's tokenizer"
        )


def unread_why(name: str, base: bool = False) -> str:
    """Why a dry run cannot read a GGUF source's weights (said instead of guessing what they hold)."""
    who = f"BASE {name}" if base else name
    return (f"{who} is a GGUF file, which a dry run does not dequantize (the conversion loads it whole into "
            "float32), so its weights were not read")  # fmt: skip


def source_casts(plan: Plan, models: Sequence[tuple[str, dict[str, TensorInfo], bool]]) -> tuple[SourceCasts, ...]:
    """Each --expert-from model's casts of its FFN tensors into the written dtype, measured on its weights (each
    lossily cast tensor read once). `models`: (public name, its tensors, readable), in --expert-from order; an
    unreadable one (a GGUF file in a dry run) gets its casts from its metadata and says why they are unmeasured."""
    from ..dtypes import LOSSLESS
    from .execute import CastMeter, cast_chunks

    experts = [op for op in plan.flat_ops() if isinstance(op, Expert)]
    found = []
    for i, (name, tensors, readable) in enumerate(models, start=1):
        mine = [op for op in experts if op.source == i and op.src in tensors]
        stored = tuple(sorted({tensors[op.src].dtype for op in mine}))
        pairs = sorted({(tensors[op.src].dtype, op.dtype) for op in mine} - {(d, d) for d in stored})
        lossy = [pair for pair in pairs if pair not in LOSSLESS]
        meter = CastMeter(lossy)
        if readable:
            done: set[str] = set()
            for op in mine:
                if (tensors[op.src].dtype, op.dtype) in lossy and op.src not in done:
                    done.add(op.src)
                    for _ in cast_chunks(tensors[op.src], op.dtype, meter):
                        pass
        checks = meter.result() if readable else {}
        casts = tuple(Cast(a, b, (a, b) in LOSSLESS, checks.get((a, b))) for a, b in pairs)
        found.append(SourceCasts(name, stored, casts, "" if readable else unread_why(name)))
    return tuple(found)


def distinct(folders: Sequence[Path | None]) -> tuple[int, ...]:
    """Indices of the sources (1..S) whose folder is not BASE's (index 0) or an earlier source's."""
    seen = {folders[0]}
    keep = []
    for i, folder in enumerate(folders[1:], start=1):
        if folder not in seen:
            keep.append(i)
            seen.add(folder)
    return tuple(keep)


def differences(plan: Plan, models: Sequence[Checkpoint]) -> tuple[TensorDiff, ...]:
    """Every non-expert tensor the sources hold differently from BASE (models[0]), with how much, and how far
    the float32 mean of the --expert-from models (models[1:]) moves BASE's. One piece of each tensor at a time."""
    import torch

    from .execute import read_chunks

    found = []
    folders = [m.folder for m in models]
    others = distinct(folders)
    for op in plan.ops:
        if not isinstance(op, Copy | Mean) or not others:
            continue
        infos = [m.tensors[op.src] for m in models]
        if all(same_bytes(infos[0], infos[i]) for i in others):
            continue
        differing: set[int] = set()
        max_abs, moved, norm = 0.0, 0.0, 0.0
        for pieces in zip(*(read_chunks(info, 4) for info in infos), strict=True):
            base = pieces[0].double()
            total = torch.zeros_like(base)
            for i, x in enumerate(pieces[1:], start=1):
                x = x.double()
                total += x
                if i in others:
                    gap = float((x - base).abs().max()) if x.numel() else 0.0
                    if gap > 0:
                        differing.add(i)
                    max_abs = max(max_abs, gap)
            moved += float(((total / (len(pieces) - 1) - base) ** 2).sum())
            norm += float((base**2).sum())
        if differing:
            relative = (moved**0.5) / (norm**0.5) if norm > 0 else float("inf")
            found.append(TensorDiff(op.name, tuple(sorted(differing)), max_abs, relative))
    return tuple(found)


def same_bytes(a: TensorInfo, b: TensorInfo) -> bool:
    """Are two source tensors the same bytes (the same file range, or equal content)?"""
    from ..source import tensor_pieces

    if a.dtype != b.dtype or a.nbytes != b.nbytes:
        return False
    if (a.file, a.offset) == (b.file, b.offset):
        return True
    step = 16 << 20
    return all(x == y for x, y in zip(tensor_pieces(a, step), tensor_pieces(b, step), strict=True))

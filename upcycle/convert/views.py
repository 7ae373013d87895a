"""Source tensors the plan sees that the checkpoint does not store as such: views and element-wise changes.

* Views. Phi-3 stores q|k|v in one `qkv_proj` and gate|up in one `gate_up_proj`. A block of rows of a
  row-major tensor is one contiguous byte range, so each block becomes a virtual TensorInfo (same file,
  shifted offset, fewer rows). The plan then sees q_proj/k_proj/v_proj and gate_proj/up_proj like any
  Llama-shaped model, and copying a view is still a kernel copy of a byte range.
* Untied keys. A family whose embeddings are rescaled in the MoE (Gemma) writes the tied head apart: an
  alias of the embedding's bytes under the head's key.
* Value transforms. Gemma's RMSNorm multiplies by 1+w and its embedding by √hidden; the native targets
  multiply by w and do not scale, so those tensors are written as 1+w and √hidden·E.

Everything here is pure arithmetic on TensorInfos and the config, from the family table (the checkpoint reads
views and aliases through their byte ranges: source.Checkpoint.with_virtual).
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from typing import Any

from ..arch import Family
from ..dtypes import DTYPE_BYTES
from ..errors import UpcycleError
from ..source import TensorInfo
from .ops import ValueChange


def config_int(cfg: dict[str, Any], name: str) -> int:
    """An integer config field; `head_dim` falls back to hidden/heads, as the attention classes do."""
    value = cfg.get(name)
    if value is None and name == "head_dim":
        return int(cfg["hidden_size"]) // int(cfg["num_attention_heads"])
    if value is None:
        raise UpcycleError(f"config.json has no {name}, which the {cfg.get('model_type')} layout needs")
    return int(value)


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{layer\}", r"(?P<layer>\d+)") + "$")


def _match(template: str, name: str) -> str | None:
    """The layer index text if NAME is TEMPLATE for some layer ('' for a template without {layer})."""
    m = _pattern(template).match(name)
    if m is None:
        return None
    return m.groupdict().get("layer") or ""


def view_parts(family: Family, cfg: dict[str, Any], info: TensorInfo) -> list[TensorInfo] | None:
    """The row blocks of a fused tensor as virtual TensorInfos, or None when INFO is not a fused tensor."""
    for fused, parts in family.views.items():
        layer = _match(fused, info.name)
        if layer is None:
            continue
        rows = [math.prod(config_int(cfg, f) for f in fields) for _, fields in parts]
        if not info.shape or sum(rows) != info.shape[0]:
            blocks = " + ".join(str(r) for r in rows)
            raise UpcycleError(
                f"{info.name} has shape {list(info.shape)}, but the config implies {blocks} = {sum(rows)} rows; "
                "config.json and the weights disagree"
            )
        row_bytes = math.prod(info.shape[1:]) * DTYPE_BYTES[info.dtype]
        out, start = [], 0
        for (template, _), n in zip(parts, rows, strict=True):
            name = template.format(layer=layer)
            shape = (n, *info.shape[1:])
            offset = info.offset + start * row_bytes
            out.append(replace(info, name=name, shape=shape, offset=offset, nbytes=n * row_bytes))
            start += n
        return out
    return None


def untied(family: Family, cfg: dict[str, Any], tensors: dict[str, TensorInfo]) -> dict[str, TensorInfo]:
    """Tied keys the checkpoint leaves out but the MoE must hold apart: aliases of the bytes they share."""
    if not family.untie or not cfg.get("tie_word_embeddings"):
        return {}
    return {
        key: replace(tensors[shared], name=key)
        for key, shared in family.untie.items()
        if key not in tensors and shared in tensors
    }


def with_views(family: Family, cfg: dict[str, Any], tensors: dict[str, TensorInfo]) -> dict[str, TensorInfo]:
    """TENSORS with every fused tensor replaced by its views, plus the untied aliases (order kept)."""
    out: dict[str, TensorInfo] = {}
    for info in tensors.values():
        parts = view_parts(family, cfg, info)
        for part in parts or [info]:
            out[part.name] = part
    return out | untied(family, cfg, tensors)


def value_transform(family: Family, cfg: dict[str, Any], name: str) -> ValueChange | None:
    """How the family changes a copied source tensor element-wise, else None.

    "add" c: y = x + c; "mul" c: y = c·x, c = √(config field) rounded to float32 as the dense class stores it.
    The arithmetic dtype is "float32" (then cast to the written dtype) or "weight" (the written dtype).
    """
    for rule in family.transforms:
        if any(_match(t, name) is not None for t in rule["keys"]):
            if "add" in rule:
                return ValueChange("add", float(rule["add"]), rule.get("in", "float32"))
            if "multiply_sqrt" in rule:
                root = _float32(math.sqrt(config_int(cfg, rule["multiply_sqrt"])))
                return ValueChange("mul", root, rule.get("in", "weight"))
            raise ValueError(f"families/{family.name}.json: transform {rule} has neither add nor multiply_sqrt")
    return None


def _float32(x: float) -> float:
    import struct

    return struct.unpack("f", struct.pack("f", x))[0]


def apply_values(x, values: ValueChange, dtype):
    """X (a source chunk) transformed as VALUES says and returned in the written torch DTYPE."""
    import torch

    work = torch.float32 if values.arithmetic == "float32" else dtype
    x = x.to(work)
    const = torch.tensor(values.constant, dtype=torch.float32).to(work)
    y = x + const if values.how == "add" else x * const
    return y.to(dtype)


def transform_exact(values: ValueChange, dtype: str) -> bool:
    """Does writing the transformed tensor in DTYPE keep what the dense model computes?

    Arithmetic in the written dtype mirrors the dense model (Gemma scales its embedding in the weight's dtype).
    Float32 arithmetic (Gemma's 1+w) is kept only when the written dtype holds float32 values."""
    return values.arithmetic != "float32" or dtype in ("F32", "F64")


def family_notes(family: Family, cfg: dict[str, Any], kept: dict[str, TensorInfo], untie: dict[str, TensorInfo]):
    """What the user should know about the family's transforms: the untied head's cost, the changed values."""
    notes = []
    for key, info in untie.items():
        shared = family.untie[key]
        notes.append(
            f"{key} untied from {shared} (the embeddings are rescaled in the MoE): +{math.prod(info.shape):,} "
            f"parameters ({' × '.join(map(str, info.shape))})"
        )
    for rule in family.transforms:
        hits = [n for n in kept if any(_match(t, n) is not None for t in rule["keys"])]
        if hits:
            notes.append(f"{len(hits)} tensor(s) rewritten: {rule['why']}")
    return tuple(notes)

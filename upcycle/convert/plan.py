"""The planning steps every plan shares, native or generic: which layers become MoE, which source tensors are
accounted for, what dtype is written and what its casts cost, how the dense model's attention is laid out, and
whether a native MoE class can hold the model at all.

Pure: from the family and target tables, the dense config (as a dict) and the source tensor index. No tensor is
read here, so a plan for a 70B model costs nothing and `--dry-run` shows exactly what a conversion would write.
The graph runs one way: planner -> {native_plan, generic_plan} -> plan -> {ops, views} -> dtypes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping
from typing import Any

from ..arch import Family, targets
from ..convert import methods as expert_methods
from ..dtypes import FLOAT_DTYPES, LOSSLESS, TORCH_TO_ST
from ..errors import UpcycleError
from ..source import TensorInfo
from .methods.base import power_of_two
from .ops import Cast, CastCheck, Copy, Expert, TensorOp
from .spec import ConvertSpec


def check_causal_lm(config: dict[str, Any]) -> None:
    archs = config.get("architectures") or []
    if archs and not any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in archs):  # GPT2LMHeadModel
        raise UpcycleError(
            f"the model is a {archs[0]}, not a causal language model (…ForCausalLM); upcycle converts "
            "decoder-only causal LMs"
        )


def moe_layer_indices(num_layers: int, spec: ConvertSpec) -> tuple[int, ...]:
    if spec.layers is not None:
        bad = [i for i in spec.layers if not 0 <= i < num_layers]
        if bad:
            raise UpcycleError(
                f"--layers {','.join(map(str, bad))}: out of range, the model has layers 0..{num_layers - 1}"
            )
        return tuple(spec.layers)
    chosen = tuple(i for i in range(num_layers) if (i + 1) % spec.every == 0)
    if not chosen:
        raise UpcycleError(f"--every {spec.every} selects no layer of a {num_layers}-layer model; use a smaller value")
    return chosen


def read_attention(family: Family, cfg: dict[str, Any]) -> tuple[list[str], int | None]:
    n = cfg["num_hidden_layers"]
    if family.attention == "full":
        return ["full_attention"] * n, None
    window = cfg.get("sliding_window") or None
    if family.attention == "global_window":
        return [("sliding_attention" if window else "full_attention")] * n, window
    if family.attention == "layer_types":
        types = list(cfg.get("layer_types") or ["full_attention"] * n)
        if window is None:  # sliding layers without a window attend to everything
            types = ["full_attention"] * n
        return types, window
    raise ValueError(f"unknown attention layout {family.attention!r}")


def native_refusal(family: Family, cfg: dict[str, Any]) -> str | None:
    """Why no native MoE class holds this dense model exactly (None: one does)."""
    if not family.targets:
        return f"transformers has no MoE class that holds a {family.name} model exactly"
    for key, wanted in family.require.items():
        if config_value(cfg, key, wanted) != wanted:
            return (
                f"this {family.name} model has {key}={config_value(cfg, key)!r}, which no native MoE class holds "
                f"(they need {key}={wanted!r})"
            )
    types, _ = read_attention(family, cfg)
    if len(set(types)) > 1 and all(targets()[name].attention != "layer_types" for name in family.targets):
        return (
            f"this {family.name} model mixes sliding-window and full-attention layers, which no native MoE class "
            f"({', '.join(sorted(family.targets))}) holds"
        )
    return None


# --- streaming order -----------------------------------------------------------------------------------------


def layer_of(name: str) -> int | None:
    m = re.search(r"\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def order(name: str) -> tuple[int, int, str]:
    """Streaming order of a tensor key: embeddings, then layer by layer, then the final norm and head."""
    layer = layer_of(name)
    if layer is not None:
        return (1, layer, name)
    return (0 if "embed" in name else 2, 0, name)


# --- dtypes --------------------------------------------------------------------------------------------------


def written_dtype(spec: ConvertSpec) -> Callable[[str], str]:
    """source dtype -> the dtype written: `--dtype` for floating tensors, the source's own otherwise."""

    def out_dtype(src_dtype: str) -> str:
        if spec.dtype == "auto" or src_dtype not in FLOAT_DTYPES:
            return src_dtype
        return TORCH_TO_ST[spec.dtype]

    return out_dtype


def plan_casts(
    ops: Collection[TensorOp], source: Mapping[str, TensorInfo], measured: Mapping[tuple[str, str], CastCheck] | None
) -> tuple[Cast, ...]:
    """Every (source dtype, written dtype) pair the ops cast, with what `measured` knows of its cost."""
    sourced = [op for op in ops if isinstance(op, Copy | Expert)]  # fused parts aside: their fused op is not cast
    pairs = sorted({(source[op.src].dtype, op.dtype) for op in sourced if source[op.src].dtype != op.dtype})
    return tuple(Cast(a, b, (a, b) in LOSSLESS, (measured or {}).get((a, b))) for a, b in pairs)


def config_value(cfg: dict[str, Any], key: str, default: Any = None) -> Any:
    """A config field; a dotted key reads inside a dict field (rope_parameters.partial_rotary_factor)."""
    value: Any = cfg
    for part in key.split("."):
        if not isinstance(value, dict) or value.get(part) is None:
            return default
        value = value[part]
    return value


def scaling_rounds(layout: expert_methods.Layout, dtype: str) -> tuple[bool, str]:
    """Scaling down_proj by a power of two rounds nothing; by another factor it rounds once per value, which
    float32 absorbs (below 1e-7 relative) but a 16-bit dtype does not. -> (exact kept, explanation)."""
    odd = sorted(x for x in layout.scales() if not power_of_two(x))
    if not odd or dtype in ("F32", "F64"):
        return True, layout.why
    factors = ", ".join(f"{x:g}" for x in odd)
    return False, f"{layout.why}; but scaling down_proj by {factors} rounds {dtype} values, so only approximately"


def and_more(names: list[str]) -> str:
    return names[0] + (f" (and {len(names) - 1} more)" if len(names) > 1 else "")


def account_for(
    family: Family,
    tensors: dict[str, TensorInfo],
    num_layers: int,
    expected: Collection[str] | None,
    optional: Collection[str],
) -> tuple[dict[str, TensorInfo], tuple[str, ...]]:
    """The tensors the plan writes, after checking that every source tensor is one the model really uses.

    A tensor nobody accounts for would be copied into the MoE and then silently ignored by transformers
    (or, past the last layer, silently dropped), so it is an error. Only the family's known harmless extras
    (old checkpoints' rotary `inv_freq` buffers) are left out, with a note.
    """
    ignore = [re.compile(re.escape(p).replace(r"\{layer\}", r"\d+") + "$") for p in family.ignore]
    ignored = sorted((n for n in tensors if any(p.match(n) for p in ignore)), key=order)
    kept = {name: info for name, info in tensors.items() if name not in set(ignored)}
    beyond = sorted((n for n in kept if (layer_of(n) or 0) >= num_layers), key=order)
    if beyond:
        last = max(layer_of(n) for n in beyond)
        raise UpcycleError(
            f"the weights hold {and_more(beyond)} of layers up to {last}, but config.json says "
            f"num_hidden_layers={num_layers}: config.json and the weights disagree; fix num_hidden_layers "
            "or use the config that came with these weights"
        )
    if expected is not None:
        unknown = sorted(set(kept) - set(expected), key=order)
        if unknown:
            raise UpcycleError(
                f"the weights hold {and_more(unknown)}, which a {family.name} model with this config.json does "
                "not have: config.json and the weights disagree (or the checkpoint is not a plain "
                f"{family.name} model); upcycle will not drop weights silently"
            )
        missing = sorted(set(expected) - set(kept) - set(optional), key=order)
        if missing:
            raise UpcycleError(
                f"the checkpoint has no tensor {and_more(missing)}, which this config.json requires: "
                "config.json and the weights disagree, or the checkpoint is incomplete"
            )
    notes = ()
    if ignored:
        notes = (f"left out {and_more(ignored)}: a buffer transformers recomputes and does not load",)
    return kept, notes

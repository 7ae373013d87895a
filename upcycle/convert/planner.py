"""`make_plan`: the one entry point of planning, which hands a dense model to the native or the generic planner.

Pure: from the dense config (as a dict) and the source tensor index; no tensor is read, so `--dry-run` is free.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from ..arch import GENERIC, Family, family_for
from ..source import TensorInfo
from .generic_plan import make_generic_plan
from .native_plan import make_native_plan
from .ops import CastCheck, Plan
from .plan import check_causal_lm, native_refusal
from .spec import ConvertSpec


def wants_generic(family: Family, cfg: dict[str, Any], spec: ConvertSpec) -> bool:
    """--target generic, or --target auto for a model that no native target holds exactly (never silently: the plan
    says why in a note)."""
    if spec.target == GENERIC:
        return True
    return spec.target == "auto" and bool(family.mlp) and native_refusal(family, cfg) is not None


def make_plan(
    cfg: dict[str, Any],
    tensors: dict[str, TensorInfo],
    spec: ConvertSpec,
    *,
    expected: Collection[str] | None = None,
    optional: Collection[str] = (),
    measured: Mapping[tuple[str, str], CastCheck] | None = None,
) -> Plan:
    """Decide the target config and every tensor written. `cfg` is the dense config with defaults filled.

    `expected` is every key the dense class holds for this config (None: not checked), `optional` the keys
    among them that may be absent (tied weights). `measured` holds what each lossy dtype cast costs, as
    measured on the weights; without it a lossy cast is not claimed exact.
    """
    family = family_for(cfg.get("model_type"))
    check_causal_lm(cfg)
    make = make_generic_plan if wants_generic(family, cfg, spec) else make_native_plan  # generic: upcycle's wrapper
    return make(family, cfg, tensors, spec, expected=expected, optional=optional, measured=measured)

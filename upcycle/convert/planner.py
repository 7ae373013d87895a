"""`make_plan`: the one entry point of planning, which hands a dense model to the native or the generic planner.

Pure: from the dense config (as a dict) and the source tensor index; no tensor is read, so `--dry-run` is free.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import replace
from typing import Any

from ..arch import GENERIC, Family, family_for
from ..errors import NoForm
from ..source import TensorInfo, public_name
from .generic_plan import make_generic_plan
from .native_plan import make_native_plan
from .ops import CastCheck, Copy, Mean, Plan
from .plan import check_causal_lm, moe_layer_indices, native_refusal
from .serving import serve, verdict
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
    kw: dict[str, Any] = dict(expected=expected, optional=optional, measured=measured)
    if spec.target != "auto" or wants_generic(family, cfg, spec):
        make = make_generic_plan if wants_generic(family, cfg, spec) else make_native_plan  # generic: upcycle's wrapper
        plan = serve(make(family, cfg, tensors, spec, **kw), spec.serve, cfg)
        return with_sources(plan, spec)
    first: NoForm | None = None
    engine: NoForm | None = None  # the first target that holds the request but that a --serve engine cannot load
    for name in auto_candidates(family, cfg, spec):
        try:
            if name == GENERIC:
                plan = make_generic_plan(family, cfg, tensors, replace(spec, target=GENERIC), **kw)
            else:
                plan = make_native_plan(family, cfg, tensors, replace(spec, target=name), **kw)
        except NoForm as exc:
            first = first or exc
            continue
        try:
            plan = serve(plan, spec.serve, cfg)
        except NoForm as exc:
            first, engine = first or exc, engine or exc
            continue
        if first is not None:  # never silently: the plan says why the first choice was not taken
            plan = replace(plan, notes=(f"--target auto wrote {plan.target}, since {first}", *plan.notes))
        return with_sources(plan, spec)
    # no target fits: the engine's refusal names flags that work (the first target's may name one an engine refuses)
    failed = engine or first
    assert failed is not None
    raise failed


def auto_candidates(family: Family, cfg: dict[str, Any], spec: ConvertSpec) -> list[str]:
    """The targets --target auto tries, in order: the family's choice for these layers, its other native classes,
    then upcycle's generic wrapper (where it holds the family); the first that holds the request exactly (and
    loads in every --serve engine) is written."""
    num_layers = int(cfg["num_hidden_layers"])
    all_layers = len(moe_layer_indices(num_layers, spec)) == num_layers
    first = family.auto_target.get("every_layer" if all_layers else "some_layers")
    natives = [first] if first else []
    natives += [t for t in family.targets if t not in natives]
    return natives + ([GENERIC] if family.mlp else [])


def with_sources(plan: Plan, spec: ConvertSpec) -> Plan:
    """With --expert-from: the number of sources, and with --shared-weights average every tensor that is not an
    expert's (attention, norms, embeddings, the FFNs of dense layers) the float32 mean of the sources'."""
    n = len(spec.expert_from)
    if not n:
        return plan
    ops = plan.ops
    if spec.shared_weights == "average":
        every = tuple(range(1, n + 1))
        ops = tuple(
            Mean(op.name, op.shape, op.dtype, op.src, every, op.values) if isinstance(op, Copy) else op for op in ops
        )
        note = (
            f"--shared-weights average: every tensor but the experts is the float32 mean of the {n} --expert-from "
            "models, cast to the written dtype"
        )
        plan = replace(plan, notes=(*plan.notes, note))
    plan = replace(plan, ops=ops, sources=tuple(public_name(s) for s in spec.expert_from))
    # transformers' verdict says what verify checks: with several sources, each tensor against its source
    serving = tuple(verdict(v.engine, plan)[0] if v.engine == "transformers" else v for v in plan.serving)
    return replace(plan, serving=serving)

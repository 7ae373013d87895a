"""Experts from several models (Branch-Train-MiX, mergekit-moe): `--expert-from A --expert-from B ...`.

Each of the S sources gets N/S consecutive experts, built from that source's own dense FFN by the chosen
`--init` method exactly as the method builds N/S experts from one model (clone: N/S copies; split: its FFN cut
into N/S parts; ...). Only the source index differs, so the execution (`LayerBuilder`, one layer's FFN of each
source at a time) and the check are the ones every method uses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from ...errors import UpcycleError
from .base import Layout

if TYPE_CHECKING:
    from ..spec import ConvertSpec

MIN_PER_SOURCE = {"split": 2, "fine-grained": 2}  # a method that cuts an FFN into parts needs at least two


def layout(spec: ConvertSpec, hidden: int, intermediate: int, method: Callable[..., Layout]) -> Layout:
    sources = len(spec.expert_from)
    per = spec.experts // sources
    least = MIN_PER_SOURCE.get(spec.init, 1)
    if per < least:
        raise UpcycleError(
            f"--init {spec.init} cuts each source's FFN into --experts / sources parts, and {spec.experts} experts "
            f"from {sources} models is {per} per model; give --experts {least * sources} or more (or --init clone)"
        )
    # one model's spec (an MoE layer has at least 2 experts: with one per source, the first of 2 is taken)
    one = replace(
        spec, experts=max(per, 2), top_k=min(spec.top_k, per), expert_from=(), shared_weights="base", shared_from=None
    )
    try:
        base = method(one, hidden, intermediate)
    except UpcycleError as exc:
        raise UpcycleError(f"with {per} experts from each of the {sources} --expert-from models: {exc}") from None
    experts = tuple(
        {role: replace(t, source=s + 1) for role, t in expert.items()}
        for s in range(sources)
        for expert in base.experts[:per]
    )
    why = (
        f"the experts come from {sources} different models ({per} each, by --init {spec.init}), so the MoE computes "
        "none of them exactly; routed to one expert (top-1) it computes that model's FFN"
    )
    shared = base.shared
    if shared is not None:  # --shared-from: that model's whole FFN (clone's shared expert), routed halves halved
        shared = {role: replace(t, source=spec.shared_source) for role, t in shared.items()}
    return replace(base, experts=experts, exact=False, why=why, shared=shared)

"""Sparse upcycling (Komatsuzaki et al. 2022): every expert is a copy of the dense FFN.

The copies are byte copies unless something must change them: `--noise` (see noise.py), a down_proj scale
that keeps the MoE exact under softmax-then-top-k routing, or a shared expert that takes half the output.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...errors import UpcycleError
from ..ops import Noise
from .base import Layout, expert, parts_transform, routing_factor, zero_router

if TYPE_CHECKING:
    from ..spec import ConvertSpec


def routed_scale(spec: ConvertSpec, what: str) -> float:
    """The down_proj scale of routed experts as large as the dense FFN (the shared expert keeps the dense bytes).

    With a shared expert (Qwen2-MoE) the shared expert is the dense FFN and its zero-initialised sigmoid gate
    lets half its output through (sigmoid(0) = 1/2); the routed experts' down_proj is halved, so shared and
    routed halves add up to the dense output.
    """
    if spec.shared_experts > 1:
        raise UpcycleError(
            f"--shared-experts {spec.shared_experts}: with --init {what} the shared expert is the whole dense FFN, "
            "so there is only one; use --shared-experts 1, or --init split for several shared parts"
        )
    half = 0.5 if spec.shared_experts else 1.0
    return half * routing_factor(spec)


def exact_full_size(spec: ConvertSpec) -> tuple[bool, str]:
    """Experts that each compute the dense FFN (times their scale): when do the routing weights cancel out?"""
    shared = " (half from the shared expert, half from the routed ones)" if spec.shared_experts else ""
    if spec.renormalize:
        return True, (
            f"every expert computes the dense FFN{shared} and the kept top-k weights sum to one, "
            "so the MoE computes the dense FFN whatever the router says"
        )
    if spec.top_k == spec.experts:
        return True, f"every expert computes the dense FFN{shared} and all N routing weights are kept (they sum to one)"
    n_over_k = f"{spec.experts}/{spec.top_k}"
    if zero_router(spec):
        return True, (
            f"without renormalisation the kept weights of a zero router sum to k/N; down_proj is scaled by "
            f"N/k = {n_over_k}, so the MoE computes the dense FFN{shared} - with this zero router only"
        )
    return False, (
        "without renormalisation the kept weights of a random router do not sum to a fixed value, so the MoE "
        f"does not compute the dense FFN (down_proj is scaled by N/k = {n_over_k}: exact only with "
        "--router-init zero)"
    )


def layout(spec: ConvertSpec, hidden: int, intermediate: int) -> Layout:
    routed = routed_scale(spec, "clone")
    shared = expert(hidden, intermediate, None, None) if spec.shared_experts else None
    if spec.noise is not None:
        experts = tuple(
            expert(hidden, intermediate, Noise(e, float(spec.noise), 1.0), Noise(e, float(spec.noise), routed))
            for e in range(spec.experts)
        )
        why = f"multiplicative noise N(1, {spec.noise}) makes every expert differ from the dense FFN"
        return Layout(intermediate, experts, False, why, intermediate if shared else 0, shared)
    down = parts_transform("contiguous", 1, (0,), routed)
    experts = tuple(expert(hidden, intermediate, None, down) for _ in range(spec.experts))
    exact, why = exact_full_size(spec)
    return Layout(intermediate, experts, exact, why, intermediate if shared else 0, shared)

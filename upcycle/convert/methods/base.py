"""What an expert method decides (pure, no tensor read) and the pieces the methods share."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ... import seeds
from ...arch import FFN_ROLES
from ..ops import Parts, Transform

if TYPE_CHECKING:
    import torch

    from ..spec import ConvertSpec


@dataclass(frozen=True)
class ExpertTensor:
    """One FFN tensor of one expert: its shape, and how to compute it from the dense tensor of the same role.

    `transform` None means "the dense tensor itself": the writer copies the source bytes. Otherwise it is one of
    the transforms of convert/ops.py (computed by `LayerBuilder.tensor`), which holds everything the tensor
    depends on besides the dense tensors, the seed and the layer, so equal transforms give equal bytes.
    """

    shape: tuple[int, ...]
    transform: Transform | None = None


Expert = dict[str, ExpertTensor]  # role (gate/up/down) -> tensor


@dataclass(frozen=True)
class Layout:
    """How every MoE layer is built from its dense FFN, and what that keeps of the dense model."""

    expert_size: int  # intermediate size of one routed expert
    experts: tuple[Expert, ...]
    exact: bool  # with these routing settings, does the MoE compute what the dense FFN computed?
    why: str  # one sentence: why it is exact, or why not
    shared_size: int = 0  # intermediate size of the always-on shared expert (0: none)
    shared: Expert | None = None
    router_group: int = 1  # consecutive experts that share one router row (fine-grained virtual groups)

    def scales(self) -> set[float]:
        """Every factor a down_proj is multiplied by (1.0 excluded)."""
        found = set()
        for expert in (*self.experts, self.shared or {}):
            for t in expert.values():
                if t.transform is not None and t.transform.scale != 1.0:
                    found.add(float(t.transform.scale))
        return found


def zero_router(spec: ConvertSpec) -> bool:
    """All router logits equal at init: a zero router, or a random one with std 0."""
    return spec.router_init == "zero" or spec.router_std == 0


def routing_factor(spec: ConvertSpec) -> float:
    """What the kept weights must be multiplied by to sum to one under a zero router: 1 when top-k weights are
    renormalised; N/k under softmax-then-top-k, whose k kept weights are 1/N each."""
    return 1.0 if spec.renormalize else spec.experts / spec.top_k


def power_of_two(x: float) -> bool:
    """Multiplying by x rounds nothing (in range): x is ±2^n."""
    m, _ = math.frexp(abs(x))
    return x != 0 and m == 0.5


def shapes(hidden: int, size: int) -> dict[str, tuple[int, int]]:
    """Shapes of an FFN with `size` intermediate neurons: gate/up [size, hidden], down [hidden, size]."""
    return {"gate": (size, hidden), "up": (size, hidden), "down": (hidden, size)}


def expert(hidden: int, size: int, gate_up: Transform | None, down: Transform | None) -> Expert:
    s = shapes(hidden, size)
    return {role: ExpertTensor(s[role], gate_up if role != "down" else down) for role in FFN_ROLES}


def generator(seed: int, *keys: object) -> torch.Generator:
    """A generator seeded from (seed, *keys) alone, so each layer's/expert's draws are independent of the rest."""
    return seeds.generator(seed, *keys)


def parts_transform(by: str, parts: int, chosen: tuple[int, ...], scale: float) -> Parts | None:
    """The neurons of parts `chosen` of a `by` partition into `parts`, times `scale` (None: the tensor itself)."""
    if parts == 1 and scale == 1.0:
        return None
    return Parts(by, parts, chosen, float(scale))

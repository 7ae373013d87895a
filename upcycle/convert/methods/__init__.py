"""Expert construction methods, one module each: how each MoE layer's experts are made from its dense FFN.

Planning is pure: `layout(spec, hidden, intermediate)` says, for every expert and role, the tensor's shape and
the transform that makes it (None: the dense bytes themselves, copied without being read), plus what the
result keeps of the dense model. Execution is one layer at a time: `LayerBuilder` holds one layer's dense
gate/up/down and computes any expert tensor from them, a pure function of (dense tensors, seed, layer,
transform), so memory stays at one layer's FFN whatever the model's size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ..ops import Drop, Noise, Parts, Transform
from . import clone, drop, fine_grained, noise, sourced, split
from .base import Expert, ExpertTensor, Layout

if TYPE_CHECKING:
    import torch

    from ..spec import ConvertSpec

LAYOUTS: dict[str, Callable[[ConvertSpec, int, int], Layout]] = {
    "clone": clone.layout,
    "split": split.layout,
    "drop": drop.layout,
    "fine-grained": fine_grained.layout,
}


def layout(spec: ConvertSpec, hidden: int, intermediate: int) -> Layout:
    if spec.expert_from:  # experts from several models: the method applied to each (methods/sourced.py)
        return sourced.layout(spec, hidden, intermediate, LAYOUTS[spec.init])
    return LAYOUTS[spec.init](spec, hidden, intermediate)


class LayerBuilder:
    """Computes transformed expert tensors (float32) of one MoE layer from that layer's dense FFN tensors."""

    def __init__(
        self,
        dense: dict[str, torch.Tensor],
        seed: int,
        layer: int,
        partitions: dict[tuple[str, int], list[torch.Tensor]] | None = None,
    ):
        """`partitions`: neuron groups computed beforehand, (by, parts) -> groups (--split-by coactivation)."""
        self.dense, self.seed, self.layer = dense, seed, layer
        self._partitions: dict[tuple[str, int], list[torch.Tensor]] = dict(partitions or {})
        self._dropped: dict[tuple[int, float], torch.Tensor] = {}
        self._moments: dict[str, tuple[float, float]] = {}

    def tensor(self, role: str, transform: Transform) -> torch.Tensor:
        """The expert tensor of `role` that `transform` computes (float32)."""
        if isinstance(transform, Parts):
            key = (transform.by, transform.parts)
            if key not in self._partitions:  # k-means once per layer, not once per expert
                self._partitions[key] = split.partition(self.dense, *key, self.seed, self.layer)
            return split.take(self.dense[role], role, self._partitions[key], transform.chosen, transform.scale)
        if isinstance(transform, Drop):
            key = (transform.expert, transform.ratio)
            if key not in self._dropped:  # the same neurons in gate, up and down
                neurons = self.dense["gate"].shape[0]
                self._dropped = {key: drop.dropped(neurons, transform.ratio, self.seed, self.layer, transform.expert)}
            if role not in self._moments:  # once per layer and role, not once per expert
                self._moments[role] = drop.stats(self.dense[role])
            dense, idx, moments = self.dense[role], self._dropped[key], self._moments[role]
            return drop.reinit(dense, role, idx, moments, self.seed, self.layer, transform.expert, transform.scale)
        if isinstance(transform, Noise):
            e, sigma, scale = transform.expert, transform.sigma, transform.scale
            return noise.perturb(self.dense[role], role, sigma, self.seed, self.layer, e, scale)
        raise ValueError(f"unknown expert transform {transform!r}")


__all__ = ["LAYOUTS", "Expert", "ExpertTensor", "LayerBuilder", "Layout", "layout"]

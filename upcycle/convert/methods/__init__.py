"""Expert construction methods, one module each: how each MoE layer's experts are made from its dense FFN.

Planning is pure: `layout(spec, hidden, intermediate)` says, for every expert and role, the tensor's shape and
the transform that makes it (None: the dense bytes themselves, copied without being read), plus what the
result keeps of the dense model. Execution is one layer at a time: `LayerBuilder` holds one layer's dense
gate/up/down and computes any expert tensor from them, a pure function of (dense tensors, seed, layer,
transform), so memory stays at one layer's FFN whatever the model's size.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..ops import Drop, Noise, Parts, Transform
from . import clone, drop, fine_grained, noise, sourced, split
from .base import Expert, ExpertTensor, Layout

if TYPE_CHECKING:
    import torch

    from ..spec import ConvertSpec

DROPPED_KEPT = 4  # dropped-neuron sets held per layer (the experts computed ahead of the one written among them)

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
    """Computes transformed expert tensors of one MoE layer from that layer's dense FFN tensors: in float32
    (`tensor`), or straight in the written dtype (`written`, the same bytes as `tensor(...).to(dtype)`).

    Safe to call from several threads: what is computed once per layer (partitions, dropped neurons, moments) is
    computed under a lock; the rest reads the dense tensors only.
    """

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
        self._lock = threading.Lock()
        self._local = threading.local()  # per-thread working tensors (_scratch)

    def tensor(self, role: str, transform: Transform) -> torch.Tensor:
        """The expert tensor of `role` that `transform` computes (float32)."""
        dense = self.dense[role]
        if isinstance(transform, Parts):
            return split.take(dense, role, self._groups(transform), transform.chosen, transform.scale)
        if isinstance(transform, Drop):
            idx, moments = self._drop(role, transform)
            return drop.reinit(dense, role, idx, moments, self.seed, self.layer, transform.expert, transform.scale)
        if isinstance(transform, Noise):
            e, sigma, scale = transform.expert, transform.sigma, transform.scale
            return noise.perturb(dense, role, sigma, self.seed, self.layer, e, scale)
        raise ValueError(f"unknown expert transform {transform!r}")

    def neurons(self, transforms: dict[str, Transform | None]) -> torch.Tensor | None:
        """The dense neurons an expert is made of, where its gate and up are their rows unscaled and its down
        their columns (scaled or not), as split and fine-grained make them: the expert's FFN is then its down
        applied to those neurons' dense activations, act(gate x) * (up x). None for any other expert. The order
        is that of the expert's rows and columns (split.take)."""
        import torch

        gate, up, down = (transforms.get(role) for role in ("gate", "up", "down"))
        if not (isinstance(gate, Parts) and isinstance(down, Parts) and gate == up and gate.scale == 1.0):
            return None
        if (down.by, down.parts, down.chosen) != (gate.by, gate.parts, gate.chosen):
            return None
        groups = self._groups(gate)
        return torch.cat([groups[i] for i in gate.chosen])

    def written(
        self, role: str, transform: Transform, dtype: torch.dtype, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`tensor(role, transform).to(dtype)`, byte for byte, without a float32 copy of the dense tensor: kept
        neurons are copied (or scaled) in the dense dtype where that gives the same bytes, and only what is drawn
        passes through float32 (methods/base.scaled). NaN weights keep their bytes (a float32 round trip would
        have made them the canonical NaN). OUT: a tensor of the result's shape and DTYPE that Drop and Noise write
        into and return (Parts return a view of the dense tensor or a gather of their own)."""
        import torch

        dense = self.dense[role]
        if isinstance(transform, Parts):
            groups = self._groups(transform)
            return split.take_written(dense, role, groups, transform.chosen, transform.scale, dtype)
        if isinstance(transform, Drop):
            idx, moments = self._drop(role, transform)
            shape = drop.fresh_shape(dense, role, len(idx))
            new = drop.fresh(shape, moments, self.seed, self.layer, transform.expert, role, self._scratch(shape))
            spare = self._scratch(shape, dtype, "cast") if dtype != torch.float32 else None
            return drop.reinit_written(dense, role, idx, new, transform.scale, dtype, spare, out)
        if isinstance(transform, Noise):
            need = (noise.work_size(dense.numel()),)
            work = (self._scratch(need, name="noise factors"), self._scratch(need, name="noise dense"))
            e, sigma, scale = transform.expert, transform.sigma, transform.scale
            return noise.perturb_written(dense, sigma, self.seed, self.layer, e, role, scale, dtype, out, work)
        raise ValueError(f"unknown expert transform {transform!r}")

    def _scratch(self, shape: tuple[int, ...], dtype: torch.dtype | None = None, name: str = "draw") -> torch.Tensor:
        """A working tensor of SHAPE, this thread's, reused from tensor to tensor: a view of one flat buffer per
        (NAME, DTYPE), made anew only when a larger one is asked for. So no allocation per expert tensor (the
        allocator has no large blocks to scatter over the heap, and fresh pages cost a page fault each: drop's
        gate/up block [n, H] and down block [H, n] used to alternate, a new 23 MB buffer per tensor)."""
        import math

        import torch

        dtype = dtype or torch.float32
        held: dict = self._local.__dict__.setdefault("held", {})
        numel = math.prod(shape)
        t = held.pop((name, dtype), None)  # one too small is freed before the new one is made
        if t is None or t.numel() < numel:
            t = torch.empty(numel, dtype=dtype)
        held[(name, dtype)] = t
        return t[:numel].view(shape)

    def _groups(self, transform: Parts) -> list[torch.Tensor]:
        key = (transform.by, transform.parts)
        with self._lock:
            if key not in self._partitions:  # k-means once per layer, not once per expert
                self._partitions[key] = split.partition(self.dense, *key, self.seed, self.layer)
            return self._partitions[key]

    def _drop(self, role: str, transform: Drop) -> tuple[torch.Tensor, tuple[float, float]]:
        """The neurons expert `transform.expert` re-initialises (the same in gate, up and down) and the moments of
        the dense ROLE matrix they are drawn from."""
        key = (transform.expert, transform.ratio)
        with self._lock:
            if key not in self._dropped:
                neurons = self.dense["gate"].shape[0]
                idx = drop.dropped(neurons, transform.ratio, self.seed, self.layer, transform.expert)
                self._dropped[key] = idx
                if len(self._dropped) > DROPPED_KEPT:  # experts are asked for in order: keep the last few
                    self._dropped.pop(next(iter(self._dropped)))
            if role not in self._moments:  # once per layer and role, not once per expert
                self._moments[role] = drop.stats(self.dense[role])
            return self._dropped[key], self._moments[role]


__all__ = ["LAYOUTS", "Expert", "ExpertTensor", "LayerBuilder", "Layout", "layout"]

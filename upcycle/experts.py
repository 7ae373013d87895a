"""Expert construction methods: how each expert's FFN tensors are made from the dense FFN.

A method returns, for one FFN tensor (role gate/up/down) and one expert, the shape of the expert's tensor
and the transform that produces it from the dense tensor. `None` means "the same bytes": the writer then
copies the source byte range without materialising the tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class ExpertTensor:
    shape: tuple[int, ...]
    transform: tuple | None = None  # None: identical to the dense tensor


def clone(role: str, dense_shape: tuple[int, ...], expert: int, n_experts: int) -> ExpertTensor:
    """Sparse upcycling (Komatsuzaki et al. 2022): every expert is a copy of the dense FFN."""
    return ExpertTensor(shape=dense_shape)


def clone_intermediate_size(dense_intermediate: int, n_experts: int) -> int:
    return dense_intermediate


METHODS: dict[str, Callable[[str, tuple[int, ...], int, int], ExpertTensor]] = {"clone": clone}
INTERMEDIATE_SIZE: dict[str, Callable[[int, int], int]] = {"clone": clone_intermediate_size}
# Methods whose MoE computes exactly what the dense FFN computed, whatever the router says.
EXACT = {"clone"}

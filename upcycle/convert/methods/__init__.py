"""Expert construction methods, one module each: how each expert's FFN tensors are made from the dense FFN.

A method returns, for one FFN tensor (role gate/up/down) and one expert, the shape of the expert's tensor
and the transform that produces it from the dense tensor. `None` means "the same bytes": the writer then
copies the source byte range without materialising the tensor.
"""

from __future__ import annotations

from collections.abc import Callable

from . import clone
from .base import ExpertTensor

METHODS: dict[str, Callable[[str, tuple[int, ...], int, int], ExpertTensor]] = {"clone": clone.clone}
INTERMEDIATE_SIZE: dict[str, Callable[[int, int], int]] = {"clone": clone.intermediate_size}
# Methods whose MoE computes exactly what the dense FFN computed, whatever the router says.
EXACT = {"clone"}

__all__ = ["EXACT", "INTERMEDIATE_SIZE", "METHODS", "ExpertTensor"]

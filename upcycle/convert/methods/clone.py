"""Sparse upcycling (Komatsuzaki et al. 2022): every expert is a byte copy of the dense FFN."""

from __future__ import annotations

from .base import ExpertTensor


def clone(role: str, dense_shape: tuple[int, ...], expert: int, n_experts: int) -> ExpertTensor:
    """Every expert's gate/up/down is the dense tensor itself: the writer copies the source bytes."""
    return ExpertTensor(shape=dense_shape)


def intermediate_size(dense_intermediate: int, n_experts: int) -> int:
    return dense_intermediate

"""What an expert method returns for one FFN tensor of one expert."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ExpertTensor:
    shape: tuple[int, ...]
    transform: tuple | None = None  # None: identical to the dense tensor

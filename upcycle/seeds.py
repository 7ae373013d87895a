"""The one seeding scheme: every random draw of convert and train takes a generator seeded from the user's seed
and the keys that name the draw (layer, expert, role, purpose), hashed together.

Hashing (not `seed * K + layer`) keeps draws independent: no two (seed, keys) pairs share a stream by
arithmetic accident. The scheme is the one the expert methods have always used (drop, noise and split bytes
are unchanged by its move here; `verify --layerwise` reproduces them from the recorded seed).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def derived_seed(*keys: object) -> int:
    """A 63-bit seed from (seed, *keys): sha256 of their repr, first 8 bytes little-endian."""
    digest = hashlib.sha256(repr(tuple(keys)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def generator(*keys: object, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch generator seeded from `keys` alone (see `derived_seed`)."""
    import torch

    return torch.Generator(device=device).manual_seed(derived_seed(*keys))

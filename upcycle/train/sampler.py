"""Which blocks each rank reads at each step of `upcycle train` (the loop's data order; data.py makes the blocks)."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import UpcycleError
from ..seeds import generator as seeded_generator


class BlockSampler:
    """Which blocks each rank reads at each step: a pure function of (step, micro, rank), so resuming at step s
    needs no state.

    The blocks form an endless stream of epochs, each a permutation of all blocks drawn from a torch.Generator
    seeded by (seed, epoch). Step s takes the next B = micro_batch·grad_accum·world_size of them; micro-batch m
    of rank r is the B-slice's chunk number m·world_size + r. So the global batch of a step does not depend on
    how it is spread over ranks and micro-batches, and every block is read once per epoch.
    """

    def __init__(
        self,
        n_blocks: int,
        *,
        micro_batch: int,
        grad_accum: int,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
    ) -> None:
        if n_blocks < 1:
            raise UpcycleError("there are no blocks to train on; give more text or a smaller --seq-len")
        if micro_batch < 1 or grad_accum < 1 or world_size < 1:
            raise UpcycleError("--micro-batch, --grad-accum and the world size must be 1 or more")
        if not 0 <= rank < world_size:
            raise UpcycleError(f"rank {rank} is outside a world of {world_size} processes")
        self.n_blocks = n_blocks
        self.micro_batch = micro_batch
        self.grad_accum = grad_accum
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.global_batch = micro_batch * grad_accum * world_size
        self._perms: dict[int, np.ndarray] = {}

    def indices(self, step: int, micro: int) -> list[int]:
        """Block ids of this rank's micro-batch `micro` (0 ≤ micro < grad_accum) of step `step`."""
        if step < 0:
            raise IndexError(f"step {step} is negative")
        if not 0 <= micro < self.grad_accum:
            raise IndexError(f"micro-batch {micro} out of range: grad_accum is {self.grad_accum}")
        start = step * self.global_batch + (micro * self.world_size + self.rank) * self.micro_batch
        out = []
        for pos in range(start, start + self.micro_batch):
            epoch, offset = divmod(pos, self.n_blocks)
            out.append(int(self._perm(epoch)[offset]))
        return out

    def epoch(self, step: int) -> int:
        """The epoch that step `step`'s first block belongs to."""
        return step * self.global_batch // self.n_blocks

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:  # a step spans at most two epochs unless blocks are fewer than B
                self._perms.pop(next(iter(self._perms)))
            gen = seeded_generator("blocks", self.seed, epoch)
            self._perms[epoch] = torch.randperm(self.n_blocks, generator=gen).numpy()
        return self._perms[epoch]

"""What one forward of `upcycle train` gets: the model's keyword inputs for a micro-batch of blocks, from plain text
(data.TokenBlocks: labels = input ids, the loss on every token) or from conversations (chat.ChatBlocks: labels
-100 but on the assistant's tokens, position ids restarting at each conversation)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from .data import TokenBlocks

if TYPE_CHECKING:
    import torch

IGNORE = -100  # the label transformers' causal LM loss skips


class Blocks(Protocol):
    """What the sampler, a step and an evaluation read: `n_blocks` rows of at most `seq_len` tokens."""

    seq_len: int
    n_blocks: int


class ModelBlocks(Blocks, Protocol):
    """Blocks that make their own model inputs (chat.ChatBlocks)."""

    def inputs(self, idx: Sequence[int], device: torch.device | None = None) -> dict[str, torch.Tensor]: ...


def model_inputs(
    blocks: TokenBlocks | ModelBlocks, idx: Sequence[int], device: torch.device
) -> dict[str, torch.Tensor]:
    """{"input_ids", "labels"[, "position_ids"]}, each (len(idx), S) int64 on `device`: S is seq_len for text, at
    most seq_len for conversations."""
    if isinstance(blocks, TokenBlocks):
        ids = blocks.blocks(idx, device)  # (B, seq_len)
        return {"input_ids": ids, "labels": ids}
    return blocks.inputs(idx, device)


def predicted_tokens(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """() int64: how many tokens the loss of these inputs averages over (labels after the shift that are kept)."""
    return (inputs["labels"][:, 1:] != IGNORE).sum()

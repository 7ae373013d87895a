"""`--expert-dropout P`: dropout inside the experts only, in training mode only (Switch Transformer, Fedus et al.,
§2.4 and Table 4: dropout 0.1 outside the experts and 0.4 inside them fine-tuned best of the rates tried).

Where: on each expert's hidden activation, act(x·W_gate) ⊙ (x·W_up), between the up and the down projection, as
in Switch. transformers 5.x computes every experts kernel (eager, grouped_mm, batched_mm) as
`self.act_fn(gate) * up` (or `self.act_fn(up)` for ungated experts), so the experts module's `act_fn` is replaced
by the same activation followed by dropout: a dropout mask on act(gate) scaled by 1/(1-P) is the same mask on
act(gate) ⊙ up. The shared expert, attention and everything else are untouched; in eval mode (evaluation,
generation, final/) the wrapper is the identity after the activation, so outputs are unchanged. The masks draw
from torch's global RNG, which checkpoints save, so a resumed run repeats them. The wrapper has no weights: final/
is written without a trace of it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import UpcycleError

if TYPE_CHECKING:
    from ..arch import Target


class DroppedActivation(nn.Module):
    """act(x), then dropout with probability p in training mode."""

    def __init__(self, act: nn.Module, p: float) -> None:
        super().__init__()
        self.act = act
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.dropout(self.act(x), self.p, training=self.training)


def add_expert_dropout(model: nn.Module, target: Target, layers: list[int], p: float) -> int:
    """Wrap the activation of every MoE layer's experts (the fused module's `act_fn`, or each per-expert module's);
    -> how many activations were wrapped. Refused when an experts module has no `act_fn` to wrap."""
    if p <= 0:
        return 0
    wrapped = 0
    for layer in layers:
        path = target.modules["experts"].format(layer=layer)
        experts = model.get_submodule(path)
        holders = [experts] if hasattr(experts, "act_fn") else [m for m in experts.children() if hasattr(m, "act_fn")]
        if not holders:
            raise UpcycleError(
                f"--expert-dropout: the experts at {path} ({type(experts).__name__}) have no activation (act_fn) to "
                "add dropout to; train without --expert-dropout"
            )
        for holder in holders:
            act = holder.act_fn
            if isinstance(act, DroppedActivation):
                act = act.act
            holder.act_fn = DroppedActivation(act, p)
            wrapped += 1
    return wrapped

"""Router losses and load figures: pure float32 functions of what RouterTap recorded (no model code).

Legend: T tokens, E experts, k experts per token, L MoE layers.

balance (Switch Transformer): E·Σᵢ fᵢ·Pᵢ per layer, fᵢ the fraction of the layer's top-k assignments that went to
expert i (counted from the router's choice, before capacity dropping; no gradient), Pᵢ the mean router
probability of expert i. A balanced router gives 1 for any k (transformers' built-in aux loss pools the layers
and gives k). z (ST-MoE): mean over tokens of logsumexp(logits)², which keeps the logits small.
Both are averaged over the MoE layers.

LOSSES names the router loss terms the training step adds to the LM loss: total = lm + Σ coef·term, each coef a
TrainSpec field. A new router loss is one function here, one LOSSES entry and its coefficient field in spec.py
(a float ending in `_coef`); the step, metrics.jsonl (a key of its own), the progress line, TensorBoard and the
model card's recipe pick it up from there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .routing_hooks import LayerRouting


def expert_counts(r: LayerRouting, num_experts: int) -> torch.Tensor:
    """(E,) float32, no grad: top-k assignments per expert, dropped ones included. A scatter-add, not bincount:
    on a GPU bincount reads the largest index back to the host to size its output (a sync per call)."""
    return count_indices(r.indices, num_experts).float()  # (E,)


def count_indices(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(E,) int64: how often each expert id occurs in `indices` (any shape); no host sync."""
    flat = indices.reshape(-1)  # (T·k,)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat))  # (E,)


def balance_loss(logits: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Switch: E·Σᵢ fᵢ·Pᵢ with f = counts / Σ counts (no grad) and P = mean_t softmax(logits) (float32, grad)."""
    num_experts = logits.shape[-1]
    counts = counts.detach().float()  # (E,)
    f = counts / counts.sum().clamp_min(1.0)  # (E,) sums to 1
    p = torch.softmax(logits.float(), dim=-1).mean(dim=0)  # (T, E) -> (E,)
    return num_experts * torch.sum(f * p)  # ()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE: mean over the T tokens of logsumexp(logits)², float32."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()  # (T, E) -> (T,) -> ()


@dataclass(frozen=True)
class LossTerm:
    """A router loss: fn(logits (T, E) float32 with grad, counts (E,) the f of the layer) -> () per MoE layer,
    averaged over the layers and weighted by the TrainSpec field `coef`."""

    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    coef: str


def _z(logits: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    return z_loss(logits)


# name -> term; the name is the key of its value in metrics.jsonl. Order is the order they are logged and summed.
LOSSES: dict[str, LossTerm] = {
    "balance": LossTerm(balance_loss, "aux_loss_coef"),
    "z": LossTerm(_z, "z_loss_coef"),
}


def router_terms(
    records: dict[int, LayerRouting], counts: dict[int, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Each LOSSES term, averaged over the MoE layers: {name: ()}.

    counts: per-layer expert counts to use for f (the step sums them over ranks and micro-batches); None uses
    each record's own counts. P always comes from the local logits, which carry the gradient.
    """
    if not records:
        raise ValueError("no router records: run a forward with a RouterTap installed before computing the losses")
    values: dict[str, list[torch.Tensor]] = {name: [] for name in LOSSES}
    for layer, r in records.items():
        layer_counts = counts[layer] if counts is not None else expert_counts(r, r.logits.shape[-1])
        layer_counts = layer_counts.to(r.logits.device)
        for name, term in LOSSES.items():
            values[name].append(term.fn(r.logits, layer_counts))
    return {name: torch.stack(per_layer).mean() for name, per_layer in values.items()}  # (L,) -> ()


def router_losses(
    records: dict[int, LayerRouting], counts: dict[int, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(balance, z), the two built-in terms of router_terms, for callers that want just those (tests, benchmarks)."""
    terms = router_terms(records, counts)
    return terms["balance"], terms["z"]


def load_stats(counts: torch.Tensor) -> dict:
    """Share of assignments per expert and its spread: cv = population std / mean (0 when perfectly balanced)."""
    values = load_row(counts).tolist()  # one host sync
    return {"load": values[:-3], "cv": values[-3], "max": values[-2], "min": values[-1]}


def load_row(counts: torch.Tensor) -> torch.Tensor:
    """(E + 3,) float64 on the counts' device, no host sync: each expert's share of the assignments, then the
    shares' cv, max and min (what load_stats reads back)."""
    counts = counts.detach().double()  # (E,)
    load = counts / counts.sum().clamp_min(1.0)  # (E,)
    mean = load.mean()
    cv = torch.where(mean > 0, load.std(correction=0) / mean, 0.0)  # ()
    return torch.cat([load, torch.stack([cv, load.max(), load.min()])])  # (E + 3,)


def dropped_fraction(r: LayerRouting) -> float:
    """Share of the T·k assignments that capacity dropped."""
    return float(dropped_share(r))


def dropped_share(r: LayerRouting) -> torch.Tensor:
    """() float64, no host sync: the share of the T·k assignments that capacity dropped (0 without capacity)."""
    if r.mask is None or r.mask.numel() == 0:
        return torch.zeros((), dtype=torch.float64, device=r.indices.device)
    return (~r.mask).sum().double() / r.mask.numel()

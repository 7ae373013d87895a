"""How far the experts of one MoE layer have moved apart: mean pairwise cosine of their weights and of their outputs.

Cloned experts start identical (both figures 1.0); training lowers them as experts specialise. The in-memory
experts module of every native target holds fused tensors: gate_up_proj (E, 2I, H), gate rows first, and
down_proj (E, H, I), with the activation as `act_fn`; an expert computes down · (act(gate·x) ⊙ up·x). upcycle's
generic wrapper may instead hold ungated experts (up_proj, act(up·x)), biases, or GPT-2's transposed layout.

Legend: E experts, H hidden size, I expert size, N sampled tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from ..arch import Target
from ..errors import UpcycleError

CHUNK_ELEMENTS = 1 << 22  # per expert and step when accumulating the weight Gram matrix (bounded memory)


def experts_at(model: nn.Module, target: Target, layer: int) -> nn.Module:
    """The fused experts module of one MoE layer, checked to have the layout the maths below assumes."""
    path = target.modules["experts"].format(layer=layer)
    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise UpcycleError(f"no experts module at {path} in this {target.architecture}") from None
    first, down = _first(module), getattr(module, "down_proj", None)
    transposed, width = bool(getattr(module, "is_transposed", False)), 2 if _gated(module) else 1
    ok = (
        isinstance(first, torch.Tensor)
        and isinstance(down, torch.Tensor)
        and first.dim() == 3
        and down.dim() == 3
        and down.shape[0] == first.shape[0]
        and callable(getattr(module, "act_fn", None))
    )
    if ok and transposed:  # upcycle's generic wrapper for Conv1D MLPs: (E, H, w·I), (E, I, H)
        ok = down.shape[2] == first.shape[1] and first.shape[2] == width * down.shape[1]
    elif ok:  # (E, w·I, H), (E, H, I)
        ok = down.shape[1] == first.shape[2] and first.shape[1] == width * down.shape[2]
    if not ok:
        raise UpcycleError(
            f"the experts at {path} are not fused gate_up_proj (E, 2I, H) / down_proj (E, H, I) tensors; "
            "this transformers version lays them out differently"
        )
    return module


def _gated(experts: nn.Module) -> bool:
    """Native MoE experts are gated; upcycle's generic wrapper also holds ungated MLPs (GPT-2, Phi): up_proj only."""
    return bool(getattr(experts, "has_gate", True)) and getattr(experts, "gate_up_proj", None) is not None


def _first(experts: nn.Module) -> torch.Tensor | None:
    """The fused first projection: gate_up_proj, or up_proj for an ungated MLP."""
    return experts.gate_up_proj if _gated(experts) else getattr(experts, "up_proj", None)


def mean_offdiagonal(gram: torch.Tensor) -> float:
    """Mean of the E·(E-1) off-diagonal entries of a cosine matrix (E, E)."""
    num = gram.shape[0]
    return float((gram.sum() - gram.diagonal().sum()) / (num * (num - 1)))


@torch.no_grad()
def weight_cosine(experts: nn.Module) -> float:
    """Mean pairwise cosine of the experts' flattened [gate, up, down] weights, accumulated in float64 by chunks."""
    first = _first(experts)
    num = first.shape[0]
    gram = torch.zeros(num, num, dtype=torch.float64, device=first.device)  # (E, E)
    for weight in (first, experts.down_proj):  # (E, 2I, H), (E, H, I) (or another fused layout: see experts_at)
        rows = max(1, CHUNK_ELEMENTS // weight.shape[2])
        for r in range(0, weight.shape[1], rows):
            chunk = weight[:, r : r + rows].reshape(num, -1).double()  # (E, rows·cols)
            gram += chunk @ chunk.T  # (E, E)
    norms = gram.diagonal().sqrt().clamp_min(1e-300)  # (E,)
    return mean_offdiagonal(gram / norms[:, None] / norms[None, :])


@torch.no_grad()
def expert_outputs(experts: nn.Module, x: torch.Tensor, expert: int) -> torch.Tensor:
    """(N, H) float32: one expert's output on inputs x (N, H), without routing weights (biases included)."""
    transposed = bool(getattr(experts, "is_transposed", False))

    def linear(h: torch.Tensor, name: str) -> torch.Tensor:
        weight = getattr(experts, name)[expert].float()  # (out, in), or (in, out) when transposed
        bias = getattr(experts, name + "_bias", None) if getattr(experts, "has_bias", False) else None
        y = h @ (weight if transposed else weight.T)
        return y if bias is None else y + bias[expert].float()

    if _gated(experts):
        gate, up = linear(x, "gate_up_proj").chunk(2, dim=-1)  # (N, I), (N, I)
        hidden = experts.act_fn(gate) * up  # (N, I)
    else:
        hidden = experts.act_fn(linear(x, "up_proj"))  # (N, I)
    return linear(hidden, "down_proj")  # (N, H)


@torch.no_grad()
def output_cosine(experts: nn.Module, x: torch.Tensor) -> float:
    """Mean over tokens of the mean pairwise cosine between the E experts' outputs on that token.

    Σ_{e≠f} cos(y_e, y_f) = |Σ_e ŷ_e|² − Σ_e |ŷ_e|² with ŷ = y/|y|, so only a running sum (N, H) is kept.
    An expert whose output is exactly zero counts as cosine 0 with every other.
    """
    first = _first(experts)
    num = first.shape[0]
    x = x.to(device=first.device, dtype=torch.float32)  # (N, H)
    total = torch.zeros(x.shape, dtype=torch.float64, device=x.device)  # (N, H) Σ_e ŷ_e
    squares = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)  # (N,) Σ_e |ŷ_e|²
    for e in range(num):
        y = expert_outputs(experts, x, e).double()  # (N, H)
        unit = y / y.norm(dim=-1, keepdim=True).clamp_min(1e-300)  # (N, H)
        total += unit
        squares += unit.square().sum(dim=-1)
    pairs = (total.square().sum(dim=-1) - squares) / (num * (num - 1))  # (N,)
    return float(pairs.mean())

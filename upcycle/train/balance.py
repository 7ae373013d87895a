"""Aux-loss-free load balancing (Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing Strategy for
Mixture-of-Experts"; DeepSeek-AI 2024, DeepSeek-V3):
a per-expert bias on the routing scores that steers the top-k selection towards underloaded experts, moved after
each optimizer step by a fixed amount instead of by a gradient.

Legend: E experts, L MoE layers.

The bias b (E,) of a layer is added to the softmax probabilities p for the top-k selection only (RouterTap), the
gate weights stay p of the chosen experts. After each optimizer step that was taken, with c (E,) the step's top-k
assignments per expert summed over its micro-batches and every rank (the step all-reduces them):

    Δ = u·sign(mean(c) − c)      +u for an underloaded expert, −u for an overloaded one, 0 at the mean
    b ← b + (Δ − mean(Δ))        shifted to zero mean, so Σb stays 0 and only the ranking of the experts moves

u is --balance-rate (1e-3, DeepSeek-V3's γ). DeepSeek-V3 adds b to sigmoid affinities; here it is added to the
router's softmax probabilities, as Ernie 4.5-MoE routes with its correction bias. The papers move b by ±u; the shift
to zero mean is ours (a shift common to all experts changes no top-k; it keeps Σb at 0). The biases are state, not
parameters: no gradient reaches them, the optimizer never sees them, checkpoints carry them
(trainer_state.safetensors, `BIAS_KEY`) and a resumed run continues from them exactly. Where the target has a slot
for them (Ernie 4.5-MoE's `e_score_correction_bias`, upcycle's generic wrapper) they are written there; see
bias_export.py for the rest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..arch import Target
    from .routing_hooks import RouterTap

BIAS_KEY = "balance_bias.{layer}"  # the name of a layer's bias in a checkpoint's trainer_state.safetensors
SLOT = "router_bias"  # Target.modules key: the parameter a target routes with as probs + bias (template with {layer})


def bias_update(counts: torch.Tensor, rate: float) -> torch.Tensor:
    """(E,) float32: the change of one layer's bias after a step whose top-k assignments per expert are `counts`."""
    import torch

    counts = counts.float()  # (E,)
    delta = rate * torch.sign(counts.mean() - counts)  # (E,) +u underloaded, −u overloaded
    return delta - delta.mean()  # (E,) zero mean


def update_biases(tap: RouterTap, counts: dict[int, torch.Tensor], rate: float) -> None:
    """Move every layer's bias by bias_update of the step's counts (E,) per layer, all ranks (in place, no sync)."""
    for layer, bias in tap.bias.items():
        bias += bias_update(counts[layer].to(bias.device), rate)


def bias_tensors(tap: RouterTap) -> dict[str, torch.Tensor]:
    """What a checkpoint saves: {BIAS_KEY: (E,) float32}; empty with --balance aux."""
    return {BIAS_KEY.format(layer=layer): bias for layer, bias in tap.bias.items()}


def restore_biases(tap: RouterTap, tensors: dict[str, torch.Tensor]) -> None:
    """Put a checkpoint's biases back into the tap (a layer the checkpoint lacks keeps what it has)."""
    for layer, bias in tap.bias.items():
        saved = tensors.get(BIAS_KEY.format(layer=layer))
        if saved is not None:
            bias.copy_(saved.reshape(bias.shape))


# --- the target's own slot -----------------------------------------------------------------------------------


def slot_name(target: Target, layer: int) -> str | None:
    """The state-dict name of the parameter the target routes with as probs + bias in `layer`; None: no slot."""
    template = target.modules.get(SLOT)
    return template.format(layer=layer) if template else None


def slot_params(model: nn.Module, target: Target, layers: list[int]) -> dict[int, torch.Tensor]:
    """layer -> the model's own bias parameter (Ernie: (1, E); generic: (E,)); empty when the model has none."""
    found = {}
    for layer in layers:
        name = slot_name(target, layer)
        if name is None:
            return {}
        try:
            found[layer] = model.get_parameter(name)
        except AttributeError:
            return {}  # a generic model written before the wrapper had the slot (config.router_bias off)
    return found


def start_from_slots(tap: RouterTap, model: nn.Module, target: Target) -> None:
    """A model that already routes with a bias (a trained Ernie 4.5, an earlier bias run) starts from it."""
    import torch

    with torch.no_grad():
        for layer, param in slot_params(model, target, sorted(tap.bias)).items():
            tap.bias[layer].copy_(param.detach().float().reshape(-1))


def write_slots(tap: RouterTap, model: nn.Module, target: Target) -> bool:
    """Copy the tap's biases into the model's own slots, kept in float32 (the routing is done in float32 and a
    bfloat16 bias would move near-ties); False when the model has none."""
    import torch

    slots = slot_params(model, target, sorted(tap.bias))
    if not slots:
        return False
    with torch.no_grad():
        for layer, param in slots.items():
            param.data = tap.bias[layer].detach().to(param.device, torch.float32).reshape(param.shape).clone()
    return True


def write_slot_state(tap: RouterTap, target: Target, state: dict[str, torch.Tensor]) -> bool:
    """The same for a gathered full state dict (under torchrun): replace the slot entries, in float32; False if it
    has none. A final/ in a lower dtype must leave them so (slot_keys names them for checkpoint.write_final)."""
    names = slot_keys(tap, target)
    if not names or any(name not in state for name in names.values()):
        return False
    for layer, name in names.items():
        state[name] = tap.bias[layer].detach().float().reshape(state[name].shape).cpu()
    return True


def slot_keys(tap: RouterTap, target: Target) -> dict[int, str]:
    """layer -> the state-dict name of its slot; empty with --balance aux or where the target has no slot."""
    names = {}
    for layer in tap.bias:
        name = slot_name(target, layer)
        if name is None:
            return {}
        names[layer] = name
    return names


def sync_slots(tap: RouterTap, model: nn.Module, target: Target, state: dict[str, torch.Tensor] | None) -> bool:
    """Before a save: the biases into the model's slots, or into `state` when the save writes a gathered full state
    (under torchrun). False when there is nothing to write (--balance aux) or nowhere to write it."""
    if not tap.bias:
        return False
    return write_slot_state(tap, target, state) if state is not None else write_slots(tap, model, target)


def add_slots(model: nn.Module, target: Target, tap: RouterTap) -> None:
    """Where the model can hold the bias but was written without the slot (upcycle's generic wrapper), add it, so
    that checkpoints and final/ route as the run does; then start from what the slots hold (a model that already
    routes with a bias, as a trained Ernie 4.5 does, keeps it)."""
    if not tap.bias:
        return
    add = getattr(model, "add_router_bias", None)
    if add is not None and slot_name(target, tap.layers[0]) is not None:
        add()
    start_from_slots(tap, model, target)

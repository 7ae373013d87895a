"""Hooks on the routers of a native transformers MoE: record what they chose; in training, jitter, noise, capacity.

The stock routers (MixtralTopKRouter, Qwen2MoeTopKRouter, Qwen3MoeTopKRouter) return
`(logits, scores, indices)`; the MoE block hands `scores` and `indices` to the experts. A forward pre-hook on
the router changes only the router's input (jitter); a forward hook replaces that tuple (noise, capacity) and
records the logits for the losses. The model's own `output_router_logits` is never needed.

Legend: T tokens in one forward (batch·seq, flattened), E experts, k experts per token, H hidden size.

Balancing bias (--balance bias|both, balance.py): `bias` holds a float32 (E,) vector per MoE layer, added to the
softmax probabilities for the top-k selection only; the gate weights stay the unbiased probabilities of the chosen
experts (renormalised as the router does). It applies in eval mode too: it is part of how the model routes.

Randomness: with a `generator` (what `upcycle train` passes), each layer gets its own generator seeded from it, on
the router's device; `rng_state()` / `set_rng_state()` save and restore them (checkpoints carry them for exact
resume). Activation checkpointing replays only the global RNG when it recomputes a layer in backward, so the tap
replays its own: each draw in a forward remembers the generator's state, and the recompute draws again from that
state (one forward per backward, as in training), leaving the generator where the forward left it. With
`generator=None` jitter and noise draw from the global torch RNG of the input's device (checkpointing replays it).
Under torch.compile (`--compile`), which cannot trace a torch.Generator, the traced draws take the global RNG too:
inductor draws them from the global seed, which checkpoints save, so a resumed compiled run repeats its draws (other
random numbers than an eager run's).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..arch import Target
from ..compat import in_backward
from ..errors import UpcycleError


@dataclass
class LayerRouting:
    logits: torch.Tensor  # (T, E) the router logits that chose the experts (after noise when on), float32, with grad
    indices: torch.Tensor  # (T, k) chosen experts (int64)
    mask: torch.Tensor | None = None  # (T, k) bool, False for assignments dropped by capacity; None: none dropped

    @property
    def keep(self) -> torch.Tensor:
        """(T, k) bool: False for assignments dropped by capacity (all True when capacity is off; made on demand)."""
        if self.mask is not None:
            return self.mask
        return torch.ones(self.indices.shape, dtype=torch.bool, device=self.indices.device)


def router_weight(module: nn.Module) -> torch.Tensor | None:
    """The router's [E, H] weight: its own `weight`, or the one matrix it holds (HunYuan's gate keeps it in `wg`)."""
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight if weight.dim() == 2 else None
    matrices = [p for p in module.parameters() if p.dim() == 2]
    return matrices[0] if len(matrices) == 1 else None


def find_routers(model: nn.Module, target: Target) -> dict[int, nn.Module]:
    """MoE layer index -> router module, from target.modules["router"]; only layers that exist (dense ones skipped)."""
    template = target.modules["router"]
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    routers: dict[int, nn.Module] = {}
    for layer in range(config.num_hidden_layers):
        try:
            module = model.get_submodule(template.format(layer=layer))
        except AttributeError:
            continue  # a dense layer (Qwen-MoE mlp_only_layers / decoder_sparse_step) has no router
        if router_weight(module) is not None:
            routers[layer] = module
    if not routers:
        raise UpcycleError(
            f"no router module found at {template!r} in this {target.architecture}; "
            "train a model written by `upcycle convert` (or a stock transformers MoE)"
        )
    return routers


def route_topk(
    logits: torch.Tensor, top_k: int, renormalize: bool, dtype: torch.dtype, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The stock routers' maths: softmax over all E in float32, top-k, optional renormalisation -> (scores, indices).

    bias (E,): chooses the top-k by probs + bias (Ernie 4.5's e_score_correction_bias, DeepSeek-V3's aux-loss-free
    balancing); the scores are still the unbiased probabilities of the chosen experts."""
    probs = torch.softmax(logits.float(), dim=-1)  # (T, E)
    if bias is None:
        top, indices = torch.topk(probs, top_k, dim=-1)  # (T, k), (T, k)
    else:
        indices = torch.topk(probs + bias, top_k, dim=-1).indices  # (T, k) chosen by the biased scores
        top = probs.gather(-1, indices)  # (T, k) their unbiased probabilities, with grad
    if renormalize:
        top = top / top.sum(dim=-1, keepdim=True)  # (T, k), each row sums to 1
    return top.to(dtype), indices


def capacity(capacity_factor: float, tokens: int, top_k: int, num_experts: int) -> int:
    """C = ceil(capacity_factor · T · k / E); rounded to 9 places first so 1.1·10/11 gives 1, not 2."""
    return math.ceil(round(capacity_factor * tokens * top_k / num_experts, 9))


def capacity_keep(indices: torch.Tensor, num_experts: int, capacity_factor: float) -> torch.Tensor:
    """(T, k) bool: which assignments fit in their expert's capacity C.

    Switch's order: every expert's queue takes all top-1 slots (earlier positions first), then all top-2
    slots, and so on; the first C assignments in the queue are kept.
    """
    tokens, top_k = indices.shape
    limit = capacity(capacity_factor, tokens, top_k, num_experts)
    flat = indices.t().reshape(-1)  # (k·T,) slot-major: all top-1 choices, then all top-2 choices, ...
    order = torch.sort(flat, stable=True).indices  # (k·T,) groups by expert, queue order kept inside a group
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # (E,) no host sync, unlike bincount on a GPU
    starts = torch.cumsum(counts, 0) - counts  # (E,) where each expert's group begins in `order`
    queue_sorted = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]  # (k·T,)
    queue = torch.empty_like(queue_sorted)
    queue[order] = queue_sorted  # (k·T,) place of each assignment in its expert's queue, 0-based
    return (queue < limit).view(top_k, tokens).t()  # (T, k)


class RouterTap:
    """Hooks on every router: records (logits, indices, keep) per forward; in training mode also applies
    jitter (router input only), noisy top-k and expert capacity. In eval mode it only records.

    Capacity drops assignments after top-k renormalisation: a dropped slot just loses its share of the
    token's weight (score set to 0) and keeps its expert index, so the token keeps its residual path.
    Noise weights (`noise_modules`, float32, on the router's device, zero-initialised as in Shazeer 2017, so the
    noise starts at std softplus(0) = log 2) are not part of the model: give them to the optimizer and save them.
    """

    def __init__(
        self,
        routers: dict[int, nn.Module],
        *,
        num_experts: int,
        top_k: int,
        renormalize: bool,
        capacity_factor: float | None = None,
        jitter: float = 0.0,
        noise: bool = False,
        hidden_size: int,
        generator: torch.Generator | None = None,
        selection_bias: bool = False,
    ) -> None:
        if not 1 <= top_k <= num_experts:
            raise UpcycleError(f"top-k {top_k} must be between 1 and the number of experts ({num_experts})")
        if capacity_factor is not None and capacity_factor <= 0:
            raise UpcycleError(f"capacity factor {capacity_factor} must be positive (1.0-1.25 is typical)")
        if not 0 <= jitter < 1:
            raise UpcycleError(f"jitter {jitter} must be in [0, 1) (ST-MoE uses 0.01)")
        self.num_experts = num_experts
        self.top_k = top_k
        self.renormalize = renormalize
        self.capacity_factor = capacity_factor
        self.jitter = jitter
        self.noise = noise
        self.hidden_size = hidden_size
        self.layers = sorted(routers)  # the MoE layers, ascending
        self.noise_modules = nn.ModuleDict()
        self._generators: dict[int, torch.Generator] = {}
        self._replay: dict[tuple[int, str], torch.Tensor] = {}  # (layer, draw) -> generator state before the draw
        self._records: dict[int, list[LayerRouting]] = {}
        self._handles: list[Any] = []
        # layer -> (E,) float32 balancing bias on the router's device (empty: the model's own routing); balance.py
        self.bias: dict[int, torch.Tensor] = {}
        self.bias_on = True  # False: route without the bias (what an export without a slot for it does)
        for layer, router in sorted(routers.items()):
            weight = router_weight(router)
            if tuple(weight.shape) != (num_experts, hidden_size):
                raise UpcycleError(
                    f"router of layer {layer} has weight shape {tuple(weight.shape)}, "
                    f"expected ({num_experts}, {hidden_size}) from the config"
                )
            if selection_bias:
                self.bias[layer] = torch.zeros(num_experts, device=weight.device, dtype=torch.float32)
            if noise:
                w_noise = nn.Linear(hidden_size, num_experts, bias=False, device=weight.device, dtype=torch.float32)
                nn.init.zeros_(w_noise.weight)
                self.noise_modules[str(layer)] = w_noise
            if generator is not None and (jitter > 0 or noise):
                seed = int(torch.randint(0, 2**62, (1,), generator=generator))
                self._generators[layer] = torch.Generator(device=weight.device).manual_seed(seed)
            if jitter > 0:
                self._handles.append(router.register_forward_pre_hook(partial(self._jitter_hook, layer)))
            self._handles.append(router.register_forward_hook(partial(self._route_hook, layer)))

    # --- hooks ------------------------------------------------------------------------------------------

    def _jitter_hook(self, layer: int, module: nn.Module, args: tuple) -> tuple | None:
        """ST-MoE jitter: the router's input times U(1-ε, 1+ε); a new tensor, so the experts' input is untouched."""
        if not module.training:
            return None
        x = args[0]  # (T, H) or (B, S, H)
        u = torch.empty(x.shape, device=x.device, dtype=torch.float32)
        with self._drawing(layer, "jitter") as generator:
            u.uniform_(1.0 - self.jitter, 1.0 + self.jitter, generator=generator)
        return ((x.float() * u).to(x.dtype), *args[1:])

    def _route_hook(self, layer: int, module: nn.Module, args: tuple, output: tuple) -> tuple | None:
        logits, scores, indices = output  # (T, E) module dtype, (T, k), (T, k)
        logits32 = logits.float()  # (T, E); the same tensor when the model is float32, so the graph is kept
        changed = False
        if module.training and self.noise:
            x = args[0].reshape(-1, self.hidden_size)  # (T, H) the router's input (after jitter)
            w_noise = self.noise_modules[str(layer)]
            std = F.softplus(F.linear(x.to(w_noise.weight.dtype), w_noise.weight))  # (T, E)
            with self._drawing(layer, "noise") as generator:
                eps = torch.randn(std.shape, device=std.device, dtype=torch.float32, generator=generator)  # (T, E)
            logits32 = logits32 + std * eps  # (T, E) noisy logits choose the experts
            changed = True
        bias = self.bias.get(layer) if self.bias_on else None  # (E,) or None
        if changed or bias is not None:
            scores, indices = route_topk(logits32, self.top_k, self.renormalize, scores.dtype, bias)  # (T, k) ×2
            changed = True
        keep = None  # nothing dropped
        if module.training and self.capacity_factor is not None:
            keep = capacity_keep(indices, self.num_experts, self.capacity_factor)  # (T, k)
            scores = scores * keep.to(scores.dtype)  # (T, k) dropped slots weigh 0, indices stay valid
            changed = True
        if not in_backward():  # a checkpointed layer's recompute must not add a second record
            self._records.setdefault(layer, []).append(LayerRouting(logits32, indices, keep))
        if changed:
            return logits32.to(logits.dtype), scores, indices
        return None

    @contextmanager
    def _drawing(self, layer: int, draw: str) -> Iterator[torch.Generator | None]:
        """The generator for one draw of `layer` (None: the global RNG). In a forward it remembers the state the
        draw starts from; in activation checkpointing's recompute (autograd's backward) it draws again from that
        state, so the recomputed layer sees the same jitter and noise, then puts the generator back. While
        torch.compile traces, the global RNG (see the module's note on randomness)."""
        generator = self._generators.get(layer)
        if generator is None or torch.compiler.is_compiling():
            yield None
            return
        key = (layer, draw)
        if not in_backward():
            self._replay[key] = generator.get_state()
            yield generator
            return
        after = generator.get_state()
        generator.set_state(self._replay.get(key, after))
        try:
            yield generator
        finally:
            generator.set_state(after)

    # --- records and state ------------------------------------------------------------------------------

    def pop(self) -> dict[int, LayerRouting]:
        """The records of the forward(s) since the last pop (several forwards concatenated along T), then cleared."""
        records = {layer: _concat(parts) for layer, parts in sorted(self._records.items())}
        self._records = {}
        return records

    def remove(self) -> None:
        """Detach every hook and forget pending records."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._records = {}
        self._replay = {}

    @contextmanager
    def without_bias(self) -> Iterator[None]:
        """Route as the model's own router does, without the balancing bias (what an export with no slot for it
        gives), for the forwards inside."""
        self.bias_on = False
        try:
            yield
        finally:
            self.bias_on = True

    def rng_state(self) -> dict[int, torch.Tensor]:
        """The per-layer generators' states (empty when the tap uses the global RNG)."""
        return {layer: g.get_state() for layer, g in self._generators.items()}

    def set_rng_state(self, state: dict[int, torch.Tensor]) -> None:
        for layer, g in self._generators.items():
            g.set_state(state[layer])

    def __enter__(self) -> RouterTap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def tap_model(
    model: nn.Module,
    target: Target,
    *,
    capacity_factor: float | None = None,
    jitter: float = 0.0,
    noise: bool = False,
    generator: torch.Generator | None = None,
    selection_bias: bool = False,
) -> RouterTap:
    """A RouterTap on every router of `model`, with E, k, H and renormalisation read from its config via the table."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    renormalize = target.renormalize == "always" or bool(getattr(config, target.renormalize))
    return RouterTap(
        find_routers(model, target),
        num_experts=getattr(config, target.config["experts"]),
        top_k=getattr(config, target.config["top_k"]),
        renormalize=renormalize,
        capacity_factor=capacity_factor,
        jitter=jitter,
        noise=noise,
        hidden_size=config.hidden_size,
        generator=generator,
        selection_bias=selection_bias,
    )


def _concat(parts: list[LayerRouting]) -> LayerRouting:
    if len(parts) == 1:
        return parts[0]
    dropped = any(p.mask is not None for p in parts)
    return LayerRouting(
        torch.cat([p.logits for p in parts]),  # (ΣT, E)
        torch.cat([p.indices for p in parts]),  # (ΣT, k)
        torch.cat([p.keep for p in parts]) if dropped else None,  # (ΣT, k)
    )

"""What trains and how fast: freezing (--train), the optimizer (--optimizer) over parameter groups, and the
learning-rate schedule.

Frozen parameters are never in a group, so they get no gradient (requires_grad off) and no optimizer state.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

from ..errors import EXIT_ENVIRONMENT, UpcycleError

if TYPE_CHECKING:
    from types import ModuleType

    import torch
    from torch import nn

    from ..arch import Target
    from .spec import TrainSpec


def module_params(model: nn.Module, template: str, layers: Iterable[int]) -> list[nn.Parameter]:
    """The parameters of the module at `template` (a path with {layer}) in every MoE layer."""
    return [p for layer in layers for p in model.get_submodule(template.format(layer=layer)).parameters()]


def set_trainable(
    model: nn.Module, target: Target, layers: list[int], what: str, router_extra: Iterable[nn.Parameter] = ()
) -> None:
    """requires_grad by --train: all | experts (expert weights only) | non-experts (all but the experts, routers
    included) | router (routers and their noise weights only). `router_extra` are router-side parameters that live
    outside the model (the noisy top-k weights)."""
    router_extra = list(router_extra)
    experts = {id(p) for p in module_params(model, target.modules["experts"], layers)}
    routers = {id(p) for p in module_params(model, target.modules["router"], layers)}
    routers |= {id(p) for p in router_extra}
    for p in [*model.parameters(), *router_extra]:
        if what == "all":
            p.requires_grad_(True)
        elif what == "experts":
            p.requires_grad_(id(p) in experts)
        elif what == "non-experts":
            p.requires_grad_(id(p) not in experts)
        elif what == "router":
            p.requires_grad_(id(p) in routers)
        else:
            raise ValueError(f"unknown --train {what!r}")


def param_groups(
    model: nn.Module,
    router_params: Iterable[nn.Parameter],
    spec: TrainSpec,
) -> list[dict]:
    """AdamW groups over the trainable parameters, in a fixed order (optimizer state is matched by position):
    decayed weights; norms, biases and embeddings without decay; routers (and their noise weights) without decay
    at lr · router_lr_scale. Empty groups are left out."""
    router_params = list(router_params)
    router_ids = {id(p) for p in router_params}
    embeddings = {id(p) for p in model.get_input_embeddings().parameters()}
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():  # parameters() yields a tied weight once
        # a size-0 tensor (Qwen2-MoE's empty shared expert) has nothing to update, and Adafactor divides by its size
        if not p.requires_grad or id(p) in router_ids or id(p) in seen or p.numel() == 0:
            continue
        seen.add(id(p))
        # 1-D tensors are norm weights and biases; embeddings are lookups, decaying them shrinks rare tokens
        (no_decay if p.ndim < 2 or id(p) in embeddings else decay).append(p)
    routers = [p for p in router_params if p.requires_grad]
    groups = [
        {"params": decay, "weight_decay": spec.weight_decay, "lr": spec.lr, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "lr": spec.lr, "name": "no_decay"},
        {"params": routers, "weight_decay": 0.0, "lr": spec.lr * spec.router_lr_scale, "name": "router"},
    ]
    return [g for g in groups if g["params"]]


def lr_factor(index: int, total: int, warmup: int, min_ratio: float) -> float:
    """Multiplier of the peak lr for the optimizer step with 0-based `index`: linear warmup to 1 over `warmup`
    steps, then a cosine from 1 down to `min_ratio` at the last step."""
    if index < warmup:
        return (index + 1) / warmup
    decay_steps = total - warmup - 1  # the last step lands exactly on min_ratio
    progress = min(1.0, (index - warmup) / decay_steps) if decay_steps > 0 else 0.0
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# bitsandbytes' 8-bit optimizers: tensors of fewer elements keep fp32 moments (its min_8bit_size); the others keep
# each moment in uint8 with one fp32 absmax per block of 256 elements, and share two 256-entry fp32 quantile maps
MIN_8BIT_SIZE = 4096
BLOCK_8BIT = 256
QMAPS_8BIT = 2 * 256 * 4
# its CPU step dequantises one tensor's two moments to fp32, with the scaled gradient and the denominator: 6.0 fp32
# copies of the tensor at once above its state (measured on one 2048 x 4096 tensor and on one SmolLM2-MoE layer's
# experts: tests/test_train_memory.py, benchmarks/README.md's adamw8bit_step.py section)
STEP_COPIES_8BIT = 6
# ... and whole runs held more, from their first step on: 2.2-2.5 bytes per trainable parameter beyond the state and
# those copies (SmolLM2 MoE --train all, a 12-layer Qwen2.5-0.5B shape's --train experts; with glibc's default heap
# too, so not the heap policy; benchmarks/README.md, "Weight file pages and the heap after loading"). Not isolated;
# the plan counts it so that a run it lets start fits.
HELD_8BIT_CPU = 2.75  # bytes per trainable parameter
INSTALL_8BIT = "pip install 'upcycle[adamw8bit]' (or: pip install 'bitsandbytes>=0.50')"


class OptimizerMissing(UpcycleError):
    """The package an optimizer needs is not installed: the environment's fault (exit 3)."""

    exit_code = EXIT_ENVIRONMENT


def check_optimizer(name: str, distributed: bool) -> None:
    """Refuse, before any work, an optimizer this run cannot use: adamw8bit without bitsandbytes (exit 3), or
    under torchrun, where its kernels meet FSDP2's sharded DTensor parameters and fail."""
    if name != "adamw8bit":
        return
    if distributed:
        raise UpcycleError(
            "--optimizer adamw8bit is not supported under torchrun: bitsandbytes' 8-bit step does not take FSDP's "
            "sharded parameters; train in one process, or use --optimizer adamw or adafactor"
        )
    _bitsandbytes()


def _bitsandbytes() -> ModuleType:
    import importlib
    import logging

    # bitsandbytes' CPU backend logs a warning at import when it cannot fetch an optional 4-bit matmul kernel
    # from the Hub; nothing here uses it
    log = logging.getLogger("bitsandbytes")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return importlib.import_module("bitsandbytes")
    except ImportError:
        raise OptimizerMissing(
            f"--optimizer adamw8bit needs the bitsandbytes package; install it: {INSTALL_8BIT}"
        ) from None
    except (OSError, RuntimeError) as exc:  # installed but its native library does not load
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise OptimizerMissing(f"bitsandbytes failed to load ({reason}); reinstall it: {INSTALL_8BIT}") from None
    finally:
        log.setLevel(level)


def eight_bit_available() -> bool:
    """Whether bitsandbytes is installed (not imported: the memory plan only offers --optimizer adamw8bit then)."""
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


def build_optimizer(groups: list[dict], device: torch.device, name: str = "adamw") -> torch.optim.Optimizer:
    """AdamW (betas 0.9/0.95), or torch's Adafactor (factored second moments, no first moment: ST-MoE's
    optimizer), whose step is its lr times each tensor's RMS, so its lr is relative (1e-3 to 1e-2 is typical), or
    bitsandbytes' AdamW8bit (the same betas and eps, both moments in 8 bits per element: ~2 bytes per parameter
    instead of 8)."""
    import torch

    if not groups:
        raise UpcycleError("nothing to train: --train froze every parameter")
    if name == "adafactor":
        return torch.optim.Adafactor(groups)
    if name == "adamw8bit":
        bnb = _bitsandbytes()
        return bnb.optim.AdamW8bit(groups, betas=(0.9, 0.95), eps=1e-8, min_8bit_size=MIN_8BIT_SIZE)
    if name != "adamw":
        raise ValueError(f"unknown optimizer {name!r}")
    # fused: one kernel over all parameters on CUDA and on the CPU (torch >= 2.4), ~10x the unfused CPU step, which
    # was a third of a CPU training step (benchmarks/train_loops.py); the Trainer's default is fused too
    fused = device.type in ("cuda", "cpu") or None
    return torch.optim.AdamW(groups, betas=(0.9, 0.95), eps=1e-8, fused=fused)


def state_bytes(shape: tuple[int, ...], name: str) -> int:
    """Bytes of optimizer state one float32 parameter of `shape` gets: AdamW's two moments; Adafactor's row and
    column means of the squared gradient over the last two dimensions (the whole second moment for a vector);
    AdamW8bit's two uint8 moments and their per-block absmax (fp32 moments below MIN_8BIT_SIZE elements)."""
    numel = math.prod(shape)
    if name == "adamw" or (name == "adamw8bit" and numel < MIN_8BIT_SIZE):
        return 2 * numel * 4
    if name == "adamw8bit":
        return 2 * (numel + math.ceil(numel / BLOCK_8BIT) * 4)
    if len(shape) < 2:
        return numel * 4
    rows = math.prod(shape[:-1])
    cols = math.prod(shape[:-2]) * shape[-1]
    return (rows + cols) * 4


def optimizer_state_bytes(params: Iterable[nn.Parameter], name: str) -> int:
    """Optimizer state of the trainable parameters (each counted once; frozen ones get none)."""
    seen: set[int] = set()
    total = 0
    quantised = False
    for p in params:
        if p.requires_grad and id(p) not in seen and p.numel():
            seen.add(id(p))
            total += state_bytes(tuple(p.shape), name)
            quantised |= p.numel() >= MIN_8BIT_SIZE
    return total + (QMAPS_8BIT if name == "adamw8bit" and quantised else 0)


def build_scheduler(optimizer: torch.optim.Optimizer, spec: TrainSpec, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    import torch

    warmup = spec.warmup_steps(total)
    min_ratio = spec.final_lr() / spec.lr
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_factor(i, total, warmup, min_ratio))

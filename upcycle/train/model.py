"""The model a run trains: which MoE it is, how it is loaded (float32 masters, the experts kernel), what forward
runs under (the compute dtype, the LM loss in chunks), and the RouterTap that hands the router logits to the losses."""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

from ..arch import Target, family_for, target_for_config
from ..compat import enable_grouped_mm_autocast, experts_implementation
from ..errors import UpcycleError
from ..pages import release_unread_pages
from ..seeds import generator as seeded_generator
from ..source import read_header
from .distributed import DistEnv, mixed_precision
from .lm_loss import chunk_tokens, lm_loss_in_chunks
from .optim import optimizer_state_bytes, set_trainable
from .plan import Footprint, moe_shape
from .routing_hooks import RouterTap, find_routers
from .spec import OptimizerName, TrainSpec, TrainWhat

if TYPE_CHECKING:
    import torch
    from torch import nn


def moe_target(config: dict[str, Any], model: str) -> Target | None:
    """The native MoE target of a model's config; None for a dense model of a family upcycle reads, which trains as
    it is (no routers: no router losses and no load). Anything else is refused."""
    target = target_for_config(config)
    if target is not None:
        return target
    try:
        family_for(config.get("model_type"))
    except UpcycleError:
        raise UpcycleError(
            f"{model} is a {config.get('model_type')!r} model, which upcycle cannot train; give a dense model of a "
            "family upcycle converts, or a folder or Hub id written by `upcycle convert`"
        ) from None
    return None


def cap_seq_len(spec: TrainSpec, config: dict[str, Any]) -> tuple[TrainSpec, str | None]:
    limit = config.get("max_position_embeddings")
    if isinstance(limit, int) and spec.seq_len > limit:
        note = f"--seq-len {spec.seq_len} is above the model's limit of {limit} positions; training with {limit}"
        return replace(spec, seq_len=limit), note
    return spec, None


# --- precision --------------------------------------------------------------------------------------------------


def compute_dtype(spec: TrainSpec, device: torch.device) -> torch.dtype:
    import torch

    name = spec.dtype if spec.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


def compute_context(env: DistEnv, spec: TrainSpec, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """What forward runs under. The weights and AdamW states are always float32 (master weights: a bf16 weight
    rounds away updates below ~0.4% of itself, so lr ~1e-4 would barely move it); with a bf16 compute dtype the
    matmuls run in bf16 through FSDP2's mixed-precision policy under torchrun on GPUs, else through autocast."""
    import torch

    if dtype == torch.float32 or mixed_precision(env, spec) is not None:
        return contextlib.nullcontext()
    enable_grouped_mm_autocast(env.device.type, dtype)
    return torch.autocast(env.device.type, dtype=dtype)


@contextlib.contextmanager
def forward_context(model: nn.Module, env: DistEnv, spec: TrainSpec, dtype: torch.dtype) -> Iterator[None]:
    """What the step's and the evaluation's forwards run under: compute_context, and with --lm-loss chunked the
    model's loss taken a chunk of tokens at a time (lm_loss.py)."""
    with compute_context(env, spec, dtype):
        if spec.lm_loss == "model":
            yield
            return
        vocab = model.config.get_text_config().vocab_size
        with lm_loss_in_chunks(model, chunk_tokens(vocab)):
            yield


def use_deterministic_algorithms() -> None:
    """Kernels that give the same bits on every run (cuBLAS needs a fixed workspace, read when its handle is made,
    so this must run before the first matmul on the GPU). Ops with no deterministic kernel warn, not fail.
    Process-wide: run under process_state(), which puts both back."""
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)


@contextlib.contextmanager
def process_state(env: DistEnv) -> Iterator[None]:
    """The process-wide state a run changes, put back when it ends (also when it fails), so that `train()` leaves
    a notebook or a benchmark as it found it:

    - torch's global RNG (setup seeds it from --seed; a resumed run restores it from the checkpoint);
    - deterministic algorithms and CUBLAS_WORKSPACE_CONFIG (--deterministic: use_deterministic_algorithms);
    - transformers' progress bars, off for the run (loading, and save_pretrained's for every checkpoint and final/).
    Elsewhere: datasets' verbosity and bars are off only while reading (data._quiet_datasets). Not put back: the
    autocast rule for grouped_mm (compat), which is permanent and acts only under autocast."""
    import torch
    from transformers.utils import logging as hf_logging

    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    workspace = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    bars = hf_logging.is_progress_bar_enabled()
    devices = [env.device.index or 0] if env.device.type == "cuda" else []
    hf_logging.disable_progress_bar()
    try:
        with torch.random.fork_rng(devices=devices, device_type=env.device.type):
            yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        if workspace is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = workspace


# --- loading ----------------------------------------------------------------------------------------------------


def load_model(
    folder: Path, dtype: torch.dtype, spec: TrainSpec, device: torch.device, *, dense: bool = False
) -> nn.Module:
    """The model in `dtype` on `device`, with --experts-impl (a dense model has no experts kernel to choose)."""
    from transformers import AutoModelForCausalLM

    placement = {"device_map": str(device)} if device.type == "cuda" else {}  # straight onto the GPU
    kernel = {} if dense else {"experts_implementation": spec.experts_impl}
    try:
        with _quiet_loading():
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kernel, **placement)
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as exc:
        raise UpcycleError(f"transformers could not load {folder}: {exc}".splitlines()[0]) from None
    release_unread_pages(model, folder)  # the file pages of stacked experts and cast weights: counted once (pages.py)
    impl = experts_implementation(model)
    if device.type == "cuda" and not dense and impl == "eager" and spec.experts_impl != "eager":
        raise UpcycleError(
            f"the experts fell back to the eager per-expert loop (asked for {spec.experts_impl}), which is 4-11x "
            "slower on a GPU; install a torch with grouped_mm for this GPU, or pass --experts-impl eager to accept it"
        )
    return model.to(device)


def meta_model(folder: Path) -> nn.Module:
    """The model's modules on the meta device: shapes and parameter counts without reading a weight."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(folder)
    with torch.device("meta"), _quiet_zero_init():
        return AutoModelForCausalLM.from_config(cfg)


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """No "Loading weights" progress bar while the model loads (also outside a run: load_model on its own);
    transformers' setting is put back afterwards."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with _quiet_zero_init():
            yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _quiet_zero_init() -> Iterator[None]:
    """Qwen2-MoE's size-0 shared expert makes torch warn that initialising it does nothing; true, and noise here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
        yield


# --- routing and what trains ------------------------------------------------------------------------------------


def attach_routing(
    model: nn.Module, target: Target | None, config: dict[str, Any], spec: TrainSpec, *, seeded: bool = True
) -> RouterTap:
    """RouterTap on every MoE layer's router; then --train decides what stays trainable. A dense model (target None)
    gets a tap with no routers (it records nothing) and trains whole.

    Jitter and noise draw from the tap's own generators, seeded from --seed (not from torch's global RNG, which
    the run leaves to the model); checkpoints save their states. seeded=False: no generators (a meta-device model
    for --dry-run draws nothing)."""
    if target is None:
        return RouterTap({}, num_experts=1, top_k=1, renormalize=False, hidden_size=int(config["hidden_size"]))
    generator = seeded_generator("routing", spec.seed) if seeded else None
    routers = find_routers(model, target)
    experts, top_k, renorm = moe_shape(config, target)
    tap = RouterTap(
        routers,
        num_experts=experts,
        top_k=top_k,
        renormalize=renorm,
        capacity_factor=spec.capacity_factor,
        jitter=spec.jitter,
        noise=spec.router_noise,
        hidden_size=int(config["hidden_size"]),
        generator=generator,
        selection_bias=spec.selection_bias,
    )
    set_trainable(model, target, tap.layers, spec.train, list(tap.noise_modules.parameters()))
    return tap


def count_params(model: nn.Module, extra: list[nn.Parameter]) -> tuple[int, int]:
    """(total, trainable) parameters of the model and `extra` (the router noise weights), each counted once."""
    seen: dict[int, nn.Parameter] = {}
    for p in [*model.parameters(), *extra]:
        seen.setdefault(id(p), p)
    total = sum(p.numel() for p in seen.values())
    return total, sum(p.numel() for p in seen.values() if p.requires_grad)


# --- what the memory estimate reads from the model --------------------------------------------------------------


def footprint(
    folder: Path, target: Target | None, config: dict[str, Any], spec: TrainSpec
) -> tuple[Footprint, list[int]]:
    """The parameter counts and optimizer state of every --train and --optimizer choice (a dense model: --train all
    only), from a meta-device model (no weight is read), and the size and dtype of the weight files in `folder`;
    with the MoE layers."""
    meta = meta_model(folder)
    tap = attach_routing(meta, target, config, spec, seeded=False)
    noise = list(tap.noise_modules.parameters())
    tap.remove()
    params: dict[str, tuple[int, int]] = {}
    states: dict[str, dict[str, int]] = {}
    biggest: dict[str, int] = {}
    for what in get_args(TrainWhat) if target is not None else ("all",):
        if target is not None:
            set_trainable(meta, target, tap.layers, what, noise)
        params[what] = count_params(meta, noise)
        trainable = [p for p in [*meta.parameters(), *noise] if p.requires_grad]
        states[what] = {name: optimizer_state_bytes(trainable, name) for name in get_args(OptimizerName)}
        biggest[what] = max((p.numel() for p in trainable), default=0)
    stored = stored_weights(folder)
    restacked = 0 if stored.cast else stored.restacked_elements(meta) * 4  # float32; a cast copies all anyway
    footprint = Footprint(params, states, biggest, stored.size, stored.cast, stored.dtype, restacked)
    return footprint, list(tap.layers)


SAFETENSORS_FLOATS = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


@dataclass(frozen=True)
class StoredWeights:
    """What the memory estimate and final/'s dtype need of MODEL's weight files, from their safetensors headers
    alone (read once; no tensor is read)."""

    size: int  # bytes of the *.safetensors files
    elements: dict[str, int]  # safetensors dtype ("F32", "BF16", ...) -> elements stored in it
    shapes: frozenset[tuple[int, ...]]  # every stored tensor's shape

    @property
    def cast(self) -> bool:
        """Whether any tensor is stored in another dtype than float32 (loading it in float32 copies it)."""
        return any(dtype != "F32" for dtype in self.elements)

    @property
    def dtype(self) -> str:
        """The floating dtype that holds most of the weights' elements (MODEL's dtype: final/'s by default);
        float32 when there are none."""
        floats = {d: n for d, n in self.elements.items() if d in SAFETENSORS_FLOATS}
        return SAFETENSORS_FLOATS[max(floats, key=floats.__getitem__)] if floats else "float32"

    def restacked_elements(self, model: nn.Module) -> int:
        """Elements of MODEL's parameters that no stored tensor has the shape of: those transformers builds anew
        from several stored ones while loading (Mixtral's and Qwen2-MoE's per-expert tensors stacked into one
        [experts, ...] parameter), beside the file pages they were read from until loading ends (pages.py). A
        renamed tensor of the same shape is a view of the file, not a copy."""
        return sum(p.numel() for p in model.parameters() if tuple(p.shape) not in self.shapes)


def stored_weights(folder: Path) -> StoredWeights:
    """The headers of the *.safetensors files in `folder` (source.read_header); a file it refuses is left out
    here: loading will say what is wrong with it."""
    files = sorted(Path(folder).glob("*.safetensors"))
    elements: dict[str, int] = {}
    shapes: set[tuple[int, ...]] = set()
    for f in files:
        try:
            infos = read_header(f)
        except (OSError, UpcycleError):
            continue
        for info in infos:
            elements[info.dtype] = elements.get(info.dtype, 0) + math.prod(info.shape)
            shapes.add(info.shape)
    return StoredWeights(sum(f.stat().st_size for f in files), elements, frozenset(shapes))


def source_dtype(folder: Path) -> str:
    """MODEL's dtype (the one most of its weights are stored in), from the headers alone."""
    return stored_weights(folder).dtype


def save_dtype(spec: TrainSpec, folder: Path) -> torch.dtype:
    """final/'s dtype: --save-dtype, or with `source` MODEL's own (the dtype of most of its weights)."""
    import torch

    name = source_dtype(folder) if spec.save_dtype == "source" else spec.save_dtype
    return getattr(torch, name)


def identical_experts(model: nn.Module, target: Target, layers: list[int]) -> bool:
    """Whether every MoE layer's experts are still exact copies of each other (freshly cloned, no noise): then no
    routing can change the layer's output beyond the weight the kept experts get."""
    import torch

    for layer in layers:
        module = model.get_submodule(target.modules["experts"].format(layer=layer))
        tensors = list(module.parameters(recurse=False))
        children = list(module.children())
        if not tensors and children:  # one module per expert
            first = list(children[0].parameters())
            for child in children[1:]:
                if not all(torch.equal(a, b) for a, b in zip(first, child.parameters(), strict=True)):
                    return False
            continue
        for p in tensors:  # fused: (E, ...) per tensor
            if p.ndim >= 2 and not torch.equal(p, p[:1].expand_as(p)):
                return False
    return bool(layers)


def clone_warning(
    model: nn.Module, target: Target | None, config: dict[str, Any], spec: TrainSpec, layers: list[int]
) -> str | None:
    """The warning for --train router on identical experts: the LM loss cannot move, only the router losses."""
    if target is None or spec.train != "router" or not identical_experts(model, target, layers):
        return None
    _, _, renorm = moe_shape(config, target)
    effect = (
        "so no routing changes the LM loss: only the balance and z losses move"
        if renorm
        else "so routing changes the LM loss only through the total weight of the kept experts, not through which"
    )
    return (
        f"--train router on experts that are still identical copies of each other (freshly cloned) cannot learn "
        f"which expert suits a token, {effect}; to learn, train the experts too (--train all or --train experts) "
        "or convert with --noise so the experts differ"
    )

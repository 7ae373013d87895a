"""Every use of a private or version-dependent API of torch, transformers or datasets, in one place.

Each entry says what it reaches into, why, what happens without it, and the versions it was checked on; a
`PrivateApi` record per entry lets tests/test_compat_*.py fail with a clear message when an upgrade removes one.
Nothing else in upcycle imports an underscored name of those packages. The module sits on the bottom floor and
imports torch, transformers and datasets lazily, inside the functions.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass(frozen=True)
class PrivateApi:
    """One private or renamed API we depend on: `present()` says whether the installed versions still have it."""

    name: str  # what is reached into, as a dotted path
    checked_on: str  # the versions it was read and tested against
    used_for: str  # why upcycle needs it
    without: str  # what happens when it is gone
    present: Callable[[], bool]


# ================================================================================================================
# Train side (upcycle/train): checked on torch 2.13.0, transformers 5.25.0, datasets 5.2.0.
# ================================================================================================================

TRAIN_CHECKED_ON = "torch 2.13.0, transformers 5.25.0, datasets 5.2.0"


# --- the experts kernel transformers settled on ------------------------------------------------------------------


def experts_implementation(model: nn.Module) -> str:
    """The experts kernel transformers settled on (it may differ from the one asked for): the public
    `get_experts_implementation()` (transformers ≥ 5.23), else the private `config._experts_implementation`."""
    getter = getattr(model, "get_experts_implementation", None)
    value = getter().get("") if getter is not None else getattr(model.config, "_experts_implementation", None)
    return str(value) if value else "eager"


def _experts_implementation_present() -> bool:
    from transformers import PretrainedConfig, PreTrainedModel

    return hasattr(PreTrainedModel, "get_experts_implementation") or hasattr(
        PretrainedConfig(), "_experts_implementation"
    )


# --- grouped_mm under autocast -----------------------------------------------------------------------------------

# Process-wide and permanent: a dispatcher rule cannot be unregistered and transformers' helper stays wrapped. Both
# act only while autocast is on, so they change nothing outside `upcycle train`'s compute context.
_AUTOCAST_GROUPED_MM: dict[str, str] = {}  # device type -> how grouped_mm was made to follow autocast


def enable_grouped_mm_autocast(device_type: str, dtype: torch.dtype) -> str:
    """grouped_mm has no autocast rule (pytorch#174763), and transformers' experts kernel casts its input to the
    weight dtype, so under autocast with float32 weights the experts would silently run in float32 (on an H200 that
    made the MoE step slower with grouped_mm than with the eager loop). Make autocast cast both operands to `dtype`,
    as it does for F.linear (the eager experts), and check that it took:

    1. a dispatcher rule, torch.library.register_autocast("aten::_grouped_mm") (enough with torch 2.13 on CPU);
    2. else transformers' own grouped_mm helper, transformers.integrations.moe._grouped_mm, wrapped to cast both
       operands while autocast is on.
    Returns which one holds ("dispatcher", "transformers", or "none" with a warning: the experts stay float32).
    Once per device type per process."""
    import torch

    if device_type in _AUTOCAST_GROUPED_MM:
        return _AUTOCAST_GROUPED_MM[device_type]
    how = "none"
    with contextlib.suppress(RuntimeError, ValueError):
        torch.library.register_autocast("aten::_grouped_mm", device_type, dtype)
    if _grouped_mm_follows_autocast(device_type, dtype, via_transformers=False):
        how = "dispatcher"
    else:
        _wrap_transformers_grouped_mm()
        if _grouped_mm_follows_autocast(device_type, dtype, via_transformers=True):
            how = "transformers"
    if how == "none":
        warnings.warn(
            f"could not make grouped_mm follow autocast on {device_type}: the experts run in float32", stacklevel=3
        )
    _AUTOCAST_GROUPED_MM[device_type] = how
    return how


def _grouped_mm_follows_autocast(device_type: str, dtype: torch.dtype, *, via_transformers: bool) -> bool:
    """Does a float32 grouped_mm under autocast come out in `dtype`? (tiny operands; forward only)"""
    import torch

    if device_type == "cuda" and not torch.cuda.is_available():
        return False
    device = torch.device(device_type, torch.cuda.current_device()) if device_type == "cuda" else device_type
    x = torch.ones(32, 16, device=device)  # (S, H)
    w = torch.ones(2, 16, 16, device=device)  # (E, H, I)
    offs = torch.tensor([16, 32], dtype=torch.int32, device=device)
    try:
        with torch.autocast(device_type, dtype=dtype), torch.no_grad():
            if via_transformers:
                from transformers.integrations import moe

                y = moe._grouped_mm(x, w, offs=offs)
            else:
                y = torch.nn.functional.grouped_mm(x, w, offs=offs)
    except (RuntimeError, NotImplementedError, ImportError, AttributeError):
        return False
    return y.dtype == dtype


def _wrap_transformers_grouped_mm() -> None:
    """transformers.integrations.moe._grouped_mm(input, weight, offs), called by its grouped_mm experts forward:
    under autocast, cast both operands to the autocast dtype first (differentiably: the fp32 masters get grads)."""
    import torch

    try:
        from transformers.integrations import moe
    except ImportError:
        return
    original = getattr(moe, "_grouped_mm", None)
    if original is None or getattr(original, "_upcycle_autocast", False):
        return

    def grouped_mm(input: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        kind = input.device.type
        if torch.is_autocast_enabled(kind) and weight.is_floating_point():
            dt = torch.get_autocast_dtype(kind)
            return original(input.to(dt), weight.to(dt), offs=offs)
        return original(input, weight, offs=offs)

    grouped_mm._upcycle_autocast = True  # type: ignore[attr-defined]
    moe._grouped_mm = grouped_mm


def _grouped_mm_op_present() -> bool:
    import torch

    return hasattr(torch.ops.aten, "_grouped_mm") and hasattr(torch.library, "register_autocast")


def _transformers_grouped_mm_present() -> bool:
    try:
        from transformers.integrations import moe
    except ImportError:
        return False
    return callable(getattr(moe, "_grouped_mm", None))


# --- activation checkpointing: a renamed method ------------------------------------------------------------------


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer in backward (non-reentrant: frozen inputs need no grad hack). transformers 5.24
    renamed gradient_checkpointing_enable to activation_checkpointing_enable; 5.23 has only the old name."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _activation_checkpointing_present() -> bool:
    from transformers import PreTrainedModel

    return hasattr(PreTrainedModel, "activation_checkpointing_enable") or hasattr(
        PreTrainedModel, "gradient_checkpointing_enable"
    )


def trace_checkpointed_side_effects() -> None:
    """Let torch.compile trace a checkpointed decoder layer whose forward changes Python state, doing it once in the
    forward and not again in the recompute (`torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint`,
    a private config). Without it `--compile --grad-checkpointing` breaks the graph at every layer: the attention
    modules' `kernels.use_kernelized_func` sets and resets a context variable in each forward, and RouterTap's
    hooks record the routing, which dynamo refuses inside a checkpoint. Neither must happen again in a recompute
    (RouterTap ignores recomputes on purpose: compat.in_backward), so skipping them there is what an eager run does
    in effect (torchtitan sets it for the same reason). Process-wide; it changes nothing outside checkpointed
    regions. A torch without the setting compiles the checkpointed layers in pieces, as before: correct, slower."""
    import torch._dynamo

    if _checkpoint_side_effects_present():
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True


def _checkpoint_side_effects_present() -> bool:
    import torch._dynamo

    return hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint")


# --- the attention implementation, and attention without a mask ------------------------------------------------


def attention_implementation(model: nn.Module) -> str:
    """The attention implementation the model runs with ("sdpa", "eager", a registered name): transformers keeps it
    in the private `config._attn_implementation`."""
    return str(model.config._attn_implementation)


def _attention_implementation_present() -> bool:
    """The config field, and no mask from create_causal_mask for an attention implementation that is registered
    with no mask function (what upcycle/train/attention.py relies on)."""
    import torch
    from transformers import AttentionInterface, LlamaConfig
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import create_causal_mask

    AttentionInterface.register("upcycle_causal_sdpa", sdpa_attention_forward)
    config = LlamaConfig(hidden_size=8, num_attention_heads=2, num_hidden_layers=1, vocab_size=8)
    if not hasattr(config, "_attn_implementation"):
        return False
    config._attn_implementation = "upcycle_causal_sdpa"
    packed = torch.tensor([[0, 1, 0, 1]])  # two sequences: SDPA would get a block-diagonal mask
    return create_causal_mask(config, torch.zeros(1, 4, 8), None, None, position_ids=packed) is None


# --- a Hub dataset's identity for the token cache ----------------------------------------------------------------


def dataset_fingerprint(dataset: Any) -> str:
    """datasets' own hash of a loaded Dataset (`Dataset._fingerprint`, private): it changes when the data does, so
    the token cache key of a Hub dataset follows it."""
    return str(dataset._fingerprint)


def _dataset_fingerprint_present() -> bool:
    from datasets import Dataset

    return isinstance(getattr(Dataset.from_dict({"text": ["a"]}), "_fingerprint", None), str)


# --- is autograd running a backward pass? ------------------------------------------------------------------------


def in_backward() -> bool:
    """True while autograd runs a backward pass (torch._C._current_graph_task_id, private): a layer's forward then is
    activation checkpointing's recompute, which RouterTap must neither record nor draw new noise for.

    False while torch.compile traces a forward (`--compile`): the traced code is a forward, and a compiled
    checkpoint's recompute runs inside the compiled backward, never through the hooks again. Asking autograd there
    would break the graph at every router (dynamo cannot trace the call)."""
    import torch

    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


def _graph_task_id_present() -> bool:
    import torch

    return callable(getattr(torch._C, "_current_graph_task_id", None))


def _loss_function_setter_present() -> bool:
    from transformers import PreTrainedModel

    prop = getattr(PreTrainedModel, "loss_function", None)
    return isinstance(prop, property) and prop.fset is not None


TRAIN_PRIVATE_APIS: tuple[PrivateApi, ...] = (
    PrivateApi(
        "transformers PreTrainedModel.get_experts_implementation / config._experts_implementation",
        TRAIN_CHECKED_ON,
        "which experts kernel a loaded model runs (the refusal of a silent eager fallback on a GPU)",
        "every model reads as 'eager': GPU runs are refused unless --experts-impl eager",
        _experts_implementation_present,
    ),
    PrivateApi(
        "torch aten::_grouped_mm + torch.library.register_autocast",
        TRAIN_CHECKED_ON,
        "an autocast rule so that grouped_mm experts run in bf16 under --dtype bf16",
        "the transformers fallback below is tried; failing that a warning and float32 experts",
        _grouped_mm_op_present,
    ),
    PrivateApi(
        "transformers.integrations.moe._grouped_mm",
        TRAIN_CHECKED_ON,
        "the fallback autocast cast when the dispatcher rule does not take",
        "with no dispatcher rule either, a warning and float32 experts",
        _transformers_grouped_mm_present,
    ),
    PrivateApi(
        "transformers activation_checkpointing_enable (5.24+) / gradient_checkpointing_enable (5.23)",
        TRAIN_CHECKED_ON,
        "--grad-checkpointing",
        "--grad-checkpointing fails with AttributeError",
        _activation_checkpointing_present,
    ),
    PrivateApi(
        "torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint",
        TRAIN_CHECKED_ON,
        "--compile with --grad-checkpointing traced as one graph",
        "the checkpointed layers compile in pieces, a graph break at each (correct, slower)",
        _checkpoint_side_effects_present,
    ),
    PrivateApi(
        "transformers config._attn_implementation; masking_utils builds no mask for an unregistered mask function",
        TRAIN_CHECKED_ON,
        "text runs attend with SDPA and no mask (upcycle/train/attention.py)",
        "a read of _attn_implementation fails; if a mask is built anyway, the numbers stay the same (a mask is "
        "passed, so SDPA's is_causal is off) and tests/test_train_syncs.py counts the read again",
        _attention_implementation_present,
    ),
    PrivateApi(
        "transformers PreTrainedModel.loss_function setter; a causal LM's forward hands lm_head's output to it",
        TRAIN_CHECKED_ON,
        "--lm-loss chunked (upcycle/train/lm_loss.py: the head passes its input through for one forward)",
        "--lm-loss chunked fails with AttributeError; a forward that changes the logits before its loss fails "
        "tests/test_train_lm_loss.py for that model type",
        _loss_function_setter_present,
    ),
    PrivateApi(
        "datasets Dataset._fingerprint",
        TRAIN_CHECKED_ON,
        "the token cache key of a datasets Hub id",
        "--data ORG/NAME fails with AttributeError",
        _dataset_fingerprint_present,
    ),
    PrivateApi(
        "torch._C._current_graph_task_id",
        TRAIN_CHECKED_ON,
        "RouterTap telling a checkpointed layer's recompute from a forward",
        "every forward fails with AttributeError",
        _graph_task_id_present,
    ),
)


# ================================================================================================================
# Convert side (upcycle/convert, upcycle/report, upcycle/source): checked on transformers 5.25.0, torch 2.13.0.
# ================================================================================================================

CONVERT_CHECKED_ON = "torch 2.13.0, transformers 5.25.0"


# --- transformers' 5.x weight loader, behind `verify --layerwise`'s streamed model -----------------------------


@dataclass(frozen=True)
class WeightLoader:
    """transformers' own checkpoint loader, taken apart so that verify --layerwise can load one unit at a time:
    the model's key renamings and expert-fusing converters, and the call that applies them to a state dict."""

    conversion_mapping: Callable[[Any], list]  # model -> its WeightRenaming/WeightConverter rules
    renaming: type
    converter: type
    rename_source_key: Callable[..., tuple[str, Any]]  # (key, renamings, converters, prefix, state) -> (name, rule)
    load_state_dict: Callable[[Any, dict, Any], Any]  # (model, state, config)
    load_config: Callable[..., Any]  # LoadStateDictConfig(dtype=, weight_mapping=)


def weight_loader() -> WeightLoader | None:
    """The loader's pieces (transformers.conversion_mapping, core_model_loading, modeling_utils; none of them is
    exported at the top level), or None when this transformers lacks them."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            convert_and_load_state_dict_in_model,
            rename_source_key,
        )
        from transformers.modeling_utils import LoadStateDictConfig
    except ImportError:
        return None
    return WeightLoader(
        get_model_conversion_mapping,
        WeightRenaming,
        WeightConverter,
        rename_source_key,
        convert_and_load_state_dict_in_model,
        LoadStateDictConfig,
    )


def init_weights(model: nn.Module, module: nn.Module) -> None:
    """The model's own initialisation of one submodule (PreTrainedModel._init_weights, private): what from_pretrained
    runs to compute non-persistent buffers such as rotary tables."""
    model._init_weights(module)


def tied_weights_keys(model: nn.Module) -> dict[str, str]:
    """parameter -> the parameter it is tied to (PreTrainedModel.all_tied_weights_keys, set by post_init)."""
    return dict(getattr(model, "all_tied_weights_keys", None) or {})


def file_size(text: str) -> int:
    """'5GB', '500MB' -> bytes, as save_pretrained's max_shard_size reads it (transformers.utils.hub, not exported)."""
    from transformers.utils.hub import convert_file_size_to_int

    return convert_file_size_to_int(text)


def drop_quantizer(model: nn.Module) -> None:
    """Forget a GGUF-dequantized model's quantizer (the weights are plain floats now), so save_pretrained writes them
    as such: the `hf_quantizer` attribute from_pretrained sets."""
    model.hf_quantizer = None


def _weight_loader_present() -> bool:
    return weight_loader() is not None


def _init_weights_present() -> bool:
    from transformers import PreTrainedModel

    return callable(getattr(PreTrainedModel, "_init_weights", None))


def _tied_weights_keys_present() -> bool:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
                         tie_word_embeddings=True)  # fmt: skip
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return tied_weights_keys(model) == {"lm_head.weight": "model.embed_tokens.weight"}


def _file_size_present() -> bool:
    try:
        return file_size("2KB") == 2000
    except ImportError:
        return False


def _hf_quantizer_present() -> bool:
    import inspect

    from transformers import modeling_utils

    return "hf_quantizer" in inspect.getsource(modeling_utils.PreTrainedModel.from_pretrained)


def _generic_loader_present() -> bool:
    try:
        from transformers.conversion_mapping import register_checkpoint_conversion_mapping  # noqa: F401
        from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter  # noqa: F401
    except ImportError:
        return False
    return True


CONVERT_PRIVATE_APIS: tuple[PrivateApi, ...] = (
    PrivateApi(
        "transformers conversion_mapping.get_model_conversion_mapping, core_model_loading.{WeightRenaming, "
        "WeightConverter, rename_source_key, convert_and_load_state_dict_in_model}, modeling_utils.LoadStateDictConfig",
        CONVERT_CHECKED_ON,
        "verify --layerwise: loading one unit of a model at a time with transformers' own renaming and expert fusing",
        "verify --layerwise refuses with 'needs transformers' 5.x weight loader' (--whole still works)",
        _weight_loader_present,
    ),
    PrivateApi(
        "transformers PreTrainedModel._init_weights",
        CONVERT_CHECKED_ON,
        "verify --layerwise: computing non-persistent buffers (rotary tables) of a model built on the meta device",
        "verify --layerwise fails with AttributeError",
        _init_weights_present,
    ),
    PrivateApi(
        "transformers PreTrainedModel.all_tied_weights_keys",
        CONVERT_CHECKED_ON,
        "verify --layerwise: loading a tied head from the embedding's checkpoint key",
        "a tied model's head reads as missing (zeros) and verify --layerwise fails it",
        _tied_weights_keys_present,
    ),
    PrivateApi(
        "transformers.utils.hub.convert_file_size_to_int",
        CONVERT_CHECKED_ON,
        "--max-shard-size (convert) and UPCYCLE_MEMORY_LIMIT / --memory sizes (verify)",
        "convert and verify fail with ImportError",
        _file_size_present,
    ),
    PrivateApi(
        "transformers PreTrainedModel.hf_quantizer (set by from_pretrained)",
        CONVERT_CHECKED_ON,
        "saving a dequantized GGUF model as plain safetensors",
        "save_pretrained may try to write the GGUF quantization back",
        _hf_quantizer_present,
    ),
    PrivateApi(
        "transformers conversion_mapping.register_checkpoint_conversion_mapping, core_model_loading.{WeightConverter, "
        "Concatenate, MergeModulelist} (in upcycle/generic/modeling_upcycle_moe.py, which ships as remote code and "
        "so cannot import upcycle.compat)",
        CONVERT_CHECKED_ON,
        "the generic wrapper loading its per-expert checkpoint keys into fused expert tensors",
        "models written with --target generic fail to load",
        _generic_loader_present,
    ),
)

"""Causal attention without a mask for text training: the same SDPA call, without the device read to build none.

On unpadded, unpacked text (the blocks of `upcycle train` on a text corpus) every model we train attends causally,
and transformers' SDPA path ends up calling `scaled_dot_product_attention(..., attn_mask=None, is_causal=True)`.
To decide that, each forward first looks for packed sequences in the position ids it made itself
(`masking_utils.find_packed_sequence_indices`), a read of a device value: one host sync per micro-batch, which on
a GPU waits for every queued kernel. Under `torch.compile` that check cannot run, so the mask is built as a
(B, 1, S, S) tensor and handed to SDPA, which then cannot use its flash kernel.

transformers builds no mask for an attention implementation that has none registered with its mask functions (the
path TGI and vLLM use). `causal_attention_without_mask` registers SDPA's own forward under another name and
switches the model to it, where the mask would be plain causal anyway: the same kernel on the same arguments, so
the same numbers to the bit (tests/test_train_attention.py), with no read and no (S, S) tensor. Conversations keep
SDPA and its masks: their packed position ids are what the mask is built from.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..compat import attention_implementation

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedConfig

CAUSAL_SDPA = "upcycle_causal_sdpa"  # SDPA's forward, registered under a name that has no mask function

# Model types whose decoder, given no attention mask, attends causally and nothing else (no bidirectional prefix,
# no chunked or image masks), so that a missing mask means exactly the causal one; sliding windows are handled by
# `plain_causal`. Each one is checked bit for bit in tests/test_train_attention.py.
PLAIN_CAUSAL_TYPES = frozenset(
    {
        # the MoE targets
        "mixtral",
        "qwen2_moe",
        "qwen3_moe",
        "granitemoe",
        "flex_olmo",
        "ernie4_5_moe",
        "hunyuan_v1_moe",
        # dense parents (upcycle train --dense, the study's baseline)
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "phi3",
        "gemma",
        "olmo2",
        "granite",
        "ernie4_5",
        "hunyuan_v1_dense",
        # dense families that only --target generic converts (not Gemma 2: transformers has no SDPA path for it)
        "gpt2",
        "gemma3_text",
        "phi",
        "olmo",
        "glm",
        "glm4",
    }
)


def plain_causal(config: PreTrainedConfig, seq_len: int) -> bool:
    """Whether every layer of this model attends causally over blocks of `seq_len` tokens with no other limit: a
    known model type, and each sliding window (if any) longer than the block (transformers also skips the mask
    then; a window of 0 or None is no window)."""
    cfg = config.get_text_config()
    if cfg.model_type not in PLAIN_CAUSAL_TYPES or getattr(cfg, "use_bidirectional_attention", False):
        return False
    window = getattr(cfg, "sliding_window", None)
    default = "sliding_attention" if window else "full_attention"
    kinds = set(getattr(cfg, "layer_types", None) or [default])
    if kinds - {"full_attention", "sliding_attention"}:
        return False
    return "sliding_attention" not in kinds or bool(window and seq_len < window)


def causal_attention_without_mask(model: nn.Module, seq_len: int) -> str:
    """Switch `model` from SDPA to CAUSAL_SDPA where that gives the same numbers (see the module docstring);
    returns the attention implementation the model runs with. Only for unpadded, unpacked blocks of `seq_len`."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    current = attention_implementation(model)
    if current != "sdpa" or not plain_causal(model.config, seq_len):
        return current
    AttentionInterface.register(CAUSAL_SDPA, sdpa_attention_forward)
    model.set_attn_implementation(CAUSAL_SDPA)
    return CAUSAL_SDPA

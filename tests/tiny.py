"""Tiny random dense models of every supported family, saved the way the Hub stores them."""

from __future__ import annotations

from pathlib import Path

import torch

BASE = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)

FAMILIES = {
    "llama": dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "mistral": dict(sliding_window=None, head_dim=16),
    "qwen2": dict(),
    "qwen3": dict(head_dim=16),
    # Phi-3 stores q|k|v and gate|up fused; its pad id (32000) must fit the tiny vocabulary
    "phi3": dict(pad_token_id=0),
    # Gemma v1: tied embeddings and head_dim ≠ hidden/heads, as in the real 2B/7B (256 ≠ 2048/8)
    "gemma": dict(head_dim=16, pad_token_id=0, tie_word_embeddings=True, hidden_act="gelu_pytorch_tanh"),
    # OLMo 2's eps (1e-5) and rope theta differ from FlexOlmo's defaults (1e-6, 5e5): copying them is tested
    "olmo2": dict(rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    # every Granite multiplier away from 1, so that dropping one shows in the logits
    "granite": dict(
        embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.0625, logits_scaling=8.0
    ),
    "ernie4_5": dict(head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "hunyuan_v1_dense": dict(head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
}

# Families that only `--target generic` converts, in their own field names, with the quirks that matter: GPT-2's
# Conv1D MLP and tied embeddings, Gemma 2's sandwich norms, softcapping and sliding window, Gemma 3's per-layer-type
# RoPE and q/k norms, Phi's partial rotary and biased ungated MLP, OLMo's non-parametric LayerNorm and clip_qkv,
# GLM's fused gate_up MLP, partial rotary and q/k/v biases (GLM-4: also sandwich norms).
_LLAMA_LIKE = {k: v for k, v in BASE.items() if k != "rms_norm_eps"} | {"head_dim": 16}
GENERIC_FAMILIES = {
    "gpt2": dict(vocab_size=128, n_embd=32, n_layer=4, n_head=4, n_positions=256, bos_token_id=1, eos_token_id=2),
    "gemma2": dict(
        _LLAMA_LIKE,
        rms_norm_eps=1e-6,
        sliding_window=8,
        query_pre_attn_scalar=16,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        pad_token_id=0,
    ),
    "gemma3_text": dict(
        _LLAMA_LIKE,
        rms_norm_eps=1e-6,
        sliding_window=8,
        query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "full_attention"] * 2,
        pad_token_id=0,
    ),
    "phi": dict(_LLAMA_LIKE, head_dim=None, num_key_value_heads=4, partial_rotary_factor=0.5),
    "olmo": dict(_LLAMA_LIKE, clip_qkv=8.0, pad_token_id=0),
    "glm": dict(_LLAMA_LIKE, rms_norm_eps=1e-6, partial_rotary_factor=0.5, attention_bias=True, pad_token_id=0),
    "glm4": dict(_LLAMA_LIKE, rms_norm_eps=1e-6, partial_rotary_factor=0.5, attention_bias=True, pad_token_id=0),
}


def tiny_config(family: str, **overrides):
    from transformers import AutoConfig

    if family in GENERIC_FAMILIES:
        kwargs = {k: v for k, v in {**GENERIC_FAMILIES[family], **overrides}.items() if v is not None}
        return AutoConfig.for_model(family, **kwargs)
    kwargs = {**BASE, **FAMILIES[family], **overrides}
    return AutoConfig.for_model(family, **kwargs)


def save_tokenizer(folder: Path, vocab_size: int = 128) -> None:
    """A small byte-level BPE tokenizer, saved as tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in "abcdefghijklmnopqrstuvwxyz .,'ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789":
        if len(vocab) >= vocab_size:
            break
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)


def make_dense(
    folder: Path,
    family: str = "llama",
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    shard_size: str | None = "40KB",
    tokenizer: bool = True,
    **overrides,
) -> Path:
    """Save a random tiny dense model; by default sharded small so the index path is always exercised."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    with torch.no_grad():  # random norms and biases, so copying them wrong shows in the logits
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "norm" in name else 0.0))
    folder = Path(folder)
    if shard_size:
        model.save_pretrained(folder, max_shard_size=shard_size)
    else:
        model.save_pretrained(folder)
    if tokenizer:
        save_tokenizer(folder, config.vocab_size)
    return folder

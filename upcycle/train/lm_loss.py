"""The LM loss in chunks of tokens (`--lm-loss chunked`): never the whole (tokens, vocab) logits at once.

The model's own loss (`--lm-loss model`, the default) computes the output head over every token of a micro-batch,
then transformers' `ForCausalLMLoss` upcasts those logits to float32 and takes the cross-entropy, whose backward
keeps a float32 log-softmax: about 18 bytes per token per vocabulary entry in bf16, 16 in fp32 (memory.py). For
SmolLM2's 49,152 entries at 8 × 2,048 tokens that is 12 GiB, half the step with activation checkpointing; for
Qwen2.5's 151,936 it is most of the step.

`--lm-loss chunked` computes the same loss a chunk of tokens at a time, and its gradients with it (the approach of
Liger-Kernel's fused linear cross-entropy, written here in plain torch): for each chunk of C tokens the logits
(C, V), their float32 copy, the softmax and the gradient of the logits live only while that chunk is worked on;
the gradients of the head's input (N, H) and weight (V, H, float32) are summed as the chunks go and handed over
in backward. The arithmetic of each logit, its float32 upcast, the log-sum-exp and the mean over the predicted
tokens are those of `ForCausalLMLoss`; the sums over the vocabulary and the tokens run in another order, so the
loss and gradients agree to float32 rounding, not to the bit (tests/test_train_lm_loss.py). Per chunk the FLOPs are
those of the unchunked head: its forward, and the two products of its backward.

How it reaches inside the model's forward (so that FSDP2 has the head's weight gathered, and torch.compile traces
it): for the duration of a forward, the head returns its input unchanged and the model's `loss_function` (a
transformers setter) is this module's loss, given that input and the head. That holds for the model types in
CHUNKED_TYPES, whose causal-LM forward hands the head's output straight to `loss_function` (Granite and
GraniteMoe divide it by `logits_scaling` first, which the head's linearity carries through). The forward's `logits`
are then the final hidden states: the step and the evaluation read only the loss.

Legend: N tokens (batch·seq), C tokens in a chunk, V vocabulary, H hidden size.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..errors import UpcycleError

if TYPE_CHECKING:
    from torch import nn

IGNORE = -100  # transformers' ignore_index: labels that take no part in the loss

# Causal-LM forwards that hand `lm_head(hidden)` (Granite's: divided by a constant) to `loss_function` and use
# the logits for nothing else; each checked against the model's own loss in tests/test_train_lm_loss.py.
CHUNKED_TYPES = frozenset(
    {
        "mixtral",
        "qwen2_moe",
        "qwen3_moe",
        "granitemoe",
        "flex_olmo",
        "ernie4_5_moe",
        "hunyuan_v1_moe",
        # the dense families upcycle converts natively (their parents: upcycle train --dense, the study's baseline)
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
    }
)

CHUNK_ELEMENTS = 1 << 26  # logits a chunk holds at most (C·V): 256 MiB in float32


def chunk_tokens(vocab: int) -> int:
    """C: the largest power of two with C·V ≤ CHUNK_ELEMENTS, at least 64 (SmolLM2's 49,152: 1,024;
    Qwen2.5's 151,936: 256)."""
    return max(64, 1 << max(0, (CHUNK_ELEMENTS // vocab).bit_length() - 1))


class _ChunkedCrossEntropy(torch.autograd.Function):
    """mean over kept tokens of -log softmax(h·Wᵀ)[label], in chunks; gradients computed in forward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int, compute: torch.dtype
    ) -> torch.Tensor:
        # hidden (N, H) the head's input; weight (V, H) the head's; labels (N,) int64, IGNORE where no loss
        kept = labels != IGNORE  # (N,)
        count = kept.sum()  # () the tokens the mean is over; 0 gives nan, as ForCausalLMLoss
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]  # a frozen head: no (V, H) grad
        grad_hidden = torch.empty_like(hidden) if want_hidden else None  # (N, H)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        w = weight.to(compute)  # (V, H) what the head multiplies by (autocast's cast under bf16 mixed precision)
        scale = 1.0 / count.float()  # () d(mean)/d(each kept token's loss)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk):
                h = hidden[start : start + chunk].to(compute)  # (C, H)
                y = labels[start : start + chunk]  # (C,)
                keep = kept[start : start + chunk]  # (C,)
                z = (h @ w.t()).float()  # (C, V) the logits, upcast as ForCausalLMLoss does
                target = y.clamp_min(0).unsqueeze(1)  # (C, 1) a valid index for ignored rows too
                picked = z.gather(1, target).squeeze(1)  # (C,) the label's logit
                # log-sum-exp as torch.logsumexp computes it (max + log Σ exp(z - max)), in place of the logits
                # rather than in two more (C, V) temporaries
                top = z.amax(dim=-1, keepdim=True)  # (C, 1)
                sums = z.sub_(top).exp_().sum(dim=-1, keepdim=True)  # (C, V) now exp(z - max); (C, 1)
                lse = (top + sums.log()).squeeze(1)  # (C,)
                total += torch.where(keep, lse - picked, 0.0).sum()
                if grad_hidden is None and grad_weight is None:  # evaluation: the loss alone
                    continue
                # d loss / d z = (softmax(z) - onehot(y)) / count on kept rows, 0 on the others
                g = z.div_(sums)  # (C, V) softmax, in place
                g.scatter_add_(1, target, torch.full_like(picked, -1.0).unsqueeze(1))
                g.mul_((keep.float() * scale).unsqueeze(1))
                grad = g.to(compute)  # (C, V) as autograd hands it to the head's matmul (g itself in fp32)
                del z, g  # this chunk's float32 logits go before the next chunk's are made
                if grad_hidden is not None:
                    grad_hidden[start : start + chunk] = (grad @ w).to(hidden.dtype)  # (C, H)
                if grad_weight is not None and compute == torch.float32:
                    grad_weight.addmm_(grad.t(), h)  # (V, H) summed in place
                elif grad_weight is not None:
                    grad_weight += grad.t() @ h  # (V, H): the chunk's product in the compute dtype, summed in fp32
                del grad
        ctx.save_for_backward(grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype))
        return total * scale

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            None if grad_hidden is None else grad_hidden * grad_out.to(grad_hidden.dtype),
            None if grad_weight is None else grad_weight * grad_out.to(grad_weight.dtype),
            None,
            None,
            None,
        )


def chunked_causal_lm_loss(
    hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor, chunk: int, compute: torch.dtype | None = None
) -> torch.Tensor:
    """() float32: ForCausalLMLoss of head(hidden) against labels (shifted by one here), in chunks of `chunk`
    tokens. hidden (B, S, H), labels (B, S); compute: the dtype the head multiplies in (default: autocast's when it
    is on, else the hidden states')."""
    if head.bias is not None:
        raise UpcycleError("--lm-loss chunked: this model's output head has a bias; use --lm-loss model")
    if compute is None:
        device = hidden.device.type
        compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    shifted = F.pad(labels, (0, 1), value=IGNORE)[..., 1:]  # (B, S) token t predicts t + 1; the last predicts none
    flat = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    return _ChunkedCrossEntropy.apply(flat, head.weight, shifted.reshape(-1).to(flat.device), chunk, compute)


def _passthrough(hidden: torch.Tensor) -> torch.Tensor:
    return hidden


@contextmanager
def lm_loss_in_chunks(model: nn.Module, chunk: int) -> Iterator[None]:
    """For the forwards inside: `model(..., labels=...)` computes its loss with chunked_causal_lm_loss (the module
    docstring says how); its `logits` are the final hidden states."""
    head = model.get_output_embeddings()
    had_loss = "_loss_function" in vars(model)
    saved_loss = vars(model).get("_loss_function")

    def loss_function(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int, **kwargs: Any) -> torch.Tensor:
        return chunked_causal_lm_loss(logits, head, labels, chunk)

    head.forward = _passthrough  # an instance attribute over the class's forward, taken back below
    model.loss_function = loss_function
    try:
        yield
    finally:
        del head.forward
        if had_loss:
            model.loss_function = saved_loss
        else:
            del model._loss_function


def _model_type(config: Any) -> str | None:
    """The text model's type from a transformers config, object or dict."""
    if isinstance(config, dict):
        return config.get("text_config", config).get("model_type")
    return config.get_text_config().model_type


def chunked_available(config: Any) -> bool:
    """Whether --lm-loss chunked can run on a model with this config (a transformers config, object or dict)."""
    return _model_type(config) in CHUNKED_TYPES


def check_chunked(config: Any) -> None:
    """Refuse --lm-loss chunked for a model whose forward is not known to hand the head's output to its loss."""
    if not chunked_available(config):
        raise UpcycleError(
            f"--lm-loss chunked is not available for model type {_model_type(config)!r} (it is for: "
            f"{', '.join(sorted(CHUNKED_TYPES))}); use --lm-loss model"
        )

"""Net2Net widening of a Llama's FFNs (Chen et al. 2016, "Net2Net", arXiv:1511.05641), function-preserving.

The study's equal-active-compute dense control: the parent's FFN grown from I to I' neurons so that the dense model
has as many parameters per token as the MoE. Neuron j of a SwiGLU FFN computes silu(g_j·x)·(u_j·x) and adds it,
times column j of the down-projection, to the output. Split j into c copies with the same gate and up rows and
each 1/c of its down column, and the output is unchanged. The first I neurons are the parent's; the I' − I new
ones copy neurons drawn without replacement (cycling if I' > 2I).

Symmetry breaking: copies with identical weights get identical gradients and stay identical. Noise is added to
the copies' down columns with zero sum over the copies of each neuron, so their sum, and with it the function,
stays the parent's exactly (to float rounding), while the copies' gate and up rows now get different gradients.
"""

from __future__ import annotations

import math

import torch


def split_index(intermediate: int, wider: int, seed: int = 0) -> torch.Tensor:
    """Source neuron of each of the WIDER neurons: 0..I-1 first, then the copied ones."""
    if wider < intermediate:
        raise ValueError(f"cannot widen {intermediate} neurons to {wider}")
    g = torch.Generator().manual_seed(seed)
    extra = wider - intermediate
    rounds = math.ceil(extra / intermediate) if extra else 0
    picks = torch.cat([torch.randperm(intermediate, generator=g) for _ in range(rounds)] or [torch.empty(0)])
    return torch.cat([torch.arange(intermediate), picks[:extra].long()])


def widen_mlp(
    gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, index: torch.Tensor, noise: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate, up, down) of the widened FFN; gate/up are (I, H), down (H, I). NOISE is relative to down's std."""
    counts = torch.bincount(index, minlength=gate.shape[0]).to(down.dtype)
    new_down = down[:, index] / counts[index]
    if noise:
        g = torch.Generator().manual_seed(seed)
        eps = torch.randn(new_down.shape, generator=g, dtype=down.dtype) * noise * down.std()
        mean = torch.zeros_like(down).index_add_(1, index, eps) / counts
        new_down = new_down + (eps - mean[:, index])  # zero for neurons with one copy; zero-sum over the copies
    return gate[index].clone(), up[index].clone(), new_down


def widen_llama(model, wider: int, noise: float = 0.0, seed: int = 0):
    """A new LlamaForCausalLM like MODEL with `wider` FFN neurons per layer, computing the same function."""
    from transformers import LlamaForCausalLM

    cfg = model.config.__class__.from_dict(model.config.to_dict())
    cfg.intermediate_size = wider
    out = LlamaForCausalLM(cfg).to(next(model.parameters()).dtype)
    state = {k: v for k, v in model.state_dict().items() if ".mlp." not in k}
    for i, layer in enumerate(model.model.layers):
        m = layer.mlp
        index = split_index(m.gate_proj.weight.shape[0], wider, seed + i)
        gate, up, down = widen_mlp(m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight, index, noise, seed + i)
        state |= {
            f"model.layers.{i}.mlp.gate_proj.weight": gate,
            f"model.layers.{i}.mlp.up_proj.weight": up,
            f"model.layers.{i}.mlp.down_proj.weight": down,
        }
    missing, unexpected = out.load_state_dict(state, strict=False)
    if [k for k in missing if k != "lm_head.weight"] or unexpected:
        raise RuntimeError(f"widening: missing {missing}, unexpected {unexpected}")
    if cfg.tie_word_embeddings:
        out.tie_weights()
    return out

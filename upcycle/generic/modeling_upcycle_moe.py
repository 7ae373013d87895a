"""upcycle's generic MoE wrapper: the dense model's own architecture with the MLP of chosen layers made an MoE block.

Shipped beside the weights of every `--target generic` checkpoint (it imports only torch and transformers), so that
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` loads it without upcycle installed.

`UpcycleMoeForCausalLM(config)` builds the dense model's own causal-LM class (GPT2LMHeadModel, Gemma2ForCausalLM,
...) on this config, as a subclass of both, and swaps the MLP of each layer in `config.moe_layers` for an
`UpcycleMoeBlock`. Attention, norms, embeddings, softcapping, caches and generation stay the dense class's own.

The block routes like the native transformers MoE classes (softmax over all experts in float32, top-k, optional
renormalisation) and runs its experts through transformers' `use_experts_implementation`, so `grouped_mm` works.
Each expert has the dense MLP's shape, activation, biases and weight layout. On disk every expert keeps the dense
MLP's own tensor names (`{mlp}.experts.{e}.c_fc.weight`, ...); the loader fuses them into 3-D tensors.

Legend: T tokens (batch·seq, flattened), E experts, k experts per token, H hidden size, I expert size.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter
from transformers.integrations import use_experts_implementation
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from .configuration_upcycle_moe import UpcycleMoeConfig

CODE_FILES = ("configuration_upcycle_moe.py", "modeling_upcycle_moe.py")
AUTO_MAP = {
    "AutoConfig": "configuration_upcycle_moe.UpcycleMoeConfig",
    "AutoModelForCausalLM": "modeling_upcycle_moe.UpcycleMoeForCausalLM",
}


class UpcycleMoeRouter(nn.Module):
    """Returns (logits, top-k weights, top-k experts), like transformers' Qwen3MoeTopKRouter. With
    config.router_bias, `e_score_correction_bias` (E,) is added to the probabilities to choose the experts (as in
    Ernie 4.5-MoE); the weights stay the unbiased probabilities of the chosen ones."""

    def __init__(self, config: UpcycleMoeConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.num_experts
        self.norm_topk_prob = config.norm_topk_prob
        self.hidden_dim = config.hidden_size
        self.weight = nn.Parameter(torch.zeros(self.num_experts, self.hidden_dim))
        if getattr(config, "router_bias", False):
            self.e_score_correction_bias = nn.Parameter(torch.zeros(self.num_experts), requires_grad=False)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)  # (T, H)
        router_logits = F.linear(hidden_states, self.weight)  # (T, E)
        router_probs = F.softmax(router_logits, dtype=torch.float, dim=-1)  # (T, E) float32
        bias = getattr(self, "e_score_correction_bias", None)  # (E,) or None
        if bias is None:
            top_value, top_index = torch.topk(router_probs, self.top_k, dim=-1)  # (T, k), (T, k)
        else:
            top_index = torch.topk(router_probs + bias.float(), self.top_k, dim=-1).indices  # (T, k)
            top_value = router_probs.gather(-1, top_index)  # (T, k) unbiased
        if self.norm_topk_prob:
            top_value /= top_value.sum(dim=-1, keepdim=True)  # (T, k), rows sum to 1
        return router_logits, top_value.to(router_logits.dtype), top_index


def _gated(mlp: dict) -> bool:
    """Gated: separate gate and up projections, or one fused `gate_up` (GLM, Phi-3: gate rows first)."""
    return bool(mlp.get("gate") or mlp.get("gate_up"))


def _first_name(mlp: dict) -> str:
    """The fused first projection: gate and up together for a gated MLP, up alone otherwise."""
    return "gate_up_proj" if _gated(mlp) else "up_proj"


@use_experts_implementation
class UpcycleMoeExperts(nn.Module):
    """E copies of the dense MLP as fused tensors: gate_up_proj (E, 2I, H) or up_proj (E, I, H), down_proj (E, H, I);
    transposed ([in, out], GPT-2's Conv1D layout): (E, H, 2I or I) and (E, I, H). Biases (E, 2I or I) and (E, H)."""

    def __init__(self, config: UpcycleMoeConfig, size: int) -> None:
        super().__init__()
        mlp = config.mlp
        self.num_experts = config.num_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = size
        first = (2 if _gated(mlp) else 1) * size
        E, H = self.num_experts, self.hidden_dim
        transposed = bool(mlp.get("transposed"))
        self.first_name = _first_name(mlp)
        setattr(self, self.first_name, nn.Parameter(torch.empty((E, H, first) if transposed else (E, first, H))))
        self.down_proj = nn.Parameter(torch.empty((E, size, H) if transposed else (E, H, size)))
        if mlp.get("bias"):
            setattr(self, self.first_name + "_bias", nn.Parameter(torch.zeros(E, first)))
            self.down_proj_bias = nn.Parameter(torch.zeros(E, H))
        self.act_fn = ACT2FN[mlp["hidden_act"]]

    def _linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        y = x @ weight if self.is_transposed else F.linear(x, weight)
        return y if bias is None else y + bias

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """The eager path: one expert at a time over the tokens routed to it. (T, H), (T, k), (T, k) -> (T, H)."""
        first = getattr(self, self.first_name)
        first_bias = getattr(self, self.first_name + "_bias", None)
        down_bias = getattr(self, "down_proj_bias", None)
        final = torch.zeros_like(hidden_states)  # (T, H)
        with torch.no_grad():
            mask = F.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)  # (E, k, T)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert in hit:
            e = expert[0]
            slot, token = torch.where(mask[e])  # (n,), (n,)
            h = self._linear(hidden_states[token], first[e], None if first_bias is None else first_bias[e])
            h = self._apply_gate(h) if self.has_gate else self.act_fn(h)  # (n, I)
            y = self._linear(h, self.down_proj[e], None if down_bias is None else down_bias[e])  # (n, H)
            y = y * top_k_weights[token, slot, None]
            final.index_add_(0, token, y.to(final.dtype))
        return final


class UpcycleMoeProjection(nn.Module):
    """One projection of a dense MLP, in the dense model's weight layout ([out, in], or [in, out] when transposed)."""

    def __init__(self, d_in: int, d_out: int, bias: bool, transposed: bool) -> None:
        super().__init__()
        self.transposed = transposed
        self.weight = nn.Parameter(torch.empty((d_in, d_out) if transposed else (d_out, d_in)))
        self.bias = nn.Parameter(torch.zeros(d_out)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight if self.transposed else F.linear(x, self.weight)
        return y if self.bias is None else y + self.bias


class UpcycleMoeSharedExpert(nn.Module):
    """An always-on dense MLP of the dense model's shape (named like it on disk), for --shared-experts."""

    def __init__(self, config: UpcycleMoeConfig, size: int) -> None:
        super().__init__()
        mlp, H = config.mlp, config.hidden_size
        bias, transposed = bool(mlp.get("bias")), bool(mlp.get("transposed"))
        self.gate_name = mlp.get("gate")
        self.up_name, self.down_name = mlp["up"], mlp["down"]
        if self.gate_name:
            self.add_module(self.gate_name, UpcycleMoeProjection(H, size, bias, transposed))
        self.add_module(self.up_name, UpcycleMoeProjection(H, size, bias, transposed))
        self.add_module(self.down_name, UpcycleMoeProjection(size, H, bias, transposed))
        self.act_fn = ACT2FN[mlp["hidden_act"]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (T, H) -> (T, H)
        up = getattr(self, self.up_name)(x)
        h = self.act_fn(getattr(self, self.gate_name)(x)) * up if self.gate_name else self.act_fn(up)
        return getattr(self, self.down_name)(h)


class UpcycleMoeBlock(nn.Module):
    """router -> top-k experts (-> + sigmoid-gated shared expert, as in Qwen2-MoE) -> the dense MLP's dropout."""

    def __init__(self, config: UpcycleMoeConfig) -> None:
        super().__init__()
        mlp = config.mlp
        self.router = UpcycleMoeRouter(config)
        self.experts = UpcycleMoeExperts(config, config.moe_intermediate_size)
        # use_experts_implementation's defaults describe a gated, bias-free [out, in] MLP; say what this one is
        self.experts.has_gate = _gated(mlp)
        self.experts.has_bias = bool(mlp.get("bias"))
        self.experts.is_transposed = bool(mlp.get("transposed"))
        size = config.shared_expert_intermediate_size
        if size:
            self.shared_expert = UpcycleMoeSharedExpert(config, size)
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)
        self.dropout = nn.Dropout(float(mlp.get("dropout") or 0.0))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape  # (..., H)
        x = hidden_states.reshape(-1, shape[-1])  # (T, H)
        _, weights, experts = self.router(x)  # (T, k), (T, k)
        out = self.experts(x, experts, weights)  # (T, H)
        if hasattr(self, "shared_expert"):
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)  # (T, H)
        return self.dropout(out).reshape(shape)


def conversion_mapping(mlp: dict) -> list[WeightConverter]:
    """Per-expert tensors on disk (the dense MLP's own names) <-> the fused tensors of UpcycleMoeExperts."""
    gate, up, down, first = mlp.get("gate"), mlp.get("up"), mlp["down"], _first_name(mlp)
    concat = 2 if mlp.get("transposed") else 1  # the output dimension of the first projection
    rules = []
    for suffix, tensor_dim in (("weight", concat), ("bias", 1)):
        tail = "" if suffix == "weight" else "_bias"
        if mlp.get("gate_up"):  # already [gate; up] per expert
            rules.append(
                WeightConverter(f"experts.*.{mlp['gate_up']}.{suffix}", f"experts.{first}{tail}", [MergeModulelist(0)])
            )
        elif gate:
            sources = [f"experts.*.{gate}.{suffix}", f"experts.*.{up}.{suffix}"]
            ops = [MergeModulelist(dim=0), Concatenate(dim=tensor_dim)]
            rules.append(WeightConverter(sources, f"experts.{first}{tail}", ops))
        else:
            rules.append(WeightConverter(f"experts.*.{up}.{suffix}", f"experts.{first}{tail}", [MergeModulelist(0)]))
        rules.append(WeightConverter(f"experts.*.{down}.{suffix}", f"experts.down_proj{tail}", [MergeModulelist(0)]))
    return rules


_CLASSES: dict[type, type] = {}


def _moe_class(dense_cls: type) -> type:
    """UpcycleMoeForCausalLM combined with one dense causal-LM class (made once per class)."""
    if dense_cls not in _CLASSES:
        fp32 = [*(getattr(dense_cls, "_keep_in_fp32_modules_strict", None) or []), "e_score_correction_bias"]
        _CLASSES[dense_cls] = type(
            UpcycleMoeForCausalLM.__name__,
            (UpcycleMoeForCausalLM, dense_cls),
            {
                "__module__": __name__,
                "__qualname__": UpcycleMoeForCausalLM.__qualname__,
                "_keep_in_fp32_modules_strict": fp32,  # the selection bias is added in float32
            },
        )
    return _CLASSES[dense_cls]


class UpcycleMoeForCausalLM(PreTrainedModel):
    """Instantiating it gives the dense model's own causal-LM class with MoE blocks in `config.moe_layers`."""

    config_class = UpcycleMoeConfig
    # transformers decides whether a class may use grouped_mm by reading its module's source, and caches the answer
    # on the class: the dense class's cached "no" must not be inherited by this one, which holds the experts.
    _can_set_experts_implementation_cached_value = True

    def __new__(cls, config: UpcycleMoeConfig, *args, **kwargs):
        if cls is UpcycleMoeForCausalLM:
            cls = _moe_class(MODEL_FOR_CAUSAL_LM_MAPPING[CONFIG_MAPPING[config.dense_model_type]])
        return super().__new__(cls)

    def __init__(self, config: UpcycleMoeConfig, *args, **kwargs) -> None:
        # transformers checks the experts implementation in every PreTrainedModel's __init__, and the dense base model
        # (GPT2Model, ...) has no experts, so it would refuse grouped_mm: build the dense model with "eager", then
        # choose for this model, which holds the experts.
        wanted = config._experts_implementation
        config._experts_implementation_internal = "eager"
        super().__init__(config, *args, **kwargs)  # the dense class builds the whole dense model on this config
        config._experts_implementation_internal = self.get_correct_experts_implementation(wanted)
        self._register_mapping()
        for layer in config.moe_layers:
            parent, name = config.mlp["path"].format(layer=layer).rsplit(".", 1)
            block = UpcycleMoeBlock(config)
            self._init_block(block)
            setattr(self.get_submodule(parent), name, block)

    def add_router_bias(self) -> None:
        """Give every router its `e_score_correction_bias` (zeros: routing unchanged) and say so in the config."""
        self.config.router_bias = True
        for layer in self.config.moe_layers:
            router = self.get_submodule(self.config.mlp["path"].format(layer=layer)).router
            if not hasattr(router, "e_score_correction_bias"):
                zeros = torch.zeros(router.num_experts, device=router.weight.device)
                router.e_score_correction_bias = nn.Parameter(zeros, requires_grad=False)

    def _register_mapping(self) -> None:
        """The loader and save_pretrained look the fused-expert mapping up by class name once the model is built;
        it depends on this model's MLP names, so it is registered again before each load and save."""
        register_checkpoint_conversion_mapping(type(self).__name__, conversion_mapping(self.config.mlp), overwrite=True)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Saves like any model, plus this code and `auto_map`, so that the folder loads where upcycle is absent."""
        self._register_mapping()
        self.config.auto_map = dict(AUTO_MAP)
        super().save_pretrained(save_directory, *args, **kwargs)
        here = Path(__file__).parent
        for name in CODE_FILES:
            if (here / name).resolve() != (Path(save_directory) / name).resolve():
                shutil.copyfile(here / name, Path(save_directory) / name)

    def _init_block(self, block: UpcycleMoeBlock) -> None:
        """Random init for a model built from its config (from_pretrained then loads every tensor)."""
        std = float(getattr(self.config, "initializer_range", 0.02))
        with torch.no_grad():
            for name, p in block.named_parameters():
                if p.device.type != "meta" and not name.endswith("bias") and "shared_expert_gate" not in name:
                    p.normal_(0.0, std)


__all__ = ["UpcycleMoeBlock", "UpcycleMoeExperts", "UpcycleMoeForCausalLM", "UpcycleMoeRouter"]

"""Configuration of upcycle's generic MoE wrapper: a dense model's own config plus the MoE fields.

This file is shipped beside the weights of every `--target generic` checkpoint, so it imports only transformers.
The dense model's fields are kept flat (config.json reads like the dense model's, plus `dense_model_type` and the
MoE fields); `dense_config()` rebuilds the dense model's own config class from them.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from transformers import AutoConfig, PreTrainedConfig

BASE_FIELDS = frozenset(f.name for f in fields(PreTrainedConfig))
MOE_FIELDS = (
    "dense_model_type",
    "mlp",
    "num_experts",
    "num_experts_per_tok",
    "norm_topk_prob",
    "moe_layers",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "router_aux_loss_coef",
    "output_router_logits",
)


class UpcycleMoeConfig(PreTrainedConfig):
    """`mlp` describes the dense MLP that every MoE layer's experts copy: where it sits (`path`, with {layer}),
    its projection names (`gate` or None, `up`, `down`), `bias`, `transposed` (GPT-2's Conv1D weights are stored
    [in, out]), `hidden_act` and `dropout` (applied to the block's output, as the dense MLP did)."""

    model_type = "upcycle_moe"

    def __init__(
        self,
        dense_model_type: str = "llama",
        mlp: dict[str, Any] | None = None,
        num_experts: int = 8,
        num_experts_per_tok: int = 2,
        norm_topk_prob: bool = True,
        moe_layers: list[int] | None = None,
        moe_intermediate_size: int | None = None,
        shared_expert_intermediate_size: int = 0,
        router_aux_loss_coef: float = 0.001,
        output_router_logits: bool = False,
        **kwargs: Any,
    ) -> None:
        dense_cls = type(AutoConfig.for_model(dense_model_type))
        own = set(BASE_FIELDS) | {"auto_map", "transformers_version", "_name_or_path", "name_or_path"}
        own |= {"attn_implementation", "experts_implementation", "torch_dtype", "output_attentions"}
        dense_kwargs = {k: v for k, v in kwargs.items() if k not in own}
        base_kwargs = {k: v for k, v in kwargs.items() if k in own}
        dense = dense_cls(**dense_kwargs)
        self.dense_model_type = dense_model_type
        self.mlp = dict(mlp or {})
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.norm_topk_prob = norm_topk_prob
        self.moe_layers = list(moe_layers) if moe_layers is not None else list(range(dense.num_hidden_layers))
        self.moe_intermediate_size = moe_intermediate_size
        self.shared_expert_intermediate_size = shared_expert_intermediate_size
        self.router_aux_loss_coef = router_aux_loss_coef
        self.output_router_logits = output_router_logits
        super().__init__(**base_kwargs)
        # The dense model's own fields, after its class filled defaults and derived values (layer types, rope).
        for key, value in dense.to_dict().items():
            if key not in own and key != "model_type":
                setattr(self, key, value)
        for alias, name in dense.attribute_map.items():  # hidden_size for GPT-2's n_embd, and so on
            setattr(self, alias, getattr(dense, name))

    def dense_config(self) -> PreTrainedConfig:
        """The dense model's own config class, with the dense fields of this config."""
        dense_cls = type(AutoConfig.for_model(self.dense_model_type))
        names = {f.name for f in fields(dense_cls)} - BASE_FIELDS
        return dense_cls(**{k: v for k, v in self.__dict__.items() if k in names})


__all__ = ["UpcycleMoeConfig"]

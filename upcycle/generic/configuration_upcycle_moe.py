"""Configuration of upcycle's generic MoE wrapper: a dense model's own config plus the MoE fields.

This file is shipped beside the weights of every `--target generic` checkpoint, so it imports only transformers.
The dense model's fields are kept flat: config.json reads like the dense model's, plus `dense_model_type`, the
`mlp` description and the MoE fields, and the dense model's classes read this config as they read their own.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from transformers import PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

# Fields of every config (and kwargs its __init__ handles): this config's own, never handed to the dense class.
OWN_FIELDS = frozenset(f.name for f in fields(PreTrainedConfig)) | {
    "auto_map",
    "transformers_version",
    "_name_or_path",
    "name_or_path",
    "attn_implementation",
    "experts_implementation",
    "torch_dtype",
    "output_attentions",
}


class UpcycleMoeConfig(PreTrainedConfig):
    """`mlp` describes the dense MLP that every MoE layer's experts copy: where it sits (`path`, with {layer}),
    its projection names (`gate` or None, `up`, `down`; or one fused `gate_up`, gate rows first), `bias`,
    `transposed` (GPT-2's Conv1D weights are stored [in, out]), `hidden_act` and `dropout` (applied to the block's
    output, as the dense MLP did). The forward adds no load-balancing loss of its own (`upcycle train` computes it
    from the routers). `router_bias`: each router holds an `e_score_correction_bias` (E,) that is added to its
    softmax probabilities to choose the top-k experts (not to weigh them), as Ernie 4.5-MoE does; `upcycle train
    --balance bias` writes it."""

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
        router_bias: bool = False,
        **kwargs: Any,
    ) -> None:
        # the dense config class fills defaults and derived values (layer types, RoPE parameters) as it always does
        dense = CONFIG_MAPPING[dense_model_type](**{k: v for k, v in kwargs.items() if k not in OWN_FIELDS})
        self.dense_model_type = dense_model_type
        self.mlp = dict(mlp or {})
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.norm_topk_prob = norm_topk_prob
        self.moe_layers = list(moe_layers) if moe_layers is not None else list(range(dense.num_hidden_layers))
        self.moe_intermediate_size = moe_intermediate_size
        self.shared_expert_intermediate_size = shared_expert_intermediate_size
        self.router_bias = router_bias
        super().__init__(**{k: v for k, v in kwargs.items() if k in OWN_FIELDS})
        for key, value in dense.to_dict().items():
            if key not in OWN_FIELDS and key != "model_type":
                setattr(self, key, value)
        for alias, name in dense.attribute_map.items():  # hidden_size for GPT-2's n_embd, and so on
            setattr(self, alias, getattr(dense, name))


__all__ = ["UpcycleMoeConfig"]

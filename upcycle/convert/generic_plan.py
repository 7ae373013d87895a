"""The plan for `--target generic`: the dense model kept as it is, the MLP of each MoE layer replaced by a router and
experts that copy it (upcycle's wrapper, upcycle/generic), for families that no native MoE class holds exactly.

Every tensor of the dense model is copied under its own name, except the MLP tensors of MoE layers. Those become,
under the dense MLP's own path: `router.weight` [E, H], and per expert the dense MLP's tensors under the same names
(`experts.{e}.c_fc.weight`, `experts.{e}.c_fc.bias`, ... in the dense layout, Conv1D included), so cloned experts
are byte copies. Pure, like plan.py: nothing is read here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection, Mapping
from typing import Any

from ..arch import FFN_ROLES, GENERIC, Family, generic_target
from ..convert import methods as expert_methods
from ..dtypes import ST_TO_TORCH
from ..errors import UpcycleError
from ..generic import ARCHITECTURE, AUTO_MAP, MODEL_TYPE, WHY_REMOTE_CODE
from ..source import TensorInfo
from .ops import Copy, Expert, Plan, Router, Shared, TensorOp, Zeros
from .plan import (
    account_for,
    moe_layer_indices,
    native_refusal,
    order,
    plan_casts,
    scaling_rounds,
    written_dtype,
)
from .spec import ConvertSpec

MLP_ROLES = (*FFN_ROLES, "gate_up")  # gate_up: one fused projection, gate rows first (GLM, Phi-3)
# Dense config entries that describe a saved file rather than the model: the wrapper's config sets its own.
NOT_COPIED = (
    "model_type",
    "architectures",
    "transformers_version",
    "auto_map",
    "_name_or_path",
    "dtype",
    "torch_dtype",
)


def with_standard_names(cfg: dict[str, Any]) -> dict[str, Any]:
    """The dense config with the standard names too (GPT-2 says n_embd for hidden_size), from its config class."""
    from transformers import AutoConfig

    aliases = AutoConfig.for_model(cfg["model_type"]).attribute_map
    return cfg | {alias: cfg[name] for alias, name in aliases.items() if name in cfg and alias not in cfg}


def with_class_names(tensors: dict[str, TensorInfo], expected: Collection[str] | None) -> dict[str, TensorInfo]:
    """Checkpoints saved before the base model had its attribute name (GPT-2's own: `h.0.attn.c_attn.weight`,
    `wte.weight`) lack the prefix that transformers adds when it loads them (`transformer.`); so does the plan.
    -> the class's name -> TensorInfo, whose `.name` stays the key in the file."""
    if expected is None:
        return tensors
    tops = {key.split(".", 1)[0] for key in expected}
    out = {}
    for name, info in tensors.items():
        known = [f"{top}.{name}" for top in tops if f"{top}.{name}" in expected] if name not in expected else []
        out[known[0] if len(known) == 1 else name] = info
    return out


def resolved_mlp(family: Family, cfg: dict[str, Any]) -> dict[str, Any]:
    """The family's MLP description with its config fields read: what the wrapper's config stores."""
    mlp = family.mlp
    bias = mlp.get("bias", False)
    if isinstance(bias, str):
        bias = bool(cfg.get(bias, False))
    act = cfg.get(mlp["act"])
    if not isinstance(act, str):
        raise UpcycleError(
            f"this {family.name} model's config has no activation {mlp['act']!r}; its config.json is damaged"
        )
    dropout = float(cfg.get(mlp["dropout"]) or 0.0) if mlp.get("dropout") else 0.0
    return {
        "path": mlp["path"],
        "gate": mlp.get("gate"),
        "up": mlp.get("up"),
        "gate_up": mlp.get("gate_up"),
        "down": mlp["down"],
        "bias": bool(bias),
        "transposed": bool(mlp.get("transposed", False)),
        "hidden_act": act,
        "dropout": dropout,
    }


def plain(mlp: dict[str, Any]) -> bool:
    """Gated (gate and up apart), bias-free, weights stored [out, in]: the FFN the expert methods (split, drop, scaled
    down_proj) cut."""
    return bool(mlp["gate"]) and not mlp["bias"] and not mlp["transposed"]


def mlp_tensors(mlp: dict[str, Any], layer: int) -> dict[str, tuple[str, str | None]]:
    """role -> (weight key, bias key or None) of one layer's dense MLP (roles gate, up, down, or gate_up, down)."""
    base = mlp["path"].format(layer=layer)
    return {
        role: (f"{base}.{mlp[role]}.weight", f"{base}.{mlp[role]}.bias" if mlp["bias"] else None)
        for role in MLP_ROLES
        if mlp.get(role)
    }


def intermediate_size(family: Family, mlp: dict[str, Any], cfg: dict[str, Any], tensors: dict[str, TensorInfo]) -> int:
    """The dense MLP's intermediate size, read from the weights and checked to agree in every layer."""
    hidden = int(cfg["hidden_size"])
    found: set[int] = set()
    for layer in range(int(cfg["num_hidden_layers"])):
        for role, (weight, bias) in mlp_tensors(mlp, layer).items():
            for key in (weight, bias):
                if key is not None and key not in tensors:
                    raise UpcycleError(
                        f"the checkpoint has no tensor {key}; it is incomplete or not a {family.name} model"
                    )
            shape = tensors[weight].shape
            outward = (role != "down") != mlp["transposed"]  # stored [I, H]
            if len(shape) != 2 or shape[1 if outward else 0] != hidden:
                raise UpcycleError(
                    f"{weight} has shape {list(shape)}, which does not fit hidden size {hidden}; "
                    "config.json and the weights disagree"
                )
            found.add(shape[0 if outward else 1] // (2 if role == "gate_up" else 1))
    if len(found) != 1:
        raise UpcycleError(
            f"the MLPs of this {family.name} model differ in size ({sorted(found)}); upcycle needs one size"
        )
    return found.pop()


def check_generic_options(
    family: Family, mlp: dict[str, Any], spec: ConvertSpec, layout: expert_methods.Layout
) -> None:
    """What the wrapper cannot do (yet) for this MLP."""
    if not family.mlp:
        raise UpcycleError(f"a {family.name} model has no generic form; use --target auto")
    computed = any(t.transform is not None for e in (*layout.experts, layout.shared or {}) for t in e.values())
    if computed and not plain(mlp):
        kind = "a Conv1D" if mlp["transposed"] else "a fused gate_up" if mlp["gate_up"] else "an ungated"
        kind = "a biased" if kind == "an ungated" and mlp["gate"] else kind
        raise UpcycleError(
            f"--init {spec.init}{' with --shared-experts' if spec.shared_experts else ''} computes expert weights, "
            f"which upcycle does for gated, bias-free MLPs only; this {family.name} model has {kind} MLP. "
            "Use --init clone (with --routing topk-softmax and no --shared-experts)"
        )
    if spec.router_init == "kmeans":
        raise UpcycleError("--router-init kmeans is not available with --target generic yet; use random or zero")


def generic_ops(
    mlp: dict[str, Any],
    tensors: dict[str, TensorInfo],
    moe: tuple[int, ...],
    layout: expert_methods.Layout,
    out_dtype: Callable[[str], str],
    model_dtype: str,
    hidden: int,
) -> list[TensorOp]:
    """Every tensor written: the dense model's (MoE layers' MLPs left out), then each MoE layer's router, shared
    expert and experts, placed after the rest of that layer."""
    block = re.compile(re.escape(mlp["path"].rsplit(".", 1)[0]).replace(r"\{layer\}", r"(\d+)") + r"\.")
    replaced = {key: layer for layer in moe for pair in mlp_tensors(mlp, layer).values() for key in pair if key}
    experts, base = len(layout.experts), {layer: mlp["path"].format(layer=layer) for layer in moe}

    def key(name: str) -> tuple:
        m = block.match(name)
        return (1, int(m.group(1)), 0, name) if m else (order(name)[0], -1, 0, name)

    def ffn_op(name: str, layer: int, role: str, built, e: int | None, bias: bool) -> Expert:
        weight, bias_key = mlp_tensors(mlp, layer)[role]
        info = tensors[bias_key if bias else weight]
        shape = info.shape if bias or built.transform is None else built.shape
        transform, role_ = (None, None) if bias else (built.transform, role)
        kind = Expert if e is not None else Shared
        return kind(name, shape, out_dtype(info.dtype), info.name, layer, e, transform, role_, built.source)

    ops = [(key(n), Copy(n, t.shape, out_dtype(t.dtype), t.name)) for n, t in tensors.items()]
    ops = [(k, op) for k, op in ops if op.name not in replaced]
    for layer in moe:
        made: list[TensorOp] = [Router(f"{base[layer]}.router.weight", (experts, hidden), model_dtype, layer,
                                       layout.router_group)]  # fmt: skip
        if layout.shared:
            made.append(Zeros(f"{base[layer]}.shared_expert_gate.weight", (1, hidden), model_dtype, layer))
            for role in mlp_tensors(mlp, layer):
                name = f"{base[layer]}.shared_expert.{mlp[role]}"
                made.append(ffn_op(f"{name}.weight", layer, role, layout.shared[role], None, False))
        for e, built in enumerate(layout.experts):
            for role, (_, bias_key) in mlp_tensors(mlp, layer).items():
                name = f"{base[layer]}.experts.{e}.{mlp[role]}"
                part = built["up"] if role == "gate_up" else built[role]  # fused: clone only, so no transform
                made.append(ffn_op(f"{name}.weight", layer, role, part, e, False))
                if bias_key:
                    made.append(ffn_op(f"{name}.bias", layer, role, part, e, True))
        ops += [((1, layer, 1, i), op) for i, op in enumerate(made)]
    return [op for _, op in sorted(ops, key=lambda pair: pair[0])]


def generic_config(
    cfg: dict[str, Any],
    mlp: dict[str, Any],
    spec: ConvertSpec,
    moe: tuple[int, ...],
    model_dtype: str,
    layout: expert_methods.Layout,
) -> dict[str, Any]:
    """The wrapper's config: the dense config's fields as they are, the MLP description and the MoE fields."""
    config = {k: v for k, v in cfg.items() if k not in NOT_COPIED}
    config.update(generic_target_fields(cfg, mlp, spec, moe, layout))
    config["architectures"] = [ARCHITECTURE]
    config["auto_map"] = dict(AUTO_MAP)
    config["dtype"] = ST_TO_TORCH.get(model_dtype, "float32")
    return config


def generic_target_fields(cfg, mlp, spec: ConvertSpec, moe, layout: expert_methods.Layout) -> dict[str, Any]:
    return {
        "model_type": MODEL_TYPE,
        "dense_model_type": cfg["model_type"],
        "mlp": mlp,
        "num_experts": spec.experts,
        "num_experts_per_tok": spec.top_k,
        "norm_topk_prob": spec.renormalize,
        "moe_layers": list(moe),
        "moe_intermediate_size": layout.expert_size,
        "shared_expert_intermediate_size": layout.shared_size,
    }


def make_generic_plan(
    family: Family,
    cfg: dict[str, Any],
    tensors: dict[str, TensorInfo],
    spec: ConvertSpec,
    *,
    expected: Collection[str] | None = None,
    optional: Collection[str] = (),
    measured: Mapping | None = None,
) -> Plan:
    """The Plan of a generic-wrapper conversion (see planner.make_plan, which hands over to this)."""
    if not family.mlp:
        raise UpcycleError(f"a {family.name} model has no generic form in upcycle; use --target auto")
    generic_target(family.name)  # the family's table is complete
    cfg = with_standard_names(cfg)
    num_layers, hidden = int(cfg["num_hidden_layers"]), int(cfg["hidden_size"])
    kept, notes = account_for(family, with_class_names(tensors, expected), num_layers, expected, optional)
    moe = moe_layer_indices(num_layers, spec)
    mlp = resolved_mlp(family, cfg)
    size = intermediate_size(family, mlp, cfg, kept)
    layout = expert_methods.layout(spec, hidden, size)
    check_generic_options(family, mlp, spec, layout)

    out_dtype = written_dtype(spec)
    model_dtype = out_dtype(kept[mlp_tensors(mlp, 0)["down"][0]].dtype)
    ops = generic_ops(mlp, kept, moe, layout, out_dtype, model_dtype, hidden)
    source = {info.name: info for info in kept.values()}  # ops name their source by its key in the file
    casts = plan_casts(ops, source, measured)
    scales_exact, exact_text = scaling_rounds(layout, model_dtype)
    why = native_refusal(family, cfg)
    why = f"{why}, so --target auto writes" if spec.target == "auto" and why else "this is"
    notes = (
        *notes,
        f"{why} upcycle's generic MoE wrapper ({ARCHITECTURE}: the dense {family.name} model with MoE blocks in "
        f"place of its MLPs). {WHY_REMOTE_CODE}",
    )
    return Plan(
        family=family.name,
        target=GENERIC,
        architecture=ARCHITECTURE,
        num_layers=num_layers,
        moe_layers=moe,
        experts=spec.experts,
        top_k=spec.top_k,
        config=generic_config(cfg, mlp, spec, moe, model_dtype, layout),
        ops=tuple(ops),
        exact=layout.exact and scales_exact and all(c.exact for c in casts),
        dense_params=sum(math.prod(t.shape) for t in kept.values()),
        notes=notes,
        casts=casts,
        exact_text=exact_text,
        method_exact=layout.exact and scales_exact,
    )

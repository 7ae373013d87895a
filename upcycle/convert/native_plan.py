"""The plan for a native target: the dense model written as one of transformers' own MoE classes.

The target's table (targets/*.json) names every key; the dense tensors are copied under their new names, and each
MoE layer's FFN becomes a router, the target's fixed extras and the experts (per-expert keys, or fused [E, ...]
tensors). Pure, like plan.py: nothing is read here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import replace
from typing import Any

from ..arch import FFN_ROLES, Family, Target, targets
from ..convert import methods as expert_methods
from ..dtypes import ST_TO_TORCH
from ..errors import NoForm, UpcycleError
from ..source import TensorInfo
from .ops import CastCheck, Copy, Expert, Fused, Plan, Router, Shared, TensorOp, Zeros
from .plan import (
    account_for,
    moe_layer_indices,
    native_refusal,
    order,
    plan_casts,
    read_attention,
    scaling_rounds,
    written_dtype,
)
from .spec import ConvertSpec
from .views import family_notes, transform_exact, untied, value_transform, with_views


def _generic_hint(family: Family) -> str:
    """How to get the model anyway, where upcycle's generic wrapper can hold it."""
    return "; --target generic keeps it exactly, as a model that needs trust_remote_code=True" if family.mlp else ""


def choose_target(family: Family, spec: ConvertSpec, all_layers: bool) -> Target:
    name = spec.target
    if name == "auto":
        name = family.auto_target["every_layer" if all_layers else "some_layers"]
    if name not in family.targets:
        choices = sorted(family.targets) + (["generic"] if family.mlp else [])
        raise NoForm(
            f"a {family.name} model has no exact {name} form; choose --target {' or '.join(choices)} (or auto)"
        )
    target = targets()[name]
    if not all_layers and not target.interleave:
        choices = [t for t in family.targets if targets()[t].interleave]
        if not choices:
            raise NoForm(
                f"{name} makes every layer MoE (it has no dense layers), and it is the only native MoE class "
                f"that holds {family.name} models exactly; make every layer MoE (--every 1, no --layers)"
            )
        raise NoForm(
            f"{name} makes every layer MoE, but --every/--layers leaves dense layers; use --target "
            f"{' or '.join(choices) or 'auto'} or make every layer MoE (--every 1)"
        )
    return target


# --- attention layouts: read the dense model's, write the target's ----------------------------------


def write_attention(target: Target, types: list[str], window: int | None) -> dict[str, Any]:
    sliding = {t == "sliding_attention" for t in types}
    if target.attention == "layer_types":
        # Without sliding layers the window is left to the class, which normalises it away.
        any_sliding = True in sliding
        out = {"use_sliding_window": any_sliding, "max_window_layers": len(types), "layer_types": types}
        return out | ({"sliding_window": window} if any_sliding else {})
    if len(sliding) > 1:
        raise NoForm(
            f"the model mixes sliding-window and full-attention layers, which {target.name} cannot express; "
            "no exact target exists for it"
        )
    uniform = sliding.pop()
    if target.attention == "global_window":
        return {"sliding_window": window if uniform else None}
    if target.attention == "none":  # the class has no sliding window (FlexOlmo, GraniteMoe)
        if uniform:
            raise NoForm(f"the model uses sliding-window attention, which {target.name} does not have")
        return {}
    if target.attention == "all_or_none":
        return {"use_sliding_window": uniform} | ({"sliding_window": window} if uniform else {})
    raise ValueError(f"unknown attention layout {target.attention!r}")


def make_native_plan(
    family: Family,
    cfg: dict[str, Any],
    tensors: dict[str, TensorInfo],
    spec: ConvertSpec,
    *,
    expected: Collection[str] | None = None,
    optional: Collection[str] = (),
    measured: Mapping[tuple[str, str], CastCheck] | None = None,
) -> Plan:
    """The Plan of a conversion to a native MoE class (see planner.make_plan, which hands over to this)."""
    if not family.targets:  # a family only the generic wrapper holds: refuse the native target asked for
        choose_target(family, spec, all_layers=True)
    why = native_refusal(family, cfg)  # a config field or attention layout no native class holds exactly
    if why is not None:
        raise UpcycleError(f"{why}{_generic_hint(family)}")
    num_layers = int(cfg["num_hidden_layers"])
    kept, notes = account_for(family, tensors, num_layers, expected, optional)
    dense_params = sum(math.prod(t.shape) for t in kept.values())
    kept, notes = family_sources(family, cfg, kept, notes)
    moe = moe_layer_indices(num_layers, spec)
    target = choose_target(family, spec, all_layers=len(moe) == num_layers)
    check_target_options(target, spec, family)
    ffn = ffn_index(family, cfg, kept)
    hidden, intermediate = int(cfg["hidden_size"]), int(cfg["intermediate_size"])
    layout = expert_methods.layout(spec, hidden, intermediate)

    out_dtype = written_dtype(spec)
    model_dtype = out_dtype(kept[family.ffn["gate"].format(layer=0)].dtype)
    ops = tensor_ops(family, target, kept, ffn, moe, layout, out_dtype, model_dtype, hidden)
    ops, values_exact = with_values(family, cfg, ops)
    casts = plan_casts(ops, kept, measured)
    scales_exact, exact_text = scaling_rounds(layout, model_dtype)
    if not values_exact:
        rounded = f"the {family.name} values the dense model keeps in float32 (e.g. 1+w) are rounded to {model_dtype}"
        exact_text += f"; but {rounded}"
        notes += (f"not exact: {rounded}, so the MoE is close to the dense model, not equal; --dtype float32 is exact",)
    return Plan(
        family=family.name,
        target=target.name,
        architecture=target.architecture,
        num_layers=num_layers,
        moe_layers=moe,
        experts=spec.experts,
        top_k=spec.top_k,
        config=target_config(family, target, cfg, spec, moe, model_dtype, layout),
        ops=tuple(ops),
        exact=layout.exact and scales_exact and values_exact and all(c.exact for c in casts),
        dense_params=dense_params,
        notes=notes,
        casts=casts,
        exact_text=exact_text,
        method_exact=layout.exact and scales_exact,
    )


def family_sources(
    family: Family, cfg: dict[str, Any], kept: dict[str, TensorInfo], notes: tuple[str, ...]
) -> tuple[dict[str, TensorInfo], tuple[str, ...]]:
    """The source tensors as the plan sees them: fused tensors as their views, tied keys the family writes
    apart as aliases (checked against the dense class before this, under their stored keys)."""
    untie = untied(family, cfg, kept)
    return with_views(family, cfg, kept), notes + family_notes(family, cfg, kept, untie)


def with_values(family: Family, cfg: dict[str, Any], ops: list[TensorOp]) -> tuple[list[TensorOp], bool]:
    """Copy ops of tensors the family changes element-wise get their change; -> (ops, still exact?)."""
    out, exact = [], True
    for op in ops:
        values = value_transform(family, cfg, op.src) if isinstance(op, Copy) else None
        if values is not None:
            op = replace(op, values=values)
            exact = exact and transform_exact(values, op.dtype)
        out.append(op)
    return out, exact


def check_target_options(target: Target, spec: ConvertSpec, family: Family | None = None) -> None:
    """Routing and shared-expert options that the chosen native class must be able to hold."""
    mine = [targets()[t] for t in family.targets] if family is not None else []
    only_renormalising = bool(mine) and all(t.renormalize == "always" for t in mine)
    if not spec.renormalize and target.renormalize == "always" and only_renormalising:
        raise NoForm(
            f"--routing softmax-topk keeps the top-k weights unnormalised, but {target.name}, the only native MoE "
            f"class for {family.name} models, always renormalises them; use --routing topk-softmax"
        )
    if not spec.renormalize and target.renormalize == "always":
        raise NoForm(
            f"--routing softmax-topk keeps the top-k weights unnormalised, but {target.name} always renormalises "
            "them; use --target qwen2_moe (or qwen3_moe for Qwen3) or --routing topk-softmax"
        )
    flag = "--shared-from" if spec.shared_from else "--shared-experts"
    if spec.shared_experts and not target.shared and mine and not any(t.shared for t in mine):
        raise NoForm(
            f"{flag} needs a target class with a shared expert that upcycle fills; {target.name} has none, "
            f"and no native MoE class for {family.name} models has one; leave {flag} out"
            + (
                " (--target generic, upcycle's own wrapper, also holds one: it needs trust_remote_code=True outside "
                "upcycle)"
                if family.mlp
                else ""
            )
        )
    if spec.shared_experts and not target.shared:
        have = [t.name for t in targets().values() if t.shared]
        raise NoForm(
            f"{flag} needs a target class with a shared expert ({', '.join(have)}); "
            f"{target.name} has none. Use --target {have[0]} or leave {flag} out (--target generic, "
            "upcycle's own wrapper, also holds one: it needs trust_remote_code=True outside upcycle)"
        )


def ffn_index(family: Family, cfg: dict[str, Any], tensors: dict[str, TensorInfo]) -> dict[str, tuple[int, str]]:
    """FFN key -> (layer, role), after checking that every FFN tensor is there with the shape the config says."""
    hidden, intermediate = int(cfg["hidden_size"]), int(cfg["intermediate_size"])
    expected = {"gate": (intermediate, hidden), "up": (intermediate, hidden), "down": (hidden, intermediate)}
    index: dict[str, tuple[int, str]] = {}
    for layer in range(int(cfg["num_hidden_layers"])):
        for role in FFN_ROLES:
            key = family.ffn[role].format(layer=layer)
            info = tensors.get(key)
            if info is None:
                raise UpcycleError(f"the checkpoint has no tensor {key}; it is incomplete or not a {family.name} model")
            if info.shape != expected[role]:
                raise UpcycleError(
                    f"{key} has shape {list(info.shape)}, but the config implies {list(expected[role])}; "
                    "config.json and the weights disagree"
                )
            index[key] = (layer, role)
    return index


def tensor_ops(
    family: Family,
    target: Target,
    tensors: dict[str, TensorInfo],
    ffn: dict[str, tuple[int, str]],
    moe: tuple[int, ...],
    layout: expert_methods.Layout,
    out_dtype: Callable[[str], str],
    model_dtype: str,
    hidden: int,
) -> list[TensorOp]:
    """Every tensor written, in streaming order: embeddings, then layer by layer, then the final norm and head.

    Within an MoE layer the router and the target's fixed extras take the FFN's place, and the experts close
    the layer, expert by expert, so that one expert's tensors sit together on disk.
    """
    experts = len(layout.experts)
    shared_roles = {name: role for role, name in target.shared.items() if role in FFN_ROLES} if layout.shared else {}
    moe_set = set(moe)

    def ffn_op(name: str, layer: int, role: str, built: expert_methods.ExpertTensor, e: int | None) -> Expert:
        src = family.ffn[role].format(layer=layer)
        kind = Expert if e is not None else Shared
        dtype = out_dtype(tensors[src].dtype)
        return kind(name, built.shape, dtype, src, layer, e, built.transform, role, built.source)

    groups: dict[tuple[int, int], list[TensorOp]] = {}  # (section, layer) -> ops
    for name in sorted(tensors, key=order):
        group = groups.setdefault(order(name)[:2], [])
        if name not in ffn or ffn[name][0] not in moe_set:
            group.append(Copy(name, tensors[name].shape, out_dtype(tensors[name].dtype), name))
            continue
        layer, role = ffn[name]
        if role == "gate":  # the gate tensor stands for the whole FFN
            name = target.router.format(layer=layer)
            group.append(Router(name, (experts, hidden), model_dtype, layer, layout.router_group))
            for extra in target.extra:
                name = extra["name"].format(layer=layer)
                if extra["name"] in shared_roles:  # the shared expert, built like the routed ones
                    role = shared_roles[extra["name"]]
                    group.append(ffn_op(name, layer, role, layout.shared[role], None))
                    continue
                dims = {"hidden_size": hidden, "experts": experts, "expert_size": layout.expert_size}
                shape = tuple(dims[d] if isinstance(d, str) else int(d) for d in extra["shape"])
                group.append(Zeros(name, shape, model_dtype, layer))
    for layer in moe:
        group = groups[(1, layer)]
        if target.fused:  # all experts of a layer in one tensor per fused key
            group.extend(fused_ops(target, layer, layout, ffn_op))
            continue
        for e, built in enumerate(layout.experts):
            for role in FFN_ROLES:
                name = target.expert[role].format(layer=layer, expert=e)
                group.append(ffn_op(name, layer, role, built[role], e))
    return [op for key in sorted(groups) for op in groups[key]]


def layer_range(target: Target, moe: tuple[int, ...]) -> dict[str, int]:
    """The target's range fields for these MoE layers: start, end and the step `interval`, the largest step that
    divides every (i + 1); any step that fits divides it, so if it selects other layers too, none fits."""
    interval = math.gcd(*(i + 1 for i in moe))
    start, end = min(moe), max(moe)
    if tuple(i for i in range(start, end + 1) if (i + 1) % interval == 0) != tuple(sorted(moe)):
        raise NoForm(
            f"{target.name} makes MoE every n-th layer of one range of layers; layers "
            f"{','.join(map(str, moe))} are not such a set. Use --every N, or --layers with consecutive layers"
        )
    fields = {"start": start, "end": end, "interval": interval}
    return {target.layer_range[k]: v for k, v in fields.items()}


def fused_ops(target: Target, layer: int, layout: expert_methods.Layout, ffn_op: Callable) -> list[TensorOp]:
    """The fused expert tensors of one MoE layer: each [E, rows, cols] holds, expert by expert, that expert's
    tensors of the fused key's roles stacked along the rows (the same tensors the per-expert layout writes)."""
    ops = []
    for template, roles in target.fused.items():
        name = template.format(layer=layer)
        parts = tuple(
            ffn_op(f"{name}[{e}].{role}", layer, role, built[role], e)
            for e, built in enumerate(layout.experts)
            for role in roles
        )
        rows = sum(p.shape[0] for p in parts[: len(roles)])  # expert 0's parts: one per role
        shape = (len(layout.experts), rows, parts[0].shape[1])
        ops.append(Fused(name, shape, parts[0].dtype, layer, parts))
    return ops


def target_config(
    family: Family,
    target: Target,
    cfg: dict[str, Any],
    spec: ConvertSpec,
    moe: tuple[int, ...],
    model_dtype: str,
    layout: expert_methods.Layout,
) -> dict[str, Any]:
    """The target class's config: every dense hyperparameter copied explicitly, then the MoE fields."""
    num_layers, intermediate = int(cfg["num_hidden_layers"]), int(cfg["intermediate_size"])
    config: dict[str, Any] = {k: cfg[k] for k in family.copy_config if k in cfg}
    config["head_dim"] = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // int(cfg["num_attention_heads"]))
    config.update(write_attention(target, *read_attention(family, cfg)))
    config.update(target.set)
    config.update(family.targets[target.name])
    config[target.config["experts"]] = spec.experts
    config[target.config["top_k"]] = spec.top_k
    config[target.config["expert_size"]] = layout.expert_size
    if target.shared:
        config[target.shared["size"]] = layout.shared_size
    if target.renormalize != "always":
        config[target.renormalize] = spec.renormalize
    if target.interleave:
        config[target.config["dense_size"]] = intermediate
        if "dense_layers" in target.config:
            config[target.config["dense_layers"]] = [i for i in range(num_layers) if i not in set(moe)]
    if target.layer_range:
        config.update(layer_range(target, moe))
    config["model_type"] = target.model_type
    config["architectures"] = [target.architecture]
    config["dtype"] = ST_TO_TORCH.get(model_dtype, "float32")
    return config

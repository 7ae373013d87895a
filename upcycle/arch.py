"""Architectures as data: dense families and native MoE targets, read from the JSON tables beside this file.

A family says where a dense model keeps its FFN, how its attention layout is described and which native
MoE classes can hold it exactly. A target says how a native transformers MoE class names its router and
experts on disk and which config fields carry the MoE hyperparameters. Nothing else in the package asks
which model type it is looking at.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from functools import cache
from importlib.resources import files
from typing import Any

from .errors import UpcycleError
from .generic import ARCHITECTURE as GENERIC_ARCHITECTURE
from .generic import MODEL_TYPE as GENERIC_MODEL_TYPE
from .generic import ROUTER_BIAS as BIAS

FFN_ROLES = ("gate", "up", "down")


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    ffn: dict[str, str]  # role -> key template with {layer}
    ignore: tuple[str, ...]  # source keys dropped on purpose (non-persistent buffers of old checkpoints)
    attention: str  # "full" | "global_window" | "layer_types"
    require: dict[str, Any]  # config fields that must hold these values for an exact target to exist
    copy_config: tuple[str, ...]
    targets: dict[str, dict[str, Any]]  # target name -> config fields fixed for this family
    auto_target: dict[str, str]  # "every_layer" | "some_layers" -> target name
    # fused source tensor (key template) -> its row blocks, in order: [part key template, [config fields whose
    # product is the block's row count]]; a row block of a row-major tensor is a contiguous byte range
    views: dict[str, list] = field(default_factory=dict)
    # element-wise changes to copied tensors: {"keys": [...], "add": c | "multiply_sqrt": field, "in": "float32"
    # (computed in float32, then cast) | "weight" (in the written dtype, as the dense model does it), "why": ...}
    transforms: tuple[dict[str, Any], ...] = ()
    untie: dict[str, str] = field(default_factory=dict)  # tied key -> key it shares, written apart when tied
    caveats: str = ""  # one line for the family table (inspect --families, README)
    # the dense MLP as the generic wrapper (--target generic) copies it: "path" (module path with {layer}), projection
    # names "gate" (null when ungated), "up", "down" (or "gate_up", fused with gate rows first, and "down"); "bias"
    # (bool, or the config field that says), "transposed" (Conv1D weights stored [in, out]), "act" and "dropout"
    # (config fields). Empty: no generic path for the family.
    mlp: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Target:
    name: str
    model_type: str
    architecture: str
    interleave: bool  # can dense and MoE layers be mixed?
    attention: str  # "global_window" | "layer_types" | "all_or_none"
    renormalize: str  # "always" or the config field that switches top-k renormalisation on
    config: dict[str, str]  # our notion -> the target's config field
    set: dict[str, Any]
    router: str
    expert: dict[str, str]  # role -> key template with {layer} and {expert}
    extra: tuple[dict[str, Any], ...]  # zero tensors the class expects in every MoE layer
    # "router" | "experts" -> module path with {layer} in the loaded (in-memory) model; "router_bias" (optional): the
    # parameter the router adds to its softmax probabilities to choose the top-k (train --balance bias writes it)
    modules: dict[str, str]
    # the always-on shared expert, where the class has one: role -> key template (among `extra`), and "size" ->
    # the config field of its intermediate size
    shared: dict[str, str] = field(default_factory=dict)
    # experts stored fused on disk, all experts of a layer in one tensor: key template with {layer} -> the roles
    # whose rows each expert contributes, in order ([E, sum of the roles' rows, cols]; GraniteMoe's input_linear
    # holds each expert's gate rows then its up rows). Empty: one key per expert and role (`expert`).
    fused: dict[str, list[str]] = field(default_factory=dict)
    # MoE layers given as one range and a step (Ernie 4.5): "start" | "end" | "interval" -> config field; the MoE
    # layers are then i in [start, end] with (i + 1) % interval == 0. Empty: dense layers listed (`dense_layers`).
    layer_range: dict[str, str] = field(default_factory=dict)


def _freeze(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _load(kind: str, cls: type) -> dict[str, Any]:
    """Every JSON table in upcycle/<kind>/, as frozen `cls` records keyed by name (keys are the field names)."""
    tables = {}
    for entry in sorted(files("upcycle").joinpath(kind).iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".json"):
            data = json.loads(entry.read_text())
            known = {f.name for f in fields(cls)}
            unknown = set(data) - known
            if unknown:
                raise ValueError(f"{kind}/{entry.name}: unknown keys {sorted(unknown)}")
            tables[data["name"]] = cls(**{k: _freeze(v) for k, v in data.items()})
    return tables


@cache
def families() -> dict[str, Family]:
    return _load("families", Family)


@cache
def targets() -> dict[str, Target]:
    return _load("targets", Target)


def supported_families() -> str:
    return ", ".join(sorted(families()))


@cache
def refused() -> dict[str, dict[str, str]]:
    """Dense model types checked against their transformers MoE sibling and found inexact: model type ->
    {"target": the sibling's model type, "why": what the sibling cannot hold}."""
    return json.loads(files("upcycle").joinpath("refused.json").read_text())["refused"]


def family_for(model_type: str | None) -> Family:
    for fam in families().values():
        if model_type in fam.model_types:
            return fam
    if model_type in refused():
        no = refused()[model_type]
        raise UpcycleError(
            f"{model_type} has no exact native MoE target: its sibling {no['target']} {no['why']}; use --target generic"
        )
    if is_moe_model_type(model_type):
        raise UpcycleError(
            f"model type {model_type!r} is already a Mixture-of-Experts model; convert makes an MoE from a dense "
            "model. Train this one further with `upcycle train MODEL`, "
            "or see how it routes with `upcycle routing MODEL`"
        )
    raise UpcycleError(
        f"model type {model_type!r} is not supported; upcycle converts these dense families: {supported_families()}"
    )


def is_moe_model_type(model_type: str | None) -> bool:
    """An MoE class: one of our targets, upcycle's generic wrapper, or a transformers type named *moe (olmoe,
    qwen2_moe, granitemoe ...). Mixtral, DeepSeek and the like are named here, since their names do not say."""
    name = (model_type or "").lower()
    return (
        target_for_model_type(model_type) is not None
        or name == GENERIC_MODEL_TYPE
        or name.endswith("moe")
        or name in ("mixtral", "dbrx", "jamba", "deepseek_v2", "deepseek_v3", "gpt_oss", "llama4", "jetmoe")
    )


def target_for_model_type(model_type: str | None) -> Target | None:
    for tgt in targets().values():
        if tgt.model_type == model_type:
            return tgt
    return None


# --- the generic wrapper (upcycle/generic): one target per dense family, built from the family's "mlp" ------------

GENERIC = "generic"


@cache
def generic_target(family_name: str) -> Target:
    """The generic wrapper's target for one dense family: router and experts under the dense model's own MLP path;
    every expert tensor keeps the dense MLP's name (its `.weight`; biases sit beside it)."""
    mlp = families()[family_name].mlp
    path = mlp["path"]
    names = {role: mlp.get(role) for role in (*FFN_ROLES, "gate_up") if mlp.get(role)}  # gate_up: fused
    return Target(
        name=GENERIC,
        model_type=GENERIC_MODEL_TYPE,
        architecture=GENERIC_ARCHITECTURE,
        interleave=True,
        attention="kept",  # the dense model's own attention runs unchanged
        renormalize="norm_topk_prob",
        config={"experts": "num_experts", "top_k": "num_experts_per_tok", "expert_size": "moe_intermediate_size"},
        set={},  # the wrapper computes no aux loss of its own: upcycle train's router hooks do
        router=f"{path}.router.weight",
        expert={role: f"{path}.experts.{{expert}}.{name}.weight" for role, name in names.items()},
        extra=(),
        # router_bias: the wrapper's e_score_correction_bias, present when config.router_bias is on
        modules={"router": f"{path}.router", "experts": f"{path}.experts", "router_bias": f"{path}.router.{BIAS}"},
        shared={role: f"{path}.shared_expert.{name}.weight" for role, name in names.items()}
        | {"size": "shared_expert_intermediate_size"},
    )


def target_for_config(config: Any) -> Target | None:
    """The MoE target of a model's config (a config.json dict or a transformers config): a native class's, or for
    upcycle's generic wrapper the one of the dense family it wraps. None for a model upcycle does not write."""
    get = config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default)
    model_type = get("model_type")
    if model_type == GENERIC_MODEL_TYPE:
        dense_type = get("dense_model_type")
        fam = next((f for f in families().values() if dense_type in f.model_types and f.mlp), None)
        return generic_target(fam.name) if fam else None
    return target_for_model_type(model_type)

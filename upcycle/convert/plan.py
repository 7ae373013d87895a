"""The conversion plan: which tensors the MoE checkpoint holds and where each comes from.

Pure: from the family and target tables, the dense config (as a dict) and the source tensor index, it
decides the target config and an ordered list of tensor operations. No tensor is read here, so a plan for
a 70B model costs nothing and `--dry-run` shows exactly what a conversion would write.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..arch import FFN_ROLES, Family, Target, family_for, targets
from ..convert import methods as expert_methods
from ..errors import UpcycleError
from ..source import DTYPE_BYTES, TensorInfo
from .spec import ConvertSpec

TORCH_TO_ST = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}
ST_TO_TORCH = {v: k for k, v in TORCH_TO_ST.items()}
FLOAT_DTYPES = set(ST_TO_TORCH)


@dataclass(frozen=True)
class TensorOp:
    name: str  # key written
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype written
    kind: str  # "copy" | "expert" | "router" | "zeros"
    src: str | None = None  # source key for copy/expert
    layer: int | None = None
    expert: int | None = None
    transform: tuple | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES[self.dtype]


@dataclass(frozen=True)
class Plan:
    family: str
    target: str
    architecture: str
    num_layers: int
    moe_layers: tuple[int, ...]
    experts: int
    top_k: int
    config: dict[str, Any]
    ops: tuple[TensorOp, ...]
    exact: bool  # does the MoE compute what the dense model computed at initialisation?
    dense_params: int
    notes: tuple[str, ...] = field(default=())

    @property
    def total_params(self) -> int:
        return sum(op.numel for op in self.ops)

    @property
    def active_params(self) -> int:
        """Parameters used per token: everything but the experts a token is not routed to."""
        per_expert: dict[int, int] = {}
        for op in self.ops:
            if op.kind == "expert" and op.expert == 0:
                per_expert[op.layer] = per_expert.get(op.layer, 0) + op.numel
        idle = sum((self.experts - self.top_k) * n for n in per_expert.values())
        return self.total_params - idle

    @property
    def total_bytes(self) -> int:
        return sum(op.nbytes for op in self.ops)

    def op_table(self) -> list[dict[str, Any]]:
        """Every tensor written, in order: name, shape, dtype, kind and source tensor."""
        return [
            {"name": op.name, "shape": list(op.shape), "dtype": op.dtype, "kind": op.kind, "src": op.src}
            for op in self.ops
        ]

    def summary(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "target": self.target,
            "architecture": self.architecture,
            "layers": self.num_layers,
            "moe_layers": list(self.moe_layers),
            "experts": self.experts,
            "top_k": self.top_k,
            "exact_at_init": self.exact,
            "tensors": len(self.ops),
            "dense_params": self.dense_params,
            "total_params": self.total_params,
            "active_params": self.active_params,
            "bytes": self.total_bytes,
        }


def check_causal_lm(config: dict[str, Any]) -> None:
    archs = config.get("architectures") or []
    if archs and not any(str(a).endswith("ForCausalLM") for a in archs):
        raise UpcycleError(
            f"the model is a {archs[0]}, not a causal language model (…ForCausalLM); upcycle converts "
            "decoder-only causal LMs"
        )


def moe_layer_indices(num_layers: int, spec: ConvertSpec) -> tuple[int, ...]:
    if spec.layers is not None:
        bad = [i for i in spec.layers if not 0 <= i < num_layers]
        if bad:
            raise UpcycleError(
                f"--layers {','.join(map(str, bad))}: out of range, the model has layers 0..{num_layers - 1}"
            )
        return tuple(spec.layers)
    chosen = tuple(i for i in range(num_layers) if (i + 1) % spec.every == 0)
    if not chosen:
        raise UpcycleError(f"--every {spec.every} selects no layer of a {num_layers}-layer model; use a smaller value")
    return chosen


def choose_target(family: Family, spec: ConvertSpec, all_layers: bool) -> Target:
    name = spec.target
    if name == "auto":
        name = family.auto_target["every_layer" if all_layers else "some_layers"]
    if name not in family.targets:
        raise UpcycleError(
            f"a {family.name} model has no exact {name} form; choose --target "
            f"{' or '.join(sorted(family.targets))} (or auto)"
        )
    target = targets()[name]
    if not all_layers and not target.interleave:
        choices = [t for t in family.targets if targets()[t].interleave]
        raise UpcycleError(
            f"{name} makes every layer MoE, but --every/--layers leaves dense layers; use --target "
            f"{' or '.join(choices) or 'auto'} or make every layer MoE (--every 1)"
        )
    return target


# --- attention layouts: read the dense model's, write the target's ----------------------------------


def read_attention(family: Family, cfg: dict[str, Any]) -> tuple[list[str], int | None]:
    n = cfg["num_hidden_layers"]
    if family.attention == "full":
        return ["full_attention"] * n, None
    window = cfg.get("sliding_window") or None
    if family.attention == "global_window":
        return [("sliding_attention" if window else "full_attention")] * n, window
    if family.attention == "layer_types":
        types = list(cfg.get("layer_types") or ["full_attention"] * n)
        if window is None:  # sliding layers without a window attend to everything
            types = ["full_attention"] * n
        return types, window
    raise ValueError(f"unknown attention layout {family.attention!r}")


def write_attention(target: Target, types: list[str], window: int | None) -> dict[str, Any]:
    sliding = {t == "sliding_attention" for t in types}
    if target.attention == "layer_types":
        # Without sliding layers the window is left to the class, which normalises it away.
        any_sliding = True in sliding
        out = {"use_sliding_window": any_sliding, "max_window_layers": len(types), "layer_types": types}
        return out | ({"sliding_window": window} if any_sliding else {})
    if len(sliding) > 1:
        raise UpcycleError(
            f"the model mixes sliding-window and full-attention layers, which {target.name} cannot express; "
            "no exact target exists for it"
        )
    uniform = sliding.pop()
    if target.attention == "global_window":
        return {"sliding_window": window if uniform else None}
    if target.attention == "all_or_none":
        return {"use_sliding_window": uniform} | ({"sliding_window": window} if uniform else {})
    raise ValueError(f"unknown attention layout {target.attention!r}")


# --- the plan ----------------------------------------------------------------------------------------


def _layer_of(name: str) -> int | None:
    m = re.search(r"\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def _order(name: str) -> tuple[int, int, str]:
    layer = _layer_of(name)
    if layer is not None:
        return (1, layer, name)
    return (0 if "embed" in name else 2, 0, name)


def make_plan(cfg: dict[str, Any], tensors: dict[str, TensorInfo], spec: ConvertSpec) -> Plan:
    """Decide the target config and every tensor written. `cfg` is the dense config with defaults filled."""
    family = family_for(cfg.get("model_type"))
    check_causal_lm(cfg)
    for key, wanted in family.require.items():
        if cfg.get(key, wanted) != wanted:
            raise UpcycleError(
                f"this {family.name} model has {key}={cfg.get(key)!r}; no native MoE class holds that exactly "
                f"(upcycle needs {key}={wanted!r})"
            )
    num_layers = int(cfg["num_hidden_layers"])
    moe = moe_layer_indices(num_layers, spec)
    target = choose_target(family, spec, all_layers=len(moe) == num_layers)
    ffn = ffn_index(family, cfg, tensors)
    ignore = [re.compile(re.escape(p).replace(r"\{layer\}", r"\d+") + "$") for p in family.ignore]
    kept = {name: info for name, info in tensors.items() if not any(p.match(name) for p in ignore)}

    def out_dtype(src_dtype: str) -> str:
        if spec.dtype == "auto" or src_dtype not in FLOAT_DTYPES:
            return src_dtype
        return TORCH_TO_ST[spec.dtype]

    model_dtype = out_dtype(tensors[family.ffn["gate"].format(layer=0)].dtype)
    ops = tensor_ops(family, target, kept, ffn, moe, spec, out_dtype, model_dtype, hidden=int(cfg["hidden_size"]))
    return Plan(
        family=family.name,
        target=target.name,
        architecture=target.architecture,
        num_layers=num_layers,
        moe_layers=moe,
        experts=spec.experts,
        top_k=spec.top_k,
        config=target_config(family, target, cfg, spec, moe, model_dtype),
        ops=tuple(ops),
        exact=spec.init in expert_methods.EXACT,
        dense_params=sum(math.prod(t.shape) for t in kept.values()),
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
    spec: ConvertSpec,
    out_dtype: Callable[[str], str],
    model_dtype: str,
    hidden: int,
) -> list[TensorOp]:
    """Every tensor written, in streaming order: embeddings, then layer by layer, then the final norm and head.

    Within an MoE layer the router and the target's fixed extras take the FFN's place, and the experts close
    the layer, expert by expert, so that one expert's tensors sit together on disk.
    """
    make_expert = expert_methods.METHODS[spec.init]
    moe_set = set(moe)
    groups: dict[tuple[int, int], list[TensorOp]] = {}  # (section, layer) -> ops
    for name in sorted(tensors, key=_order):
        group = groups.setdefault(_order(name)[:2], [])
        if name not in ffn or ffn[name][0] not in moe_set:
            group.append(TensorOp(name, tensors[name].shape, out_dtype(tensors[name].dtype), "copy", src=name))
            continue
        layer, role = ffn[name]
        if role == "gate":  # the gate tensor stands for the whole FFN
            group.append(
                TensorOp(target.router.format(layer=layer), (spec.experts, hidden), model_dtype, "router", layer=layer)
            )
            for extra in target.extra:
                shape = tuple(hidden if d == "hidden_size" else int(d) for d in extra["shape"])
                group.append(TensorOp(extra["name"].format(layer=layer), shape, model_dtype, "zeros", layer=layer))
    for layer in moe:
        group = groups[(1, layer)]
        for e in range(spec.experts):
            for role in FFN_ROLES:
                src = family.ffn[role].format(layer=layer)
                built = make_expert(role, tensors[src].shape, e, spec.experts)
                name = target.expert[role].format(layer=layer, expert=e)
                group.append(
                    TensorOp(
                        name,
                        built.shape,
                        out_dtype(tensors[src].dtype),
                        "expert",
                        src=src,
                        layer=layer,
                        expert=e,
                        transform=built.transform,
                    )
                )
    return [op for key in sorted(groups) for op in groups[key]]


def target_config(
    family: Family, target: Target, cfg: dict[str, Any], spec: ConvertSpec, moe: tuple[int, ...], model_dtype: str
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
    config[target.config["expert_size"]] = expert_methods.INTERMEDIATE_SIZE[spec.init](intermediate, spec.experts)
    if target.interleave:
        config[target.config["dense_size"]] = intermediate
        config[target.config["dense_layers"]] = [i for i in range(num_layers) if i not in set(moe)]
    config["model_type"] = target.model_type
    config["architectures"] = [target.architecture]
    config["dtype"] = ST_TO_TORCH.get(model_dtype, "float32")
    return config

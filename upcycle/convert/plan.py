"""The conversion plan: which tensors the MoE checkpoint holds and where each comes from.

Pure: from the family and target tables, the dense config (as a dict) and the source tensor index, it
decides the target config and an ordered list of tensor operations. No tensor is read here, so a plan for
a 70B model costs nothing and `--dry-run` shows exactly what a conversion would write.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ..arch import FFN_ROLES, Family, Target, family_for, targets
from ..convert import methods as expert_methods
from ..errors import UpcycleError
from ..source import DTYPE_BYTES, TensorInfo
from .generic_plan import make_generic_plan, native_refusal, wants_generic
from .methods.base import power_of_two
from .spec import ConvertSpec
from .views import family_notes, transform_exact, untied, value_transform, with_views

TORCH_TO_ST = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}
ST_TO_TORCH = {v: k for k, v in TORCH_TO_ST.items()}
FLOAT_DTYPES = set(ST_TO_TORCH)
# Casts that keep every value: each value of the source dtype is also a value of the wider one.
LOSSLESS = {("BF16", "F32"), ("F16", "F32")}
DTYPE_MAX = {"F16": 65504.0, "BF16": 3.3895313892515355e38, "F32": 3.4028234663852886e38}  # largest finite


@dataclass(frozen=True)
class CastCheck:
    """What casting the source's floating tensors from `src` to `dst` does to their values, measured on them."""

    src: str  # safetensors dtypes, e.g. "BF16" -> "F16"
    dst: str
    values: int  # values cast
    largest: float  # largest finite |x| in the source
    rounded: int  # finite values that the cast changed but kept finite
    overflow: int  # finite values that became ±inf

    @property
    def exact(self) -> bool:
        return self.rounded == 0 and self.overflow == 0


@dataclass(frozen=True)
class Cast:
    """One source dtype -> written dtype pair of the plan, with what is known about its cost."""

    src: str
    dst: str
    lossless: bool  # exact by the dtypes alone (an upcast)
    check: CastCheck | None = None  # measured on the weights (downcasts only)

    @property
    def exact(self) -> bool:
        return self.lossless or (self.check is not None and self.check.exact)

    def describe(self) -> str:
        head = f"{self.src}→{self.dst}"
        if self.lossless:
            return f"{head}: exact (every {self.src} value is a {self.dst} value)"
        if self.check is None:
            return f"{head}: not measured; the cast may round values or overflow to inf"
        c = self.check
        top = DTYPE_MAX[self.dst]  # casts only ever go to the three dtypes --dtype offers
        limit = f"{top:g}" if top < 1e6 else f"{top:.3g}"
        return (
            f"{head}: largest |x| {c.largest:.4g} ({self.dst} max {limit}), "
            f"{c.rounded:,} of {c.values:,} values rounded, {c.overflow:,} overflow"
        )

    def to_dict(self) -> dict[str, Any]:
        c = self.check
        return {
            "src": self.src,
            "dst": self.dst,
            "exact": self.exact,
            "measured": c is not None,
            "values": c.values if c else None,
            "largest_abs": c.largest if c else None,
            "rounded": c.rounded if c else None,
            "overflow": c.overflow if c else None,
            "text": self.describe(),
        }


@dataclass(frozen=True)
class TensorOp:
    name: str  # key written
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype written
    kind: str  # "copy" | "expert" | "shared" | "router" | "zeros" | "fused"
    src: str | None = None  # source key for copy/expert/shared
    layer: int | None = None
    expert: int | None = None
    transform: tuple | None = None  # expert/shared: how it is computed (None: the source bytes); router: row sharing
    role: str | None = None  # expert/shared: gate, up or down
    values: tuple | None = None  # copy: an element-wise change of the source values (views.value_transform)
    parts: tuple[TensorOp, ...] = ()  # fused: the expert tensors whose bytes, in order, make this one

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
    notes: tuple[str, ...] = field(default=())  # things the user should know that are not errors
    casts: tuple[Cast, ...] = field(default=())  # dtype changes of copied and expert tensors
    exact_text: str = ""  # why the MoE is (or is not) exact at init, as the expert method sees it
    method_exact: bool = True  # exact as far as the expert method and its scales go (casts aside)

    def inexact_reason(self) -> str:
        """Why the MoE is not exact at init ("" when it is): the expert method, rounded values, casts."""
        if self.exact:
            return ""
        reasons = []
        if not self.method_exact:
            reasons.append(self.exact_text)
        elif "; but " in self.exact_text:  # the method is exact but values the family keeps in fp32 round
            reasons.append(self.exact_text.split("; but ", 1)[1])
        for c in self.casts:
            if not c.exact:
                rounded = f"rounds {c.check.rounded:,} values" if c.check else "is not measured and may round values"
                reasons.append(f"the {c.src}→{c.dst} cast {rounded}")
        return "; ".join(r for r in reasons if r) or self.exact_text

    def lossy_casts(self) -> list[tuple[str, str]]:
        """Dtype pairs whose cost has to be measured on the weights before the plan can claim exactness."""
        return [(c.src, c.dst) for c in self.casts if not c.lossless]

    @property
    def total_params(self) -> int:
        return sum(op.numel for op in self.ops)

    @property
    def active_params(self) -> int:
        """Parameters used per token: everything but the experts a token is not routed to."""
        per_expert: dict[int, int] = {}
        for op in self.flat_ops():
            if op.kind == "expert" and op.expert == 0:
                per_expert[op.layer] = per_expert.get(op.layer, 0) + op.numel
        idle = sum((self.experts - self.top_k) * n for n in per_expert.values())
        return self.total_params - idle

    def flat_ops(self) -> list[TensorOp]:
        """The ops with each fused tensor replaced by its per-expert parts (what the expert methods compute)."""
        return [part for op in self.ops for part in (op.parts or (op,))]

    @property
    def total_bytes(self) -> int:
        return sum(op.nbytes for op in self.ops)

    def op_table(self) -> list[dict[str, Any]]:
        """Every tensor written, in order: name, shape, dtype, kind and source tensor."""
        return [
            {
                "name": op.name,
                "shape": list(op.shape),
                "dtype": op.dtype,
                "kind": op.kind,
                "src": op.src,
                "transform": list(op.transform) if op.transform else None,
                **({"values": list(op.values)} if op.values else {}),
            }
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
            "exact_why": self.exact_text,
            "method_exact": self.method_exact,
            "casts": [c.to_dict() for c in self.casts],
            "tensors": len(self.ops),
            "dense_params": self.dense_params,
            "total_params": self.total_params,
            "active_params": self.active_params,
            "bytes": self.total_bytes,
            "notes": list(self.notes),
        }


def check_causal_lm(config: dict[str, Any]) -> None:
    archs = config.get("architectures") or []
    if archs and not any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in archs):  # GPT2LMHeadModel
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


def _generic_hint(family: Family) -> str:
    """How to get the model anyway, where upcycle's generic wrapper can hold it."""
    return "; --target generic keeps it exactly, as a model that needs trust_remote_code=True" if family.mlp else ""


def choose_target(family: Family, spec: ConvertSpec, all_layers: bool) -> Target:
    name = spec.target
    if name == "auto":
        name = family.auto_target["every_layer" if all_layers else "some_layers"]
    if name not in family.targets:
        choices = sorted(family.targets) + (["generic"] if family.mlp else [])
        raise UpcycleError(
            f"a {family.name} model has no exact {name} form; choose --target {' or '.join(choices)} (or auto)"
        )
    target = targets()[name]
    if not all_layers and not target.interleave:
        choices = [t for t in family.targets if targets()[t].interleave]
        if not choices:
            raise UpcycleError(
                f"{name} makes every layer MoE (it has no dense layers), and it is the only native MoE class "
                f"that holds {family.name} models exactly; make every layer MoE (--every 1, no --layers)"
            )
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
    if target.attention == "none":  # the class has no sliding window (FlexOlmo, GraniteMoe)
        if uniform:
            raise UpcycleError(f"the model uses sliding-window attention, which {target.name} does not have")
        return {}
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


def make_plan(
    cfg: dict[str, Any],
    tensors: dict[str, TensorInfo],
    spec: ConvertSpec,
    *,
    expected: Collection[str] | None = None,
    optional: Collection[str] = (),
    measured: Mapping[tuple[str, str], CastCheck] | None = None,
) -> Plan:
    """Decide the target config and every tensor written. `cfg` is the dense config with defaults filled.

    `expected` is every key the dense class holds for this config (None: not checked), `optional` the keys
    among them that may be absent (tied weights). `measured` holds what each lossy dtype cast costs, as
    measured on the weights; without it a lossy cast is not claimed exact.
    """
    family = family_for(cfg.get("model_type"))
    check_causal_lm(cfg)
    if wants_generic(family, cfg, spec):  # upcycle's own wrapper: generic_plan.py
        return make_generic_plan(family, cfg, tensors, spec, expected=expected, optional=optional, measured=measured)
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


def written_dtype(spec: ConvertSpec) -> Callable[[str], str]:
    """source dtype -> the dtype written: `--dtype` for floating tensors, the source's own otherwise."""

    def out_dtype(src_dtype: str) -> str:
        if spec.dtype == "auto" or src_dtype not in FLOAT_DTYPES:
            return src_dtype
        return TORCH_TO_ST[spec.dtype]

    return out_dtype


def plan_casts(
    ops: Collection[TensorOp], source: Mapping[str, TensorInfo], measured: Mapping[tuple[str, str], CastCheck] | None
) -> tuple[Cast, ...]:
    """Every (source dtype, written dtype) pair the ops cast, with what `measured` knows of its cost."""
    pairs = sorted({(source[op.src].dtype, op.dtype) for op in ops if op.src and source[op.src].dtype != op.dtype})
    return tuple(Cast(a, b, (a, b) in LOSSLESS, (measured or {}).get((a, b))) for a, b in pairs)


def config_value(cfg: dict[str, Any], key: str, default: Any = None) -> Any:
    """A config field; a dotted key reads inside a dict field (rope_parameters.partial_rotary_factor)."""
    value: Any = cfg
    for part in key.split("."):
        if not isinstance(value, dict) or value.get(part) is None:
            return default
        value = value[part]
    return value


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
        values = value_transform(family, cfg, op.src) if op.kind == "copy" else None
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
        raise UpcycleError(
            f"--routing softmax-topk keeps the top-k weights unnormalised, but {target.name}, the only native MoE "
            f"class for {family.name} models, always renormalises them; use --routing topk-softmax"
        )
    if not spec.renormalize and target.renormalize == "always":
        raise UpcycleError(
            f"--routing softmax-topk keeps the top-k weights unnormalised, but {target.name} always renormalises "
            "them; use --target qwen2_moe (or qwen3_moe for Qwen3) or --routing topk-softmax"
        )
    if spec.shared_experts and not target.shared and mine and not any(t.shared for t in mine):
        raise UpcycleError(
            f"--shared-experts needs a target class with a shared expert that upcycle fills; {target.name} has none, "
            f"and no native MoE class for {family.name} models has one; leave --shared-experts out"
            + (
                " (--target generic, upcycle's own wrapper, also holds one: it needs trust_remote_code=True outside "
                "upcycle)"
                if family.mlp
                else ""
            )
        )
    if spec.shared_experts and not target.shared:
        have = [t.name for t in targets().values() if t.shared]
        raise UpcycleError(
            f"--shared-experts needs a target class with a shared expert ({', '.join(have)}); "
            f"{target.name} has none. Use --target {have[0]} or leave --shared-experts out (--target generic, "
            "upcycle's own wrapper, also holds one: it needs trust_remote_code=True outside upcycle)"
        )


def scaling_rounds(layout: expert_methods.Layout, dtype: str) -> tuple[bool, str]:
    """Scaling down_proj by a power of two rounds nothing; by another factor it rounds once per value, which
    float32 absorbs (below 1e-7 relative) but a 16-bit dtype does not. -> (exact kept, explanation)."""
    odd = sorted(x for x in layout.scales() if not power_of_two(x))
    if not odd or dtype in ("F32", "F64"):
        return True, layout.why
    factors = ", ".join(f"{x:g}" for x in odd)
    return False, f"{layout.why}; but scaling down_proj by {factors} rounds {dtype} values, so only approximately"


def _and_more(names: list[str]) -> str:
    return names[0] + (f" (and {len(names) - 1} more)" if len(names) > 1 else "")


def account_for(
    family: Family,
    tensors: dict[str, TensorInfo],
    num_layers: int,
    expected: Collection[str] | None,
    optional: Collection[str],
) -> tuple[dict[str, TensorInfo], tuple[str, ...]]:
    """The tensors the plan writes, after checking that every source tensor is one the model really uses.

    A tensor nobody accounts for would be copied into the MoE and then silently ignored by transformers
    (or, past the last layer, silently dropped), so it is an error. Only the family's known harmless extras
    (old checkpoints' rotary `inv_freq` buffers) are left out, with a note.
    """
    ignore = [re.compile(re.escape(p).replace(r"\{layer\}", r"\d+") + "$") for p in family.ignore]
    ignored = sorted((n for n in tensors if any(p.match(n) for p in ignore)), key=_order)
    kept = {name: info for name, info in tensors.items() if name not in set(ignored)}
    beyond = sorted((n for n in kept if (_layer_of(n) or 0) >= num_layers), key=_order)
    if beyond:
        last = max(_layer_of(n) for n in beyond)
        raise UpcycleError(
            f"the weights hold {_and_more(beyond)} of layers up to {last}, but config.json says "
            f"num_hidden_layers={num_layers}: config.json and the weights disagree; fix num_hidden_layers "
            "or use the config that came with these weights"
        )
    if expected is not None:
        unknown = sorted(set(kept) - set(expected), key=_order)
        if unknown:
            raise UpcycleError(
                f"the weights hold {_and_more(unknown)}, which a {family.name} model with this config.json does "
                "not have: config.json and the weights disagree (or the checkpoint is not a plain "
                f"{family.name} model); upcycle will not drop weights silently"
            )
        missing = sorted(set(expected) - set(kept) - set(optional), key=_order)
        if missing:
            raise UpcycleError(
                f"the checkpoint has no tensor {_and_more(missing)}, which this config.json requires: "
                "config.json and the weights disagree, or the checkpoint is incomplete"
            )
    notes = ()
    if ignored:
        notes = (f"left out {_and_more(ignored)}: a buffer transformers recomputes and does not load",)
    return kept, notes


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
    router_rows = ("rows", layout.router_group) if layout.router_group > 1 else None
    shared_roles = {name: role for role, name in target.shared.items() if role in FFN_ROLES} if layout.shared else {}
    moe_set = set(moe)

    def ffn_op(name: str, layer: int, role: str, built: expert_methods.ExpertTensor, kind: str, e: int | None):
        src = family.ffn[role].format(layer=layer)
        dtype = out_dtype(tensors[src].dtype)
        return TensorOp(
            name, built.shape, dtype, kind, src=src, layer=layer, expert=e, transform=built.transform, role=role
        )

    groups: dict[tuple[int, int], list[TensorOp]] = {}  # (section, layer) -> ops
    for name in sorted(tensors, key=_order):
        group = groups.setdefault(_order(name)[:2], [])
        if name not in ffn or ffn[name][0] not in moe_set:
            group.append(TensorOp(name, tensors[name].shape, out_dtype(tensors[name].dtype), "copy", src=name))
            continue
        layer, role = ffn[name]
        if role == "gate":  # the gate tensor stands for the whole FFN
            name = target.router.format(layer=layer)
            group.append(TensorOp(name, (experts, hidden), model_dtype, "router", layer=layer, transform=router_rows))
            for extra in target.extra:
                name = extra["name"].format(layer=layer)
                if extra["name"] in shared_roles:  # the shared expert, built like the routed ones
                    role = shared_roles[extra["name"]]
                    group.append(ffn_op(name, layer, role, layout.shared[role], "shared", None))
                    continue
                dims = {"hidden_size": hidden, "experts": experts, "expert_size": layout.expert_size}
                shape = tuple(dims[d] if isinstance(d, str) else int(d) for d in extra["shape"])
                group.append(TensorOp(name, shape, model_dtype, "zeros", layer=layer))
    for layer in moe:
        group = groups[(1, layer)]
        if target.fused:  # all experts of a layer in one tensor per fused key
            group.extend(fused_ops(target, layer, layout, ffn_op))
            continue
        for e, built in enumerate(layout.experts):
            for role in FFN_ROLES:
                name = target.expert[role].format(layer=layer, expert=e)
                group.append(ffn_op(name, layer, role, built[role], "expert", e))
    return [op for key in sorted(groups) for op in groups[key]]


def layer_range(target: Target, moe: tuple[int, ...]) -> dict[str, int]:
    """The target's range fields for these MoE layers: start, end and the step `interval`, the largest step that
    divides every (i + 1); any step that fits divides it, so if it selects other layers too, none fits."""
    interval = math.gcd(*(i + 1 for i in moe))
    start, end = min(moe), max(moe)
    if tuple(i for i in range(start, end + 1) if (i + 1) % interval == 0) != tuple(sorted(moe)):
        raise UpcycleError(
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
            ffn_op(f"{name}[{e}].{role}", layer, role, built[role], "expert", e)
            for e, built in enumerate(layout.experts)
            for role in roles
        )
        rows = sum(p.shape[0] for p in parts[: len(roles)])  # expert 0's parts: one per role
        shape = (len(layout.experts), rows, parts[0].shape[1])
        ops.append(TensorOp(name, shape, parts[0].dtype, "fused", layer=layer, parts=parts))
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

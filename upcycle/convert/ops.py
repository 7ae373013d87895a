"""The conversion's instruction set: typed tensor operations and the plan that lists them. Data only.

A plan is an ordered tuple of ops, one per tensor written. Each op type says where its bytes come from:

* `Copy`: a source tensor (a byte-range copy, or a cast when the dtypes differ), optionally changed
  element-wise by the family (`ValueChange`, Gemma's 1+w);
* `Expert`: one FFN tensor of one routed expert (`Shared`: of the shared expert), the dense tensor itself
  or what its method's transform (`Parts`, `Drop`, `Noise`) computes from the layer's dense FFN;
* `Mean`: a source tensor averaged over several sources in float32, then cast (`--shared-weights average`);
* `Router`: a new gate weight, initialised by `--router-init`; `Zeros`: a tensor the target needs as zeros;
* `Fused`: all experts of a layer in one tensor, the bytes of its `Expert` parts in order.

`execute.produce` turns any op into bytes: the converter writes them, `verify --layerwise` compares them. A
new kind of op is one dataclass here and one handler there; a new expert method is one transform here, one
branch of `methods.LayerBuilder` and its layout module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from ..dtypes import DTYPE_BYTES, DTYPE_MAX

# --- expert transforms: how an expert tensor is computed from the dense tensor of its role -------------------


@dataclass(frozen=True)
class Parts:
    """The neurons of parts `chosen` of a `by` partition into `parts`, times `scale` (split, fine-grained, and
    clone's scaled down_proj as one part of one)."""

    by: str  # contiguous | random | cluster | coactivation
    parts: int
    chosen: tuple[int, ...]
    scale: float
    kind: ClassVar[str] = "parts"

    def as_list(self) -> list:
        return [self.kind, self.by, self.parts, self.chosen, self.scale]


@dataclass(frozen=True)
class Drop:
    """Drop-Upcycling: expert `expert`'s copy with a fraction `ratio` of its neurons drawn anew, times `scale`."""

    expert: int
    ratio: float
    scale: float
    kind: ClassVar[str] = "drop"

    def as_list(self) -> list:
        return [self.kind, self.expert, self.ratio, self.scale]


@dataclass(frozen=True)
class Noise:
    """Expert `expert`'s copy times independent N(1, sigma) draws, times `scale`."""

    expert: int
    sigma: float
    scale: float
    kind: ClassVar[str] = "noise"

    def as_list(self) -> list:
        return [self.kind, self.expert, self.sigma, self.scale]


Transform = Parts | Drop | Noise  # every transform holds all the tensor depends on besides dense FFN, seed, layer


@dataclass(frozen=True)
class ValueChange:
    """An element-wise change of a copied tensor: "add" c (y = x + c) or "mul" c (y = c·x), computed in
    `arithmetic` ("float32", then cast to the written dtype, or "weight": the written dtype)."""

    how: Literal["add", "mul"]
    constant: float
    arithmetic: str

    def as_list(self) -> list:
        return [self.how, self.constant, self.arithmetic]


# --- tensor operations ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorOp:
    """One tensor written: its key, shape and safetensors dtype. Subclasses say where its bytes come from."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    kind: ClassVar[str]  # the op's name in the plan's JSON (--dry-run --json)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES[self.dtype]

    def row(self) -> dict[str, Any]:
        """The op as `--dry-run --json` lists it."""
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "kind": self.kind, "src": None,
                "transform": None}  # fmt: skip


@dataclass(frozen=True)
class Copy(TensorOp):
    src: str  # source key (a view's or alias's name where the family reads one)
    values: ValueChange | None = None
    kind: ClassVar[str] = "copy"

    def row(self) -> dict[str, Any]:
        return super().row() | {"src": self.src} | ({"values": self.values.as_list()} if self.values else {})


@dataclass(frozen=True)
class Mean(TensorOp):
    """The source tensor `src` averaged over `sources` (indices, see the module's doc) in float32, then changed
    by `values` (if any) and cast: BTX's averaged attention, norms and embeddings (`--shared-weights average`)."""

    src: str
    sources: tuple[int, ...]
    values: ValueChange | None = None
    kind: ClassVar[str] = "mean"

    def row(self) -> dict[str, Any]:
        extra = {"values": self.values.as_list()} if self.values else {}
        return super().row() | {"src": self.src, "sources": list(self.sources)} | extra


@dataclass(frozen=True)
class Expert(TensorOp):
    src: str  # the dense FFN tensor of the same role
    layer: int
    expert: int | None  # routed expert index (None: the shared expert)
    transform: Transform | None = None  # None: the dense bytes themselves
    role: str | None = None  # gate, up or down (None: a bias the generic wrapper copies)
    source: int = 0  # which model the dense FFN is read from: 0 BASE, i the i-th --expert-from
    kind: ClassVar[str] = "expert"

    def row(self) -> dict[str, Any]:
        row = super().row() | {"src": self.src, "transform": self.transform.as_list() if self.transform else None}
        return row | ({"source": self.source} if self.source else {})


@dataclass(frozen=True)
class Shared(Expert):
    """A tensor of the always-on shared expert: built like a routed expert's."""

    kind: ClassVar[str] = "shared"


@dataclass(frozen=True)
class Router(TensorOp):
    layer: int
    group: int = 1  # consecutive experts sharing one row (fine-grained virtual groups)
    kind: ClassVar[str] = "router"

    def row(self) -> dict[str, Any]:
        return super().row() | {"transform": ["rows", self.group] if self.group > 1 else None}


@dataclass(frozen=True)
class Serving:
    """Whether one serving engine loads the output, how we know it, and why (not)."""

    engine: str
    loads: bool
    evidence: str  # "tested", "read" (from the engine's code), "native" (transformers), or "unchecked"
    why: str

    def to_dict(self) -> dict[str, Any]:
        return {"engine": self.engine, "loads": self.loads, "evidence": self.evidence, "why": self.why}


@dataclass(frozen=True)
class Zeros(TensorOp):
    """A tensor of one constant: zeros, or `value` where an engine needs a non-zero constant (see serving.py)."""

    layer: int
    value: float = 0.0
    kind: ClassVar[str] = "zeros"

    def row(self) -> dict[str, Any]:
        return super().row() | ({"value": self.value} if self.value else {})


@dataclass(frozen=True)
class Fused(TensorOp):
    layer: int
    parts: tuple[Expert, ...]  # the expert tensors whose bytes, in order, make this one
    kind: ClassVar[str] = "fused"


def by_coactivation(op: TensorOp) -> bool:
    """Is OP an expert tensor cut from a --split-by coactivation partition (made from calibration text)?"""
    return isinstance(op, Expert) and isinstance(op.transform, Parts) and op.transform.by == "coactivation"


def flat(op: TensorOp) -> tuple[TensorOp, ...]:
    """A fused op's per-expert parts, any other op itself."""
    return op.parts if isinstance(op, Fused) else (op,)


# --- dtype casts ------------------------------------------------------------------------------------------------


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


# --- several sources ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorDiff:
    """How one non-expert tensor differs between the source models: what `--shared-weights average` changes."""

    name: str
    differing: tuple[int, ...]  # source indices whose tensor is not BASE's, bit for bit
    max_abs: float  # largest |x_source - x_BASE| over those sources
    relative: float  # ||mean - x_BASE|| / ||x_BASE||: how far the average moves BASE's tensor

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "sources": list(self.differing), "max_abs": self.max_abs,
                "relative": self.relative}  # fmt: skip


@dataclass(frozen=True)
class SourceCasts:
    """What writing one --expert-from model's FFN tensors as the written dtype does: its own casts, measured on
    its weights, or why they could not be (a GGUF file is dequantized only by the conversion)."""

    source: str  # public name
    stored: tuple[str, ...]  # the dtypes its expert tensors are stored in
    casts: tuple[Cast, ...]  # () when every one is written in its own dtype
    unmeasured: str = ""  # why its weights were not read ("": they were, where a cast needed it)

    def describe(self) -> str:
        if self.unmeasured:  # the casts its metadata implies, nothing about its values
            kept = f"none ({', '.join(self.stored)}, written as is)"
            what = ", ".join(f"{c.src}→{c.dst}" for c in self.casts) or kept
            return f"{what}; not measured: {self.unmeasured}"
        if not self.casts:
            return f"none (stored as {', '.join(self.stored)}, written as is)"
        return "; ".join(c.describe() for c in self.casts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "stored": list(self.stored),
            "casts": [c.to_dict() for c in self.casts],
            "measured": not self.unmeasured,
            "unmeasured": self.unmeasured or None,
            "text": self.describe(),
        }


# --- the plan ----------------------------------------------------------------------------------------------------


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
    sources: tuple[str, ...] = ()  # the --expert-from models (public names) the experts come from; (): SRC alone
    differences: tuple[TensorDiff, ...] = ()  # non-expert tensors that differ between the sources (measured)
    source_casts: tuple[SourceCasts, ...] = ()  # each --expert-from model's casts into the written dtype
    unmeasured: str = ""  # why `differences` could not be measured ("": it was); then it is empty, not "none"
    serving: tuple[Serving, ...] = ()  # where the output runs: one verdict per engine (convert/serving.py)

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
            if isinstance(op, Expert) and op.expert == 0:
                per_expert[op.layer] = per_expert.get(op.layer, 0) + op.numel
        idle = sum((self.experts - self.top_k) * n for n in per_expert.values())
        return self.total_params - idle

    def flat_ops(self) -> list[TensorOp]:
        """The ops with each fused tensor replaced by its per-expert parts (what the expert methods compute)."""
        return [part for op in self.ops for part in flat(op)]

    def expert_ops(self) -> list[Expert]:
        """Every expert tensor (routed and shared, fused ones as their parts), in order."""
        return [op for op in self.flat_ops() if isinstance(op, Expert)]

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

    @property
    def total_bytes(self) -> int:
        return sum(op.nbytes for op in self.ops)

    def op_table(self) -> list[dict[str, Any]]:
        """Every tensor written, in order: name, shape, dtype, kind and source tensor."""
        return [op.row() for op in self.ops]

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
        } | ({"serving": [v.to_dict() for v in self.serving]} if self.serving else {}) | (
            {"sources": list(self.sources), "shared_differences": [d.to_dict() for d in self.differences],
             "shared_differences_measured": not self.unmeasured, "unmeasured": self.unmeasured or None,
             "source_casts": [c.to_dict() for c in self.source_casts]}
            if self.sources else {})  # fmt: skip

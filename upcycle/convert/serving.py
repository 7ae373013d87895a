"""`convert --serve ENGINE[,ENGINE]`: which serving engines load an output, and the layout that makes them.

The engines' facts are data (`RULES`): per engine and target class, what the engine reads from config.json and the
tensors, found by running it (llama.cpp, tests/test_engine_llama_cpp.py) or by reading its model code (vLLM,
SGLang; file, line and version in docs/serving.md). A rule is either a *fix*, a layout change that keeps the MoE
exactly what it is in transformers (explicit zero biases, an untied head, a zero shared expert of non-zero width)
and is written only when a named engine needs it, or a *limit* no layout of the target gets round, which refuses
a named engine in one line naming the flag that would work.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from ..arch import GENERIC
from ..errors import NoForm, UpcycleError
from .ops import Copy, Plan, Serving, TensorOp, Zeros

ENGINES = ("transformers", "llama.cpp", "vllm", "sglang")
DEFAULT = ("transformers",)
LLAMA_CPP = "llama.cpp (vendored in llama-cpp-python 0.3.36)"
VLLM = "vLLM 0.34.0"
SGLANG = "SGLang 0.5.23"

# a shared expert of this width, all zeros, stands for "no shared expert" where an engine cannot hold width 0
SHARED_PAD = 64
# the shared-expert gate where llama.cpp reads it: its sigmoid is silu(x)/x, NaN at x = 0 exactly, so the gate is
# written as this constant instead of zeros. 2^-64 * sum(x) stays a normal float32 for any |sum(x)| > 2^-62 and
# is far below 2^-25, where sigmoid rounds to exactly 1/2 in float32 and bfloat16 (as sigmoid(0) does).
GATE_FILL = 2.0**-64


def parse_serve(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """--serve llama.cpp,vllm (or a YAML list) -> the engines, in ENGINES' order; one line for a bad name."""
    if value is None:
        return DEFAULT
    items = [value] if isinstance(value, str) else list(value)
    names = [p.strip().lower() for item in items for p in str(item).split(",") if p.strip()]
    if not names:
        raise UpcycleError(f"--serve is empty; name one or more of: {', '.join(ENGINES)}")
    aliases = {"llamacpp": "llama.cpp", "llama-cpp": "llama.cpp", "gguf": "llama.cpp", "hf": "transformers"}
    names = [aliases.get(n, n) for n in names]
    bad = [n for n in names if n not in ENGINES]
    if bad:
        raise UpcycleError(
            f"--serve {bad[0]!r} is not an engine upcycle knows; name one or more of: {', '.join(ENGINES)}"
        )
    return tuple(e for e in ENGINES if e in names)


# --- the facts ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """What a plan writes, as the rules see it (from the plan's config and layers)."""

    target: str
    every_layer: bool
    renormalize: bool | None  # None: the class always renormalises (Mixtral)
    shared_size: int
    tied: bool
    qkv_bias: bool | None  # Qwen2-MoE's qkv_bias (None: the target has no such field)
    head_dim_derived: bool  # head_dim == hidden_size / num_attention_heads
    dtype: str
    gate_nonzero: bool  # every shared-expert gate written as a non-zero constant (or computed)
    act: str = "silu"  # the experts' activation (hidden_act)
    sliding: bool = False  # some layer attends through a sliding window


@dataclass(frozen=True)
class Rule:
    """One thing an engine needs of a target's output. `holds(layout)`; else `fix` (a name in FIXES: a layout
    change that keeps the MoE exact) or, without one, the output does not run there and `why` says so, with
    `flag`, what would work."""

    holds: Callable[[Layout], bool]
    why: str
    fix: str | None = None
    flag: str = ""


def _is_qwen2(target: str) -> bool:
    return target == "qwen2_moe"


# llama.cpp's Mixtral (its llama graph), Qwen2-MoE and Qwen3-MoE: SiLU experts and full attention, whatever the
# GGUF says (LLM_FFN_SILU in src/models/llama.cpp, qwen2moe.cpp and qwen3moe.cpp; none of them reads a window)
LLAMA_CPP_GRAPH = (
    Rule(
        lambda x: x.act == "silu",
        "its MoE graphs compute every expert with SiLU (LLM_FFN_SILU) and ignore hidden_act, and this model's "
        "activation is not silu (Gemma's gelu_pytorch_tanh)",
        flag="a --serve list without llama.cpp (no layout of this model runs there)",
    ),
    Rule(
        lambda x: not x.sliding,
        "its MoE graphs read no sliding window and attend over the whole context, and this model attends through one",
        flag="a --serve list without llama.cpp (no layout of this model runs there)",
    ),
)
QWEN2_LLAMA_CPP = (
    *LLAMA_CPP_GRAPH,
    Rule(
        lambda x: x.every_layer,
        "its Qwen2-MoE needs a router and experts in every layer (mlp_only_layers is not "
        "read; its converter stops at 'Can not map tensor model.layers.0.mlp.down_proj.weight')",
        flag="--every 1 (every layer MoE, no --layers)",
    ),
    Rule(
        lambda x: x.renormalize is False,
        "its Qwen2-MoE never renormalises the kept top-k weights (it does not read "
        "norm_topk_prob), so a topk-softmax output computes something else there",
        flag="--routing softmax-topk --router-init zero (exact)",
    ),
    Rule(
        lambda x: x.dtype != "F16",
        "its Qwen2-MoE computes the shared-expert gate's sigmoid as silu(x)/x, and a "
        "float16 gate cannot hold the tiny non-zero constant that keeps x away from 0 and the gate exactly 1/2",
        flag="--dtype bfloat16 or float32",
    ),
    Rule(
        lambda x: x.shared_size > 0,
        "its Qwen2-MoE always has a shared expert and refuses a zero-width one",
        fix="shared_pad",
    ),
    Rule(
        lambda x: x.gate_nonzero,
        "its sigmoid is silu(x)/x, NaN where the gate's x is 0, as a zero gate makes it",
        fix="gate_fill",
    ),
    Rule(lambda x: not x.tied, "its Qwen2-MoE needs its own output matrix ('output.weight not found')", fix="untie"),
)
QWEN3_LLAMA_CPP = (
    *LLAMA_CPP_GRAPH,
    Rule(
        lambda x: x.every_layer,
        "its Qwen3-MoE needs a router and experts in every layer (its converter stops at "
        "'Can not map tensor model.layers.0.mlp.down_proj.weight')",
        flag="--every 1 (every layer MoE, no --layers)",
    ),
    Rule(
        lambda x: x.renormalize is not False,
        "its Qwen3-MoE always renormalises the kept top-k weights",
        flag="--routing topk-softmax",
    ),
)
# vLLM's and SGLang's Mixtral, Qwen2-MoE and Qwen3-MoE run the routed experts through FusedMoE, whose activation
# is "silu" unless the model passes another, and none of the three passes hidden_act (vllm/model_executor/
# models/mixtral.py, qwen2_moe.py, qwen3_moe.py; sglang/srt/models/ likewise); Qwen2-MoE's shared-expert MLP
# refuses anything but silu. So a GELU model (Gemma) would load there and compute something else.
FUSED_MOE_SILU = Rule(
    lambda x: x.act == "silu",
    "its fused MoE kernels compute every expert with SiLU and do not read hidden_act, and this model's activation "
    "is not silu (Gemma's gelu_pytorch_tanh)",
    flag="a --serve list without vllm and sglang (no layout of this model runs there)",
)
QWEN2_VLLM = (
    FUSED_MOE_SILU,
    Rule(
        lambda x: x.qkv_bias is not False,
        "its Qwen2-MoE attention always has q/k/v biases (bias=True) and would keep them unset",
        fix="qkv_bias",
    ),
    Rule(
        lambda x: x.head_dim_derived,
        "its Qwen2-MoE takes head_dim as hidden_size / num_attention_heads, and this model's head_dim differs",
        flag="--target generic",
    ),
)
QWEN2_SGLANG = (
    FUSED_MOE_SILU,
    Rule(
        lambda x: x.every_layer,
        "its Qwen2-MoE makes every layer sparse (mlp_only_layers is not read)",
        flag="--every 1 (every layer MoE, no --layers)",
    ),
    Rule(
        lambda x: x.head_dim_derived,
        "its Qwen2-MoE takes head_dim as hidden_size / num_attention_heads, and this model's head_dim differs",
        flag="--target generic",
    ),
)

SGLANG_MIXTRAL = (
    FUSED_MOE_SILU,
    Rule(
        lambda x: x.head_dim_derived,
        "its Mixtral takes head_dim as hidden_size / num_attention_heads, and this model's head_dim differs",
        flag="a --serve list without sglang",
    ),
)
SGLANG_QWEN3 = (
    FUSED_MOE_SILU,
    Rule(
        lambda x: x.every_layer,
        "its Qwen3-MoE makes every layer sparse (mlp_only_layers is not read)",
        flag="--every 1 (every layer MoE, no --layers)",
    ),
)

# engine -> target -> (evidence, rules); a target not listed is one we have neither run nor read there
RULES: dict[str, dict[str, tuple[str, tuple[Rule, ...]]]] = {
    "llama.cpp": {
        "mixtral": ("tested", LLAMA_CPP_GRAPH),
        "qwen2_moe": ("tested", QWEN2_LLAMA_CPP),
        "qwen3_moe": ("tested", QWEN3_LLAMA_CPP),
    },
    "vllm": {
        "mixtral": ("read", (FUSED_MOE_SILU,)),
        "qwen2_moe": ("read", QWEN2_VLLM),
        "qwen3_moe": ("read", (FUSED_MOE_SILU,)),
    },
    "sglang": {
        "mixtral": ("read", SGLANG_MIXTRAL),
        "qwen2_moe": ("read", QWEN2_SGLANG),
        "qwen3_moe": ("read", SGLANG_QWEN3),
    },
}
VERSIONS = {"llama.cpp": LLAMA_CPP, "vllm": VLLM, "sglang": SGLANG}


def read_layout(plan: Plan) -> Layout:
    c = plan.config
    norm = c.get("norm_topk_prob")
    heads = int(c.get("num_attention_heads") or 1)
    derived = int(c.get("head_dim") or 0) in (0, int(c.get("hidden_size", 0)) // heads)
    dtypes = {op.dtype for op in plan.ops}
    return Layout(
        target=plan.target,
        every_layer=len(plan.moe_layers) == plan.num_layers,
        renormalize=None if norm is None else bool(norm),
        shared_size=int(c.get("shared_expert_intermediate_size") or 0),
        tied=bool(c.get("tie_word_embeddings", False)),
        qkv_bias=c.get("qkv_bias") if "qkv_bias" in c else None,
        head_dim_derived=derived,
        dtype="F16" if dtypes == {"F16"} or c.get("dtype") == "float16" else "other",
        gate_nonzero=all(
            op.value != 0 for op in plan.ops if isinstance(op, Zeros) and op.name.endswith("shared_expert_gate.weight")
        ),
        act=str(c.get("hidden_act") or "silu"),
        sliding=_slides(c),
    )


def _slides(c: dict[str, Any]) -> bool:
    """Whether the written config makes transformers attend through a sliding window in some layer."""
    if c.get("layer_types"):
        return "sliding_attention" in c["layer_types"]
    if c.get("sliding_window") is None:
        return False
    return bool(c.get("use_sliding_window", True))  # Qwen2/3-MoE switch it on; Mixtral uses any window it is given


def verdict(engine: str, plan: Plan, fixed: frozenset[str] = frozenset()) -> tuple[Serving, Rule | None]:
    """Does ENGINE load PLAN's output as written (with the fixes `fixed` applied)? -> (verdict, the rule that fails)."""
    if engine == "transformers":
        if plan.target == GENERIC:
            return Serving(engine, True, "native", "upcycle's wrapper, loaded with trust_remote_code=True"), None
        # several sources: the MoE computes none of them, so verify checks each tensor against its source instead
        checks = "verify checks every tensor against its source" if plan.sources else "verify checks the logits"
        return Serving(engine, True, "native", f"its own {plan.architecture}; {checks}"), None
    if plan.target == GENERIC:
        return Serving(engine, False, "unchecked", "upcycle's generic wrapper is no architecture it knows"), Rule(
            lambda x: False, "", flag="a native --target"
        )
    known = RULES[engine].get(plan.target)
    if known is None:
        why = f"upcycle has neither run nor read {plan.target} outputs there"
        return Serving(engine, False, "unchecked", why), Rule(
            lambda x: False, why, flag="--target mixtral/qwen2_moe/qwen3_moe where the source allows, or no --serve"
        )
    evidence, rules = known
    layout = read_layout(plan)
    for rule in rules:
        if rule.holds(layout) or (rule.fix is not None and rule.fix in fixed):
            continue
        return Serving(engine, False, evidence, rule.why), rule
    how = "run by the engine tests" if evidence == "tested" else "by reading its model code"
    return Serving(engine, True, evidence, f"{VERSIONS[engine]}, {how}"), None


def needed_fixes(engines: Sequence[str], plan: Plan) -> frozenset[str]:
    """The exact layout changes the named engines need (a fix that no rule of theirs asks for is not written)."""
    layout = read_layout(plan)
    out: set[str] = set()
    for engine in engines:
        _, rules = RULES.get(engine, {}).get(plan.target, ("", ()))
        out |= {r.fix for r in rules if r.fix is not None and not r.holds(layout)}
    return frozenset(out)


def refusal(engines: Sequence[str], plan: Plan) -> str | None:
    """One line: why a named engine would not load the output, and the flag that would work (None: all load)."""
    fixed = needed_fixes(engines, plan)
    for engine in engines:
        found, rule = verdict(engine, plan, fixed)
        if not found.loads:
            flag = f"; use {rule.flag}" if rule is not None and rule.flag else ""
            return f"--serve {engine}: {plan.target} output would not run in {engine}: {found.why}{flag}"
    return None


def serve(plan: Plan, engines: Sequence[str], cfg: dict[str, Any]) -> Plan:
    """PLAN with the layout the named engines need (every change exact), and each engine's verdict; UpcycleError
    when a named engine cannot load any layout of this target."""
    why = refusal(engines, plan)
    if why is not None:
        raise NoForm(why)
    fixes = needed_fixes(engines, plan)
    notes = list(plan.notes)
    for name in sorted(fixes):
        plan, note = FIXES[name](plan, cfg)
        notes.append(f"--serve {','.join(engines)}: {note}")
    verdicts = tuple(verdict(e, plan)[0] for e in ENGINES)
    return replace(plan, notes=tuple(notes), serving=verdicts)


# --- the fixes: each keeps the MoE exactly what it computes in transformers ------------------------------------


def _replace_ops(plan: Plan, change: Callable[[TensorOp], TensorOp]) -> tuple[TensorOp, ...]:
    return tuple(change(op) for op in plan.ops)


def _shared_pad(plan: Plan, cfg: dict[str, Any]) -> tuple[Plan, str]:
    def widen(op: TensorOp) -> TensorOp:
        if isinstance(op, Zeros) and ".shared_expert." in op.name:
            return replace(op, shape=tuple(SHARED_PAD if d == 0 else d for d in op.shape))
        return op

    config = plan.config | {"shared_expert_intermediate_size": SHARED_PAD}
    note = (
        f"no shared expert is written as a zero one of width {SHARED_PAD} (llama.cpp refuses width 0); its "
        "down_proj is zero, so it adds exactly 0"
    )
    return replace(plan, ops=_replace_ops(plan, widen), config=config), note


def _gate_fill(plan: Plan, cfg: dict[str, Any]) -> tuple[Plan, str]:
    def fill(op: TensorOp) -> TensorOp:
        return replace(op, value=GATE_FILL) if isinstance(op, Zeros) and op.name.endswith("shared_expert_gate.weight") \
            else op  # fmt: skip

    note = (
        "the shared-expert gate is 2^-64 everywhere, not 0: llama.cpp's sigmoid (silu(x)/x) is NaN at 0, and "
        "sigmoid(2^-64 * sum(x)) is exactly 1/2 in float32 and bfloat16, as sigmoid(0) is"
    )
    return replace(plan, ops=_replace_ops(plan, fill)), note


def _untie(plan: Plan, cfg: dict[str, Any]) -> tuple[Plan, str]:
    embed = next(op for op in plan.ops if isinstance(op, Copy) and op.name == "model.embed_tokens.weight")
    head = Copy("lm_head.weight", embed.shape, embed.dtype, embed.src, embed.values)
    config = plan.config | {"tie_word_embeddings": False}
    note = "lm_head.weight is written as a copy of the tied embeddings (llama.cpp's Qwen2-MoE needs its own)"
    return replace(plan, ops=(*plan.ops, head), config=config), note


def _qkv_bias(plan: Plan, cfg: dict[str, Any]) -> tuple[Plan, str]:
    c = plan.config
    head_dim = int(c["head_dim"])
    sizes = {"q": int(c["num_attention_heads"]) * head_dim, "k": int(c["num_key_value_heads"]) * head_dim}
    sizes["v"] = sizes["k"]
    dtype = str(next(op.dtype for op in plan.ops if op.name.endswith("self_attn.q_proj.weight")))
    ops: list[TensorOp] = []
    for op in plan.ops:
        ops.append(op)
        if op.name.endswith("self_attn.v_proj.weight"):  # after the layer's q/k/v weights
            layer = int(op.name.split(".")[2])
            ops += [Zeros(op.name.replace("v_proj.weight", f"{p}_proj.bias"), (n,), dtype, layer)
                    for p, n in sizes.items()]  # fmt: skip
    note = "q/k/v biases are written as zeros with qkv_bias true (vLLM's Qwen2-MoE always has them)"
    return replace(plan, ops=tuple(ops), config=c | {"qkv_bias": True}), note


FIXES: dict[str, Callable[[Plan, dict[str, Any]], tuple[Plan, str]]] = {
    "shared_pad": _shared_pad,
    "gate_fill": _gate_fill,
    "untie": _untie,
    "qkv_bias": _qkv_bias,
}

"""`upcycle verify`: prove on logits that an MoE computes what its dense source computed.

Two ways, same logits. `whole` loads both models with transformers and runs them. `layerwise`
(verify_layerwise.py) holds one layer at a time and also checks every copied tensor against its source.
`auto` takes whole when both models fit in the available memory, and layerwise otherwise.
"""

from __future__ import annotations

import gc
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import seeds
from ..dtypes import DTYPE_BYTES, TORCH_TO_ST
from ..errors import UpcycleError
from ..pages import release_unread_pages
from ..source import Checkpoint, public_name, resolve

if TYPE_CHECKING:
    from .verify_layerwise import LayerRow, TensorCheck

DTYPES = ("float32", "bfloat16", "float16")
MODES = ("auto", "whole", "layerwise")

# Unit roundoff of each compute dtype: half the distance from 1 to the next number (2^-(mantissa bits + 1)).
UNIT_ROUNDOFF = {"float32": 2.0**-24, "bfloat16": 2.0**-8, "float16": 2.0**-11}
# float32 keeps its absolute limits: a correct conversion differs there by float32 rounding alone (~1e-5).
# In bfloat16/float16 the MoE rounds where the dense model did not (each expert's weighted output is rounded
# to the dtype before the top-k sum), and this compounds over the layers: the limit is 16 unit roundoffs of
# the logit scale (max |dense logit|). Measured on SmolLM2-135M (README, benchmarks): a correct Qwen2-MoE
# conversion differs by 0.023 of the scale in bfloat16 (5.8 u) and 0.003 in float16 (6.2 u), about what
# running the dense model itself in that dtype costs against float32 (0.025-0.036 in bfloat16).
REDUCED_RTOL = 16
MIN_AGREEMENT = {"float32": 0.999, "bfloat16": 0.85, "float16": 0.95}
FLOAT32_ATOL = 1e-3
# One MoE block against the dense MLP on the same input: a relative limit on max |Δ| / max |dense MLP output|.
LAYER_RTOL = {"float32": 1e-5, "bfloat16": 16 * 2.0**-8, "float16": 16 * 2.0**-11}

MEMORY_ENV = "UPCYCLE_MEMORY_LIMIT"  # a size ("8GB", "500MB" or bytes): the memory verify may plan with
BASE_BYTES = 600 << 20  # the interpreter with torch and transformers imported
LOAD_OVERHEAD = 1.2  # transformers' loading (fusing experts, casting) on top of the weights, as measured
HEADROOM = 0.9  # plan with 90% of the available memory: other processes may grow meanwhile
MMAP_THRESHOLD = 1 << 20  # allocations from this size up get their own mapping, returned to the system on free


@dataclass(frozen=True)
class Limits:
    atol: float  # largest allowed max |Δlogits|, absolute
    min_agreement: float
    layer_rtol: float | None  # layerwise: largest allowed max |Δ| of an MoE block, relative to its output scale
    rule: str  # how atol was set, for the report

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def limits_for(
    dtype: str, logit_scale: float, *, atol: float | None, min_agreement: float | None, layerwise: bool = False
) -> Limits:
    """The limits of a dtype, with --atol/--min-agreement given explicitly taking precedence."""
    if atol is not None:
        applied, rule = atol, "given (--atol)"
    elif dtype == "float32":
        applied, rule = FLOAT32_ATOL, "float32"
    else:
        rtol = REDUCED_RTOL * UNIT_ROUNDOFF[dtype]
        applied, rule = rtol * logit_scale, f"{dtype}: {rtol:g} × max |dense logit| {logit_scale:.3g}"
    agreement = MIN_AGREEMENT[dtype] if min_agreement is None else min_agreement
    layer_rtol = LAYER_RTOL[dtype] if layerwise else None
    return Limits(atol=applied, min_agreement=agreement, layer_rtol=layer_rtol, rule=rule)


@dataclass(frozen=True)
class VerifyReport:
    dense: str
    moe: str
    moe_class: str
    tokens: int
    input: str  # "text:<file>" or "random:<seed>"
    dtype: str
    max_abs_diff: float | None  # None in mode "sources": the MoE is none of its sources, logits are not compared
    mean_kl: float | None  # mean over positions of KL(dense ‖ moe), in nats
    top1_agreement: float | None
    atol: float | None  # the limits applied (also in `limits`, with how they were set)
    min_agreement: float | None
    missing_keys: tuple[str, ...] = ()
    unexpected_keys: tuple[str, ...] = ()
    mode: str = "whole"  # "whole" | "layerwise" | "sources" (tensors against several --expert-from models)
    mode_note: str | None = None  # why auto chose layerwise
    logit_scale: float = 0.0  # max |dense logit|
    limits: Limits | None = None
    layers: tuple[LayerRow, ...] = ()  # layerwise: one row per decoder layer
    tensor_check: TensorCheck | None = None  # layerwise: the copied tensors against their source
    plan_exact: bool | None = None  # upcycle.json's claim: exact at init? (None: no upcycle.json)
    plan_why: str | None = None  # the plan's reason, so a non-exact method's failure surprises no one
    recorded: str | None = field(default=None)  # where the report was stored in MOE's folder, if it was

    @property
    def layers_passed(self) -> bool:
        return all(row.passed for row in self.layers)

    @property
    def passed(self) -> bool:
        if self.mode == "sources":
            return self.tensor_check is not None and self.tensor_check.passed
        return (
            not self.missing_keys
            and not self.unexpected_keys
            and self.max_abs_diff <= self.atol
            and self.top1_agreement >= self.min_agreement
            and self.layers_passed
            and (self.tensor_check is None or self.tensor_check.passed)
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["missing_keys"], d["unexpected_keys"] = list(self.missing_keys), list(self.unexpected_keys)
        d["limits"] = self.limits.to_dict() if self.limits else None
        d["layers"] = [asdict(row) | {"passed": row.passed} for row in self.layers]
        d["tensor_check"] = self.tensor_check.to_dict() if self.tensor_check is not None else None
        d["passed"] = self.passed
        d.pop("recorded")
        return d


# --- memory --------------------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    from ..compat import file_size

    try:
        size = int(text) if text.strip().isdigit() else file_size(text.strip())
    except (ValueError, TypeError):
        size = 0
    if not isinstance(size, int) or size <= 0:
        raise UpcycleError(f"{MEMORY_ENV}={text!r} is not a size such as 8GB or 500MB")
    return size


def available_memory() -> int:
    """Bytes this process can still take: MemAvailable, within the cgroup's limit; UPCYCLE_MEMORY_LIMIT overrides."""
    given = os.environ.get(MEMORY_ENV)
    if given:
        return parse_size(given)
    try:
        import psutil

        available = int(psutil.virtual_memory().available)
    except ImportError:
        available = _meminfo_available()
    return min(available, _cgroup_room())


def _meminfo_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 1 << 62  # unknown: do not refuse on a guess


def _cgroup_room() -> int:
    """Room left under a cgroup v2 memory limit (containers), or unlimited."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
    except (OSError, ValueError):
        return 1 << 62
    return 1 << 62 if limit == "max" else max(0, int(limit) - used)


def keep_heap_small() -> None:
    """Give tensors of 1 MiB and more their own mapping, so that freeing one returns its memory at once.

    glibc raises its mmap threshold each time a large block is freed, so later tensors come from the heap,
    which it seldom shrinks: loading a model (each expert cast, stacked, concatenated) or streaming layer after
    layer then leaves ~30% of what passed through resident. Fixing the threshold stops that (no-op off glibc).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, MMAP_THRESHOLD)  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def whole_model_bytes(dense: Checkpoint, moe: Checkpoint, dtype: str, tokens: int, vocab: int) -> int:
    """What a whole-model verify takes: the larger model's weights at the compute dtype (the two are loaded one
    after the other) with the loader's transient copies, both logits tensors, and the interpreter."""
    params = max(sum(math.prod(t.shape) for t in ckpt.tensors.values()) for ckpt in (dense, moe))
    weights = params * DTYPE_BYTES[TORCH_TO_ST[dtype]]
    activations = 3 * tokens * vocab * 4  # both models' logits, and the float32 head output being computed
    return int(weights * LOAD_OVERHEAD) + activations + BASE_BYTES


def choose_mode(mode: str, need: int, available: int) -> tuple[str, str | None]:
    from ..fmt import human_bytes

    fits = need <= available * HEADROOM
    if mode == "whole" and not fits:
        raise UpcycleError(
            f"loading the models whole needs ~{human_bytes(need)}, but {human_bytes(available)} is available; "
            "use --layerwise, which holds one layer at a time"
        )
    if mode == "auto" and not fits:
        note = f"loading the models whole needs ~{human_bytes(need)}, {human_bytes(available)} available"
        return "layerwise", note + ": verifying layer by layer"
    return ("whole" if mode == "auto" else mode), None


# --- inputs and comparison ---------------------------------------------------------------------------


def _load(src: str, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM

    folder = resolve(src).folder
    Checkpoint.open(folder)  # config and every shard readable and whole, else an error that names the file
    try:
        with warnings.catch_warnings():  # Qwen2-MoE's shared expert has size 0 on purpose (README); torch warns
            warnings.filterwarnings("ignore", "Initializing zero-element tensors is a no-op", UserWarning)
            model, info = AutoModelForCausalLM.from_pretrained(
                folder, dtype=getattr(torch, dtype), output_loading_info=True
            )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        if getattr(exc, "errno", None):
            raise  # the file system refused: the CLI names the file and says what to do
        raise UpcycleError(f"transformers could not load {src}: {exc}".splitlines()[0]) from None
    release_unread_pages(model, folder)  # the file pages of stacked experts and cast weights (upcycle/pages.py)
    return folder, model.eval(), info


def input_ids(dense_folder: Path, vocab_size: int, *, text: Path | None, tokens: int, seed: int):
    import torch

    if text is None:
        return torch.randint(0, vocab_size, (1, tokens), generator=seeds.generator(seed, "verify-tokens"))
    if not text.is_file():
        raise UpcycleError(f"--text {text} does not exist")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(dense_folder)
    except (OSError, ValueError) as exc:
        if getattr(exc, "errno", None):
            raise  # the file system refused: the CLI names the file and says what to do
        raise UpcycleError(f"the dense model has no usable tokenizer for --text: {exc}".splitlines()[0]) from None
    ids = tokenizer(text.read_text(errors="replace"), return_tensors="pt").input_ids[:, :tokens]
    if ids.shape[1] < 2:
        raise UpcycleError(f"--text {text} gives fewer than 2 tokens; give a longer text")
    return ids


def compare_logits(dense_logits, moe_logits, rows: int = 32) -> tuple[float, float, float]:
    """max |Δ|, mean KL(dense ‖ moe) and top-1 agreement over every position (float64, `rows` positions at a
    time, so a 150k vocabulary does not need several float64 copies of all the logits at once)."""
    import torch

    a_all, b_all = dense_logits.flatten(0, -2), moe_logits.flatten(0, -2)
    max_abs, kl_sum, agree = 0.0, 0.0, 0
    for start in range(0, a_all.shape[0], rows):
        a, b = a_all[start : start + rows].double(), b_all[start : start + rows].double()
        max_abs = max(max_abs, (a - b).abs().max().item())
        logp, logq = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
        kl_sum += (logp.exp() * (logp - logq)).sum(-1).clamp_min(0).sum().item()
        agree += int((a.argmax(-1) == b.argmax(-1)).sum().item())
    n = a_all.shape[0]
    return max_abs, kl_sum / n, agree / n


# --- the command ---------------------------------------------------------------------------------------


EXPERT_COUNTS = ("num_local_experts", "num_experts", "moe_num_experts", "n_routed_experts")


def expert_count(cfg) -> int:
    """Experts per MoE layer as the config names them (0 for a dense model)."""
    for name in EXPERT_COUNTS:
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 0


def check_pair(dense: str, moe: str, dense_cfg, moe_cfg) -> None:
    """Refuse a MOE that is no MoE, or one that cannot have been upcycled from DENSE (another shape or
    vocabulary), saying what it is: comparing such a pair can only report FAIL."""

    def shape(cfg) -> tuple:
        return tuple(getattr(cfg, name, None) for name in ("hidden_size", "num_hidden_layers", "vocab_size"))

    mine, theirs = shape(dense_cfg), shape(moe_cfg)
    what = f"a {moe_cfg.model_type} model with hidden size {theirs[0]}, {theirs[1]} layers"
    if not expert_count(moe_cfg):
        raise UpcycleError(
            f"{moe} is not an MoE ({what}, no experts); verify compares a dense model with an MoE upcycled from it"
        )
    if expert_count(dense_cfg):
        raise UpcycleError(f"{dense} is already an MoE ({dense_cfg.model_type}); give the dense model it was made from")
    if mine != theirs:
        raise UpcycleError(
            f"{moe} was not upcycled from {dense}: it is {what} and vocabulary {theirs[2]}; "
            f"{dense} is a {dense_cfg.model_type} model with hidden size {mine[0]}, {mine[1]} layers "
            f"and vocabulary {mine[2]}"
        )


def check_family(dense: str, moe: str, dense_type: str, moe_family: Any) -> None:
    """Refuse an MoE whose upcycle.json says it was made from another family than DENSE's."""
    from ..arch import families

    family = families().get(moe_family) if isinstance(moe_family, str) else None
    if family is not None and dense_type not in family.model_types:
        raise UpcycleError(
            f"{moe} was upcycled from a {moe_family} model (its upcycle.json says so), but {dense} is a "
            f"{dense_type} model; give the dense model it was made from"
        )


def verify(
    dense: str,
    moe: str,
    *,
    text: Path | None = None,
    tokens: int = 256,
    seed: int = 0,
    dtype: str = "float32",
    atol: float | None = None,
    min_agreement: float | None = None,
    mode: str = "auto",
    record: bool = False,
    notify: Callable[[str], None] | None = None,
    sources: tuple[str, ...] = (),
) -> VerifyReport:
    """Compare logits; with `record`, store the report in MOE's upcycle.json and model card (local folders).

    `atol`/`min_agreement` left as None take the limits of `dtype`; `notify` receives a one-line note when
    auto mode switches to layerwise. `sources`: the --expert-from models an MoE was made from (mode "sources":
    every tensor against its own source, layer by layer)."""
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our table is the report; per-tensor loading bars are noise here
    keep_heap_small()
    if dtype not in DTYPES:
        raise UpcycleError(f"--dtype {dtype!r} is not one of: {', '.join(DTYPES)}")
    if mode not in MODES:
        raise UpcycleError(f"verify mode {mode!r} is not one of: {', '.join(MODES)}")
    if tokens < 2:
        raise UpcycleError(f"--tokens {tokens} must be at least 2")
    dense_folder, moe_folder = resolve(dense).folder, resolve(moe).folder
    dense_ckpt, moe_ckpt = Checkpoint.open(dense_folder), Checkpoint.open(moe_folder)
    try:
        dense_cfg, moe_cfg = AutoConfig.from_pretrained(dense_folder), AutoConfig.from_pretrained(moe_folder)
    except (OSError, ValueError, KeyError) as exc:
        raise UpcycleError(f"transformers could not read a config: {exc}".splitlines()[0]) from None
    check_pair(dense, moe, dense_cfg, moe_cfg)
    vocab = dense_cfg.vocab_size
    limit = min(dense_cfg.max_position_embeddings, moe_cfg.max_position_embeddings)
    ids = input_ids(dense_folder, vocab, text=text, tokens=min(tokens, limit), seed=seed)

    from ..publish.card import read_recipe

    recipe = read_recipe(moe_folder)
    claim = (recipe or {}).get("plan") or {}
    plan_exact = claim.get("exact_at_init") if isinstance(claim.get("exact_at_init"), bool) else None
    check_family(dense, moe, dense_cfg.model_type, claim.get("family"))
    if sources or (recipe or {}).get("sources"):  # several source models: the tensors, each against its own
        return _record(verify_sources(dense, moe, dense_ckpt, moe_ckpt, recipe, sources, ids, dtype), record)

    need = whole_model_bytes(dense_ckpt, moe_ckpt, dtype, int(ids.numel()), vocab)
    chosen, note = choose_mode(mode, need, available_memory() if mode != "layerwise" else need)
    if note and notify:
        notify(note)
    layers: tuple[LayerRow, ...] = ()
    tensor_check = None
    if chosen == "whole":
        import torch

        with torch.no_grad():  # one model at a time: the dense one is gone before the MoE loads
            _, model, _ = _load(dense, dtype)
            a = model(input_ids=ids).logits
            del model
            gc.collect()  # a model holds reference cycles: free it now, not at some later collection
            _, model, info = _load(moe, dtype)
            b = model(input_ids=ids).logits
        moe_class = type(model).__name__
        del model
        missing = tuple(sorted(info.get("missing_keys", ())))
        unexpected = tuple(sorted(info.get("unexpected_keys", ())))
    else:
        from .verify_layerwise import check_tensors, conversion_plan, run_layerwise

        plan, spec = conversion_plan(dense_ckpt, moe_ckpt, recipe)
        strict = recipe is not None
        tensor_check = check_tensors(plan, dense_ckpt, moe_ckpt, strict_dtype=strict, seed=spec.seed)
        run = run_layerwise(dense_folder, moe_folder, ids, dtype, LAYER_RTOL[dtype])
        a, b, layers, moe_class = run.dense_logits, run.moe_logits, run.rows, run.moe_class
        missing, unexpected = run.missing_keys, run.unexpected_keys
    max_abs, kl, agree = compare_logits(a, b)
    scale = a.double().abs().max().item()
    limits = limits_for(dtype, scale, atol=atol, min_agreement=min_agreement, layerwise=chosen == "layerwise")
    report = VerifyReport(
        dense=dense,
        moe=moe,
        moe_class=moe_class,
        tokens=int(ids.numel()),
        input=f"text:{Path(text).name}" if text else f"random:{seed}",
        dtype=dtype,
        max_abs_diff=max_abs,
        mean_kl=kl,
        top1_agreement=agree,
        atol=limits.atol,
        min_agreement=limits.min_agreement,
        missing_keys=missing,
        unexpected_keys=unexpected,
        mode=chosen,
        mode_note=note,
        logit_scale=scale,
        limits=limits,
        layers=layers,
        tensor_check=tensor_check,
        plan_exact=plan_exact,
        plan_why=(str(claim.get("exact_why") or "") or None) if plan_exact is not None else None,
    )
    return _record(report, record)


def _record(report: VerifyReport, record: bool) -> VerifyReport:
    """REPORT, stored in MOE's upcycle.json and card with `record` (a local folder with an upcycle.json)."""
    dense, moe = report.dense, report.moe
    if record and Path(moe).is_dir():
        from dataclasses import replace

        from ..publish.card import read_recipe, update_recipe

        if read_recipe(Path(moe)) is not None:
            try:
                # what is recorded may be published: local models by their folder name, never their path
                public = {"dense": public_name(dense), "moe": Path(moe).name}
                card = update_recipe(Path(moe), verify=report.to_dict() | public)
            except OSError as exc:  # a read-only folder: the check itself still stands
                return replace(report, recorded=f"not recorded ({exc.strerror})")
            report = replace(report, recorded="upcycle.json and README.md" if card else "upcycle.json")
    return report


def verify_sources(
    dense: str, moe: str, dense_ckpt: Checkpoint, moe_ckpt: Checkpoint, recipe: dict[str, Any] | None,
    sources: tuple[str, ...], ids, dtype: str,
) -> VerifyReport:  # fmt: skip
    """An MoE made from several models (--expert-from): each expert's FFN against its source's, every other tensor
    against BASE's or the float32 mean, tensor by tensor, one layer's FFN per source in memory."""
    from .verify_layerwise import check_tensors, conversion_plan

    made_from = [s.get("id") for s in (recipe or {}).get("sources") or []]
    names = ", ".join(map(str, made_from))
    if not made_from:
        raise UpcycleError(f"{moe} was not made from --expert-from models (its upcycle.json lists none); "
                           "leave --expert-from out")  # fmt: skip
    if len(sources) != len(made_from):
        raise UpcycleError(
            f"{moe} was made from {len(made_from)} --expert-from models ({names}), but {len(sources)} were given; "
            "give each, in order, with --expert-from"
        )
    for i, (given, recorded) in enumerate(zip(sources, made_from, strict=True)):
        if public_name(given) != recorded:
            raise UpcycleError(
                f"--expert-from {given} is not what {moe}'s experts of source {i + 1} came from ({recorded}); "
                f"give them in order: {names}"
            )
    others = tuple(Checkpoint.open(resolve(s).folder) for s in sources)
    plan, spec = conversion_plan(dense_ckpt, moe_ckpt, recipe)
    check = check_tensors(plan, dense_ckpt, moe_ckpt, strict_dtype=True, seed=spec.seed, others=others)
    claim = (recipe or {}).get("plan") or {}
    return VerifyReport(
        dense=dense, moe=moe, moe_class=plan.architecture, tokens=0, input="tensors", dtype=dtype,
        max_abs_diff=None, mean_kl=None, top1_agreement=None, atol=None, min_agreement=None,
        missing_keys=check.missing, unexpected_keys=check.unexpected, mode="sources", tensor_check=check,
        plan_exact=claim.get("exact_at_init"), plan_why=claim.get("exact_why"),
    )  # fmt: skip

"""What the user asked for: the conversion recipe, from flags and/or a YAML file."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args

from ..arch import GENERIC, targets
from ..errors import UpcycleError
from ..options import dtype_name, merge_options, read_yaml_options
from ..source import public_name
from .methods import LAYOUTS
from .serving import DEFAULT as DEFAULT_SERVE
from .serving import parse_serve

RouterInit = Literal["random", "zero", "kmeans", "hidden", "cheap_embed"]
SharedWeights = Literal["base", "average"]
Routing = Literal["topk-softmax", "softmax-topk"]
SplitBy = Literal["random", "cluster", "coactivation"]
FineGrainedScale = Literal["down", "cube-root"]
DType = Literal["auto", "bfloat16", "float16", "float32"]
CalibrationDType = Literal["float32", "source", "bfloat16"]  # the dtype the dense model runs in for calibration


# --init and --target choices are the registries' keys: a method in methods.LAYOUTS, a target in targets/*.json
CHOICES = {
    "init": LAYOUTS.keys(),  # a live view: a method registered later is a choice too
    "router_init": get_args(RouterInit),
    "routing": get_args(Routing),
    "target": ("auto", *targets(), GENERIC),
    "dtype": get_args(DType),
    "shared_weights": get_args(SharedWeights),
    "calibration_dtype": get_args(CalibrationDType),
}
PROMPTED = ("hidden", "cheap_embed")  # router inits made from --expert-prompts
NUMBERS = {
    "experts": int,
    "top_k": int,
    "every": int,
    "seed": int,
    "router_std": (int, float),
    "shared_experts": int,
    "calibration_tokens": int,
}
# Method options: None means "not given" (each has a default under the --init it belongs to, see below).
METHOD_NUMBERS = {"drop_ratio": (int, float), "noise": (int, float), "granularity": int}
# option -> the --init values it applies to
APPLIES_TO = {
    "split_by": ("split",),
    "drop_ratio": ("drop",),
    "noise": ("clone",),
    "granularity": ("fine-grained",),
    "fine_grained_scale": ("fine-grained",),
}
DEFAULT_SPLIT_BY, DEFAULT_DROP_RATIO = "random", 0.5
# Settled by benchmarks/fine_grained_scale.py (see benchmarks/README.md): exact, and no worse after training.
DEFAULT_FINE_GRAINED_SCALE = "down"
# the method options' defaults under their --init (the fields themselves default to None: "not given")
METHOD_DEFAULTS = {
    "split_by": DEFAULT_SPLIT_BY,
    "drop_ratio": DEFAULT_DROP_RATIO,
    "fine_grained_scale": DEFAULT_FINE_GRAINED_SCALE,
}


@dataclass(frozen=True)
class ConvertSpec:
    """Every option of `upcycle convert`; the field names are the YAML keys and the flag names."""

    experts: int = 8
    top_k: int = 2
    every: int = 1
    layers: tuple[int, ...] | None = None
    init: str = "clone"  # a key of methods.LAYOUTS
    router_init: RouterInit = "random"
    router_std: float = 0.02
    calibration: str | None = None  # text file for --router-init kmeans and --split-by coactivation
    calibration_tokens: int = 4096
    calibration_dtype: CalibrationDType = "float32"  # float32, the source's own floating dtype, or bfloat16
    routing: Routing = "topk-softmax"
    split_by: SplitBy | None = None
    drop_ratio: float | None = None
    noise: float | None = None
    granularity: int | None = None
    fine_grained_scale: FineGrainedScale | None = None
    expert_prompts: str | None = None  # YAML/JSON file for --router-init hidden / cheap_embed
    expert_from: tuple[str, ...] = ()  # models whose FFNs become the experts (BTX), in order; () = SRC alone
    shared_weights: SharedWeights = "base"  # non-expert tensors: BASE's, or the float32 mean of the --expert-from
    shared_from: str | None = None  # with --expert-from: whose FFN is the shared expert ("base" or an --expert-from)
    shared_experts: int = 0
    seed: int = 0
    target: str = "auto"  # auto, a targets/*.json name, or generic
    dtype: DType = "auto"
    max_shard_size: str = "5GB"
    revision: str | None = None
    serve: tuple[str, ...] = DEFAULT_SERVE  # the engines the output must load in (convert/serving.py)
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "serve", parse_serve(self.serve))
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                raise UpcycleError(
                    f"--{name.replace('_', '-')} {getattr(self, name)!r} is not one of: {', '.join(choices)}"
                )
        for name, kind in NUMBERS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, kind):
                what = "a whole number" if kind is int else "a number"
                raise UpcycleError(f"--{name.replace('_', '-')} {value!r} must be {what}")
        if self.experts < 2:
            raise UpcycleError(f"--experts {self.experts}: an MoE layer needs at least 2 experts")
        if not 1 <= self.top_k <= self.experts:
            raise UpcycleError(f"--top-k {self.top_k} must be between 1 and --experts ({self.experts})")
        if self.every < 1:
            raise UpcycleError(f"--every {self.every} must be 1 or more (1 = every layer, 2 = every other)")
        if self.router_std < 0:
            raise UpcycleError(f"--router-std {self.router_std} must not be negative")
        self._check_calibration()
        self._check_sources()
        if self.layers is not None and not self.layers:
            raise UpcycleError("--layers is empty; list layer indices such as 1,5,9")
        self._check_method_options()

    def _check_calibration(self) -> None:
        users = [
            flag
            for flag, used in (
                ("--router-init kmeans", self.router_init == "kmeans"),
                ("--split-by coactivation", self.split_by == "coactivation"),
            )
            if used
        ]
        if users and not self.calibration:
            raise UpcycleError(f"{users[0]} needs calibration text: give --calibration FILE (a plain text file)")
        if self.calibration and not users:
            raise UpcycleError(
                "--calibration applies to --router-init kmeans or --split-by coactivation, "
                f"not --router-init {self.router_init}"
            )
        if self.router_init in PROMPTED and not self.expert_prompts:
            raise UpcycleError(
                f"--router-init {self.router_init} needs --expert-prompts FILE: a YAML list with one list of prompts "
                "per expert" + (" (or per --expert-from source)" if self.expert_from else "")
            )
        if self.expert_prompts and self.router_init not in PROMPTED:
            raise UpcycleError(
                f"--expert-prompts applies to --router-init hidden or cheap_embed, not --router-init {self.router_init}"
            )
        if self.calibration_tokens < 1:
            raise UpcycleError(f"--calibration-tokens {self.calibration_tokens} must be 1 or more")
        if self.calibration_dtype != "float32" and not (self.calibration or self.expert_prompts):
            raise UpcycleError(
                f"--calibration-dtype {self.calibration_dtype} applies only where the dense model is run: with "
                "--calibration or --expert-prompts"
            )

    def _check_sources(self) -> None:
        """--expert-from and what goes with it (the checks that need the models are in convert/sources.py)."""
        n = len(self.expert_from)
        if self.shared_from is not None and not n:
            raise UpcycleError("--shared-from applies to --expert-from (the shared expert is one of several models); "
                               "without --expert-from, --shared-experts 1 puts SRC's FFN there")  # fmt: skip
        if not n:
            if self.shared_weights != "base":
                raise UpcycleError(
                    f"--shared-weights {self.shared_weights} averages the --expert-from models; give two or more "
                    "--expert-from models, or leave --shared-weights out"
                )
            return
        if self.experts % n:
            raise UpcycleError(
                f"--experts {self.experts} is not a multiple of the {n} --expert-from models; give --experts "
                f"{n * max(1, self.experts // n)} or {n * (self.experts // n + 1)} (the same number from each)"
            )
        if self.router_init == "kmeans":
            raise UpcycleError(
                "--router-init kmeans gives each expert a cluster of BASE's hidden states, not its source's; with "
                "--expert-from use hidden or cheap_embed (with --expert-prompts), random or zero"
            )
        if self.shared_experts and self.shared_from is None:
            raise UpcycleError(
                "--shared-experts with --expert-from needs --shared-from MODEL (base, or one of the --expert-from "
                "models): whose FFN the always-on shared expert is"
            )
        if self.shared_from is not None and self.shared_experts != 1:
            raise UpcycleError(f"--shared-from fills one shared expert; --shared-experts {self.shared_experts} "
                               "cannot be honoured: leave it out (or give 1)")  # fmt: skip
        if self.shared_from is not None and self.init != "clone":
            raise UpcycleError(f"--shared-from puts a whole FFN in the shared expert, which --init clone does; "
                               f"--init {self.init} is not supported with it")  # fmt: skip

    @property
    def shared_source(self) -> int:
        """The source index of --shared-from: 0 BASE, i the i-th --expert-from (matched by public name)."""
        if self.shared_from in (None, "base"):
            return 0
        names = [public_name(s) for s in self.expert_from]
        if public_name(self.shared_from) not in names:
            raise UpcycleError(
                f"--shared-from {self.shared_from} is neither base nor one of the --expert-from models "
                f"({', '.join(names)}); give base or one of them"
            )
        return 1 + names.index(public_name(self.shared_from))

    def _check_method_options(self) -> None:
        """Checks of the method options that need no model (those that do live in the methods, at plan time)."""
        if self.split_by is not None and self.split_by not in get_args(SplitBy):
            raise UpcycleError(f"--split-by {self.split_by!r} is not one of: {', '.join(get_args(SplitBy))}")
        scales = get_args(FineGrainedScale)
        if self.fine_grained_scale is not None and self.fine_grained_scale not in scales:
            raise UpcycleError(f"--fine-grained-scale {self.fine_grained_scale!r} is not one of: {', '.join(scales)}")
        for name, kind in METHOD_NUMBERS.items():
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
                what = "a whole number" if kind is int else "a number"
                raise UpcycleError(f"--{name.replace('_', '-')} {value!r} must be {what}")
        for name, inits in APPLIES_TO.items():
            if getattr(self, name) is not None and self.init not in inits:
                raise UpcycleError(
                    f"--{name.replace('_', '-')} applies to --init {' or '.join(inits)}, not --init {self.init}"
                )
        if self.drop_ratio is not None and not 0 < self.drop_ratio < 1:
            raise UpcycleError(
                f"--drop-ratio {self.drop_ratio} must lie strictly between 0 and 1 (0.5: half the neurons)"
            )
        if self.noise is not None and self.noise <= 0:
            raise UpcycleError(f"--noise {self.noise} must be positive (the std of the multiplicative noise)")
        if self.shared_experts < 0:
            raise UpcycleError(f"--shared-experts {self.shared_experts} must be 0 or more")

    @property
    def split_method(self) -> str:
        return self.split_by or DEFAULT_SPLIT_BY

    @property
    def scale_mode(self) -> str:
        return self.fine_grained_scale or DEFAULT_FINE_GRAINED_SCALE

    @property
    def drop(self) -> float:
        return DEFAULT_DROP_RATIO if self.drop_ratio is None else float(self.drop_ratio)

    @property
    def renormalize(self) -> bool:
        """Are the kept top-k routing weights renormalised to sum to one?"""
        return self.routing == "topk-softmax"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        d["layers"] = list(self.layers) if self.layers is not None else None
        d["serve"] = list(self.serve)
        for name in ("calibration", "expert_prompts"):  # a file name, never a local path
            if d[name]:
                d[name] = Path(d[name]).name
        d["expert_from"] = [public_name(s) for s in self.expert_from]  # Hub ids as given, folders by name
        d["shared_from"] = public_name(self.shared_from) if self.shared_from else None
        return d


def parse_layers(text: str | list[int] | tuple[int, ...] | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    items = list(text) if isinstance(text, list | tuple) else [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        return tuple(sorted({int(i) for i in items}))
    except ValueError:
        raise UpcycleError(f"--layers {text!r} must be a comma-separated list of layer indices, e.g. 1,5,9") from None


def load_recipe(path: Path) -> dict[str, Any]:
    """Read a YAML recipe; its keys are ConvertSpec fields (dashes or underscores)."""
    return read_yaml_options(path, "recipe")


def build_spec(recipe: dict[str, Any] | None = None, **flags: Any) -> ConvertSpec:
    """Defaults, then the recipe, then flags that were given (not None): later wins."""
    merged = merge_options({f.name for f in fields(ConvertSpec)} - {"extra"}, recipe, "recipe", flags)
    if "layers" in merged:
        merged["layers"] = parse_layers(merged["layers"])
    if merged.get("shared_from") is not None and merged.get("shared_experts") is None:
        merged["shared_experts"] = 1  # --shared-from fills the one shared expert
    if "expert_from" in merged:
        value = merged["expert_from"]
        merged["expert_from"] = (value,) if isinstance(value, str) else tuple(value or ())
    for name, kind in (NUMBERS | METHOD_NUMBERS).items():  # YAML reads `experts: 8.0` as a float: a whole number
        value = merged.get(name)
        if kind is int and isinstance(value, float) and value.is_integer():
            merged[name] = int(value)
    if "dtype" in merged:
        merged["dtype"] = dtype_name(merged["dtype"])
    try:
        return ConvertSpec(**merged)
    except TypeError as exc:
        raise UpcycleError(f"bad recipe value: {exc}") from None

"""What the user asked for: the conversion recipe, from flags and/or a YAML file."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args

from ..errors import UpcycleError

Init = Literal["clone"]
RouterInit = Literal["random", "zero"]
TargetName = Literal["auto", "mixtral", "qwen2_moe", "qwen3_moe"]
DType = Literal["auto", "bfloat16", "float16", "float32"]


CHOICES = {
    "init": get_args(Init),
    "router_init": get_args(RouterInit),
    "target": get_args(TargetName),
    "dtype": get_args(DType),
}
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
NUMBERS = {"experts": int, "top_k": int, "every": int, "seed": int, "router_std": (int, float)}


@dataclass(frozen=True)
class ConvertSpec:
    """Every option of `upcycle convert`; the field names are the YAML keys and the flag names."""

    experts: int = 8
    top_k: int = 2
    every: int = 1
    layers: tuple[int, ...] | None = None
    init: Init = "clone"
    router_init: RouterInit = "random"
    router_std: float = 0.02
    seed: int = 0
    target: TargetName = "auto"
    dtype: DType = "auto"
    max_shard_size: str = "5GB"
    revision: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
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
        if self.layers is not None and not self.layers:
            raise UpcycleError("--layers is empty; list layer indices such as 1,5,9")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        d["layers"] = list(self.layers) if self.layers is not None else None
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
    import yaml

    if not path.is_file():
        raise UpcycleError(f"recipe {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UpcycleError(f"recipe {path} is not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise UpcycleError(f"recipe {path} must be a mapping of option: value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def build_spec(recipe: dict[str, Any] | None = None, **flags: Any) -> ConvertSpec:
    """Defaults, then the recipe, then flags that were given (not None): later wins."""
    known = {f.name for f in fields(ConvertSpec)} - {"extra"}
    merged: dict[str, Any] = {}
    for source, values in (("recipe", recipe or {}), ("flag", flags)):
        for key, value in values.items():
            if key not in known:
                if source == "recipe":
                    raise UpcycleError(f"unknown key {key!r} in the recipe; known keys: {', '.join(sorted(known))}")
                continue
            if value is not None:
                merged[key] = value
    if "layers" in merged:
        merged["layers"] = parse_layers(merged["layers"])
    for name, kind in NUMBERS.items():  # YAML reads `experts: 8.0` as a float; it is still a whole number
        value = merged.get(name)
        if kind is int and isinstance(value, float) and value.is_integer():
            merged[name] = int(value)
    if isinstance(merged.get("dtype"), str):
        merged["dtype"] = DTYPE_ALIASES.get(merged["dtype"], merged["dtype"])
    try:
        return ConvertSpec(**merged)
    except TypeError as exc:
        raise UpcycleError(f"bad recipe value: {exc}") from None

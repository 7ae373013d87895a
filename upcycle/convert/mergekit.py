"""`upcycle convert --mergekit-config moe.yml OUT`: a mergekit-moe recipe, read as it is.

Each field of mergekit-moe's YAML (mergekit/moe/config.py) is mapped to upcycle's options, or refused when upcycle
cannot do what mergekit would; every refused field is named, in one line, with why:

| mergekit field | upcycle |
|---|---|
| `base_model` | SRC |
| `experts[].source_model` | one `--expert-from` per expert, in order (a model named twice is read once) |
| `experts[].positive_prompts` | `--expert-prompts` (one list per expert) |
| `gate_mode` | `--router-init`: hidden, cheap_embed, random (uniform_random is refused) |
| `dtype` | `--dtype` |
| `experts_per_token` | `--top-k` (mergekit's default 2; a whole number from 1 to the number of experts) |
| `shared_experts` (one) | `--shared-from` its source_model, `--target qwen2_moe` |
| `architecture` | `--target`: mixtral, qwen (qwen2_moe) |

Refused: `negative_prompts`, `noise_scale`, `residual_scale` (other than 1), the shared expert's prompts (its gate
starts at zero here), more than one shared expert, `gate_mode: uniform_random`, other architectures, fewer than 2
experts, prompts that are not a list of strings, and any field mergekit does not have.

A conversion keeps the YAML in OUT as `mergekit_moe_config.yml` (its models named as the recorded command names
them: Hub ids as given, local folders by their name), and the recorded command converts from that copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UpcycleError
from ..source import public_name

TOP = {"base_model", "experts", "gate_mode", "dtype", "experts_per_token", "shared_experts", "architecture"}
EXPERT = {"source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale"}
GATES = {"hidden": "hidden", "cheap_embed": "cheap_embed", "random": "random"}
TARGETS = {"mixtral": "mixtral", "qwen": "qwen2_moe"}
DTYPES = ("float32", "float16", "bfloat16")
RECORDED = "mergekit_moe_config.yml"  # the copy kept in OUT, which the recorded command names
PROMPTS = "mergekit_moe_prompts.yaml"  # the experts' positive prompts as an --expert-prompts file


@dataclass(frozen=True)
class MergekitRecipe:
    """What a mergekit-moe YAML asks for, as upcycle's SRC, options and per-expert prompts."""

    base: str
    options: dict[str, Any]
    prompts: list[list[str]] | None  # one list per expert (gate modes that read prompts)


def read_mergekit(path: Path) -> MergekitRecipe:
    import yaml

    name = f"--mergekit-config {path.name}"
    if not path.is_file():
        raise UpcycleError(f"{name}: no such file; give a mergekit-moe YAML file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        raise UpcycleError(f"{name} is not valid YAML; give a mergekit-moe config (base_model, experts, ...)") from None
    if not isinstance(data, dict) or not isinstance(data.get("base_model"), str) or not data.get("experts"):
        raise UpcycleError(f"{name} needs base_model (a model id or folder) and a non-empty list of experts")
    refused: list[str] = [f"{k} (not a mergekit-moe field)" for k in data if k not in TOP]
    options: dict[str, Any] = {}
    gate = str(data.get("gate_mode", "hidden"))  # mergekit's default
    if gate in GATES:
        options["router_init"] = GATES[gate]
    else:
        refused.append(f"gate_mode {gate} (upcycle has hidden, cheap_embed and random)")
    if data.get("dtype") is not None:
        if data["dtype"] in DTYPES:
            options["dtype"] = data["dtype"]
        else:
            refused.append(f"dtype {data['dtype']} (give float32, float16 or bfloat16)")
    experts = data["experts"] if isinstance(data["experts"], list) else []
    if not experts:
        refused.append("experts (give a list of entries, each with a source_model)")
    elif len(experts) < 2:
        refused.append(f"experts (upcycle makes an MoE of 2 experts or more; this recipe has {len(experts)})")
    sources, prompts, malformed = [], [], set()
    for i, expert in enumerate(experts):
        if not isinstance(expert, dict) or not isinstance(expert.get("source_model"), str):
            refused.append(f"experts[{i}] (needs a source_model)")
            continue
        sources.append(expert["source_model"])
        given, bad = prompt_list(expert.get("positive_prompts"), f"experts[{i}].positive_prompts")
        prompts.append(given)
        malformed |= {i} if bad else set()
        refused += bad + expert_refusals(expert, f"experts[{i}]")
    options["expert_from"] = tuple(sources)
    options["experts"] = len(sources)
    per_token = data.get("experts_per_token", 2)  # mergekit's default
    if isinstance(per_token, int) and not isinstance(per_token, bool) and 1 <= per_token <= max(len(sources), 1):
        options["top_k"] = per_token
    elif sources:
        refused.append(f"experts_per_token {per_token} (give a whole number from 1 to the {len(sources)} experts)")
    refused += shared_options(data.get("shared_experts"), options)
    if options.get("shared_from") == data["base_model"]:
        options["shared_from"] = "base"
    arch = data.get("architecture")
    if arch is not None:
        if arch in TARGETS and not (arch == "mixtral" and "shared_from" in options):
            options["target"] = TARGETS[arch]
        else:
            refused.append(f"architecture {arch} (upcycle writes mixtral, or qwen with one shared expert)")
    needs_prompts = options.get("router_init") in ("hidden", "cheap_embed")
    if needs_prompts:
        refused += [f"experts[{i}] (gate_mode {gate} needs positive_prompts)" for i, p in enumerate(prompts)
                    if not p and i not in malformed]  # fmt: skip
    if refused:
        raise UpcycleError(f"{name}: cannot honour " + "; ".join(refused))
    return MergekitRecipe(data["base_model"], options, prompts if needs_prompts else None)


def prompt_list(given: Any, where: str) -> tuple[list[str], list[str]]:
    """An entry's positive_prompts as a list of strings, or the refusal (mergekit wants a list of strings too)."""
    if given is None:
        return [], []
    if not isinstance(given, list) or not all(isinstance(p, str) for p in given):
        return [], [f"{where} (give a list of prompt strings)"]
    return list(given), []


def expert_refusals(expert: dict[str, Any], where: str) -> list[str]:
    out = [f"{where}.{k} (not a mergekit-moe field)" for k in expert if k not in EXPERT]
    if expert.get("negative_prompts"):
        out.append(f"{where}.negative_prompts (upcycle's routers use positive prompts only)")
    if expert.get("noise_scale") is not None:
        out.append(f"{where}.noise_scale (upcycle adds no noise to a source's FFN; --noise is multiplicative)")
    if expert.get("residual_scale") not in (None, 1, 1.0):
        out.append(f"{where}.residual_scale (upcycle does not scale a source's down_proj)")
    return out


def shared_options(shared: Any, options: dict[str, Any]) -> list[str]:
    """`shared_experts`: at most one, whose FFN becomes Qwen2-MoE's shared expert (its gate starts at zero)."""
    if not shared:
        return []
    if not isinstance(shared, list) or len(shared) != 1 or not isinstance(shared[0], dict):
        return ["shared_experts (upcycle fills one shared expert: give a list of one)"]
    one = shared[0]
    out = expert_refusals(one, "shared_experts[0]")
    if one.get("positive_prompts"):
        out.append("shared_experts[0].positive_prompts (the shared expert's gate starts at zero: 1/2 for every token)")
    options["shared_from"] = one.get("source_model")
    options["target"] = "qwen2_moe"
    return out


def recipe_options(recipe: MergekitRecipe, folder: Path) -> dict[str, Any]:
    """The recipe's options, its prompts (if its gate reads them) written as FOLDER/PROMPTS for --expert-prompts."""
    import yaml

    options = dict(recipe.options)
    if recipe.prompts is not None:
        path = folder / PROMPTS
        path.write_text(yaml.safe_dump(recipe.prompts, allow_unicode=True), encoding="utf-8")
        options["expert_prompts"] = str(path)
    return options


def recorded_config(path: Path) -> str:
    """The YAML as kept in OUT: the same fields, every model named by `public_name` (never a local path)."""
    import yaml

    data = yaml.safe_load(path.read_text(encoding="utf-8"))  # read_mergekit accepted it already
    data["base_model"] = public_name(data["base_model"])
    for group in ("experts", "shared_experts"):
        for entry in data.get(group) or []:
            entry["source_model"] = public_name(entry["source_model"])
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def mapped_options(path: Path) -> dict[str, Any]:
    """What the YAML alone maps to, as ConvertSpec.to_dict() writes it: a recorded command gives only the flags
    that differ from these (the ones given beside --mergekit-config)."""
    from .spec import build_spec

    recipe = read_mergekit(path)
    options = dict(recipe.options)
    if recipe.prompts is not None:
        options["expert_prompts"] = PROMPTS
    return build_spec(options).to_dict()

"""YAML option files (convert recipes, train run configs): one reader, errors that name line and column."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import UpcycleError


def read_yaml_options(path: Path, what: str) -> dict[str, Any]:
    """The mapping in the YAML file PATH, keys with dashes turned into underscores; `what` names it in errors."""
    import yaml

    if not path.is_file():
        raise UpcycleError(f"{what} {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UpcycleError(f"{what} {path} is not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise UpcycleError(f"{what} {path} must be a mapping of option: value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def merge_options(
    known: set[str], from_file: dict[str, Any] | None, what: str, flags: dict[str, Any]
) -> dict[str, Any]:
    """The spec builders' one rule: the file's options (a recipe, a run config), then the flags that were given
    (not None); later wins. An unknown key in the file is an error naming `what`; flags are the spec's own."""
    merged: dict[str, Any] = {}
    for source, values in (("file", from_file or {}), ("flag", flags)):
        for key, value in values.items():
            if key not in known:
                if source == "file":
                    raise unknown_key(key, known, what)
                continue
            if value is not None:
                merged[key] = value
    return merged


# One dtype vocabulary for every command: torch's names, each with its short alias, both accepted everywhere.
# Each spec keeps the spelling its outputs have always shown (convert, verify, routing: bfloat16; train: bf16).
DTYPE_SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
DTYPE_LONG = {short: name for name, short in DTYPE_SHORT.items()}


def dtype_name(value: Any) -> Any:
    """'bf16' or 'bfloat16' -> 'bfloat16'; anything else unchanged (its option's check refuses it)."""
    return DTYPE_LONG.get(value, value) if isinstance(value, str) else value


def dtype_short(value: Any) -> Any:
    """'bfloat16' or 'bf16' -> 'bf16'; anything else unchanged (its option's check refuses it)."""
    return DTYPE_SHORT.get(value, value) if isinstance(value, str) else value


def command_line(words: list[str], options: dict[str, Any], defaults: dict[str, Any]) -> str:
    """The `upcycle ...` command that reproduces a result (convert's and train's, in upcycle.json and the card):
    WORDS, then each option that differs from its default (None: not given) as a flag: `--name value`, a switch
    that is on as `--name`, a list as `1,2,3`. Callers pass names through source.public_name first."""
    parts = list(words)
    for key, value in options.items():
        if value is None or value == defaults.get(key):
            continue
        flag = f"--{key.replace('_', '-')}"
        if value is True:
            parts.append(flag)
            continue
        if isinstance(value, list | tuple):
            value = ",".join(map(str, value))
        parts.append(f"{flag} {value}")
    return " ".join(parts)


def unknown_key(key: str, known: set[str], what: str) -> UpcycleError:
    """The error for a key that is no option: the nearest known key first (a typo such as `topk`), then all."""
    from difflib import get_close_matches

    near = get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    if not near:  # `topk` vs `top_k`: compare without underscores too
        bare = {k.replace("_", ""): k for k in known}
        near = [bare[m] for m in get_close_matches(key.replace("_", ""), sorted(bare), n=1, cutoff=0.75)]
    hint = f"did you mean {near[0]!r}? " if near else ""
    return UpcycleError(f"unknown key {key!r} in the {what}; {hint}known keys: {', '.join(sorted(known))}")

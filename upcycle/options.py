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


def unknown_key(key: str, known: set[str], what: str) -> UpcycleError:
    """The error for a key that is no option: the nearest known key first (a typo such as `topk`), then all."""
    from difflib import get_close_matches

    near = get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    if not near:  # `topk` vs `top_k`: compare without underscores too
        bare = {k.replace("_", ""): k for k in known}
        near = [bare[m] for m in get_close_matches(key.replace("_", ""), sorted(bare), n=1, cutoff=0.75)]
    hint = f"did you mean {near[0]!r}? " if near else ""
    return UpcycleError(f"unknown key {key!r} in the {what}; {hint}known keys: {', '.join(sorted(known))}")

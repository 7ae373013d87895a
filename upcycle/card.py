"""The model card (README.md) written beside a converted model, built with huggingface_hub's ModelCard."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

METHOD_TEXT = {"clone": "every expert is a copy of the dense FFN (sparse upcycling, Komatsuzaki et al. 2022)"}


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def human_bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def source_license(folder: Path) -> str | None:
    readme = Path(folder) / "README.md"
    if not readme.is_file():
        return None
    try:
        return ModelCard.load(readme).data.to_dict().get("license")
    except Exception:  # a malformed source card must not stop a conversion
        return None


def _layers_text(layers: list[int], num_layers: int) -> str:
    if len(layers) == num_layers:
        return "all"
    return ", ".join(map(str, layers))


def build_card(recipe: dict[str, Any], out_name: str) -> ModelCard:
    """`recipe` is the content of upcycle.json."""
    src, spec, plan = recipe["source"], recipe["recipe"], recipe["plan"]
    source_id = src["id"]
    is_hub_id = src["kind"] in ("hub", "gguf") and "/" in source_id and not Path(source_id).exists()
    tags = ["moe", "upcycled", "upcycle", "mixture-of-experts", plan["target"]]
    data = ModelCardData(
        base_model=source_id if is_hub_id else None,
        library_name="transformers",
        license=src.get("license"),
        tags=tags,
        pipeline_tag="text-generation",
    )
    template = files("upcycle").joinpath("card_template.md").read_text()
    return ModelCard.from_template(
        data,
        template_str=template,
        model_name=out_name,
        source_id=source_id,
        source_link=f"https://huggingface.co/{source_id}" if is_hub_id else source_id,
        source_revision=src.get("revision"),
        family=plan["family"],
        architecture=plan["architecture"],
        init=spec["init"],
        method_text=METHOD_TEXT.get(spec["init"], spec["init"]),
        experts=plan["experts"],
        top_k=plan["top_k"],
        moe_layers_text=_layers_text(plan["moe_layers"], plan["layers"]),
        num_layers=plan["layers"],
        router_init=spec["router_init"],
        router_std=spec["router_std"],
        seed=spec["seed"],
        total_params=_count(plan["total_params"]),
        active_params=_count(plan["active_params"]),
        dense_params=_count(plan["dense_params"]),
        dtype=recipe["dtype"],
        size_text=human_bytes(plan["bytes"]),
        exact=plan["exact_at_init"],
        repo_hint=f"path/to/{out_name}",
        command=recipe["command"],
    )

"""The model card (README.md) of a converted model, built with huggingface_hub's ModelCard.

Training adds a `training` record to upcycle.json (`update_recipe(folder, training={...})`) with keys
`datasets` (list), `steps`, `tokens`, `seq_len`, `recipe` (option -> value), `final_eval` ({loss,
perplexity}), `expert_load` (rows of {layer, cv, max, min}) and `command`; the card then shows them.

The card is rendered from `upcycle.json`, so it can be rendered again when something is added to the
recipe (a verify result, the Hub repo it is pushed to). It is re-rendered only while it is exactly what
upcycle wrote: `upcycle.json` keeps the SHA-256 of the card it generated, and a card edited by hand is
left alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from importlib.resources import files
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from ..arch import GENERIC
from ..fmt import count, human_bytes
from ..outdir import current_umask
from ..source import looks_like_repo_id

RECIPE = "upcycle.json"
CARD = "README.md"
SHARED_TEXT = {
    "qwen2_moe": "none (Qwen2-MoE's always-on shared expert is written with size 0, so it adds nothing)",
    "hunyuan_v1_moe": "none (HunYuan-MoE's always-on shared MLP is written as zeros, so it adds nothing)",
}
# Peak RSS of a process that loads the MoE with AutoModelForCausalLM.from_pretrained (default load): about
# 0.4 GB for Python, torch and transformers plus 2.2 times the weights' size on disk. Measured (docs/convert.md,
# "Memory to load the MoE"): 0.37 GB for a 0.9 MB tiny MoE, 0.59 GB for 112 MB, 6.29 GB for the 2.77 GB
# SmolLM2 MoE.
LOAD_MEMORY_BASE, LOAD_MEMORY_FACTOR = 400_000_000, 2.2
METHOD_TEXT = {
    "clone": "every expert is a copy of the dense FFN (sparse upcycling, Komatsuzaki et al. 2022)",
    "split": (
        "the dense FFN's intermediate neurons are partitioned into disjoint groups, one expert each, grouped "
        "{split_by}; down_proj is rescaled so the parts add up to the dense FFN (LLaMA-MoE, Zhu et al. 2024)"
    ),
    "drop": (
        "every expert is a copy of the dense FFN with a random {drop_ratio:g} of its neurons (rows of gate/up, "
        "columns of down) re-initialised from a normal with the dense matrix's mean and std, drawn per expert "
        "(Drop-Upcycling, Nakamura et al. 2025)"
    ),
    "fine-grained": (
        "each dense FFN is cut into {granularity} contiguous parts of its neurons, each part replicated; the "
        "parts of one replica share a router row, so top-k keeps whole replicas, and down_proj is scaled by "
        "{granularity} (fine-grained upcycling as in Megatron-Core)"
    ),
}
SPLIT_BY_TEXT = {"random": "at random", "cluster": "by balanced k-means on the neurons' gate/up weight rows"}
NOISE_TEXT = "; each weight is then multiplied by an independent N(1, {noise:g}) draw"
SHARED_EXPERT_TEXT = {
    "split": (
        "Qwen2-MoE's always-on shared expert holds {shared} of the {parts} neuron groups; its sigmoid gate "
        "starts at zero and lets half through, so its down_proj is doubled"
    ),
    "full": (
        "the dense FFN, as Qwen2-MoE's always-on shared expert; its sigmoid gate starts at zero and lets half "
        "through, and the routed experts' down_proj is halved, so the two halves add up to the dense FFN"
    ),
}


def method_text(spec: dict[str, Any]) -> str:
    """What the expert method did, with its parameters (upcycle.json files from before a key existed: defaults)."""
    init = spec["init"]
    values = {
        "split_by": SPLIT_BY_TEXT.get(spec.get("split_by") or "random", spec.get("split_by")),
        "drop_ratio": spec.get("drop_ratio") or 0.5,
        "granularity": spec.get("granularity"),
    }
    text = METHOD_TEXT.get(init, init).format(**values)
    if spec.get("noise"):
        text += NOISE_TEXT.format(noise=spec["noise"])
    return text


def shared_text(spec: dict[str, Any], plan: dict[str, Any]) -> str:
    shared = spec.get("shared_experts") or 0
    if not shared:
        return SHARED_TEXT.get(plan["target"], "none")
    kind = "split" if spec["init"] == "split" else "full"
    return SHARED_EXPERT_TEXT[kind].format(shared=shared, parts=plan["experts"] + shared)


def source_license(folder: Path) -> str | None:
    readme = Path(folder) / CARD
    if not readme.is_file():
        return None
    try:
        return ModelCard.load(readme).data.to_dict().get("license")
    except Exception:  # a malformed source card must not stop a conversion
        return None


def hub_card_license(repo_id: str) -> str | None:
    """The license in the card of a Hub model that is in the local Hub cache; None if it is not (no network)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        path = try_to_load_from_cache(repo_id, CARD)
    except Exception:  # an odd repo id or cache layout must not stop a conversion
        return None
    return source_license(Path(path).parent) if isinstance(path, str) else None


def _base_model(source: dict[str, Any]) -> str | None:
    """The Hub model this one derives from. upcycle.json files written before `base_model` was recorded:
    Hub sources and embedded models name a Hub repo; a local folder or a .gguf file given by path does not."""
    if "base_model" in source:
        return source["base_model"]
    hub = source["kind"] in ("hub", "gguf") and looks_like_repo_id(source["id"]) and not Path(source["id"]).exists()
    return source["id"] if hub else None


def _source_md(source: dict[str, Any], base: str | None) -> str:
    if base == source["id"]:
        return f"[{base}](https://huggingface.co/{base})"
    local = f"`{source['id']}`"
    return f"{local}, made from [{base}](https://huggingface.co/{base})" if base else local


def _lineage(base: str | None, sources: list[dict[str, Any]]) -> list[str]:
    """The Hub's `base_model`: BASE and every --expert-from model that is a Hub repo (local folders cannot be
    named there), in order, once each. With more than one the Hub's relation is `merge`."""
    ids = [base] if base else []
    ids += [row["id"] for row in sources if row.get("hub")]
    return list(dict.fromkeys(ids))


def _expert_row(row: dict[str, Any]) -> dict[str, Any]:
    """One --expert-from model for the card: its link (Hub) or folder name, revision, experts and prompts."""
    link = f"[{row['id']}](https://huggingface.co/{row['id']})" if row.get("hub") else f"`{row['id']}`"
    revision = f" at `{row['revision'][:12]}`" if row.get("revision") else ""
    experts = row["experts"]
    span = str(experts[0]) if len(experts) == 1 else f"{experts[0]}–{experts[-1]}"
    prompts = "; ".join(p.replace("|", "\\|").replace("\n", " ") for p in row.get("prompts") or []) or "none"
    return {"source": link + revision, "experts": span, "prompts": prompts}


def build_card(recipe: dict[str, Any], name: str) -> ModelCard:
    """Render the card from the content of upcycle.json; `name` is the folder name, used until it is pushed."""
    src, spec, plan = recipe["source"], recipe["recipe"], recipe["plan"]
    repo_id = recipe.get("hub_repo")
    base = _base_model(src)
    lineage = _lineage(base, recipe.get("sources") or [])
    remote_code = plan["target"] == GENERIC  # upcycle's wrapper: its code ships in the folder
    tags = ["moe", "upcycled", "upcycle", "mixture-of-experts", plan["target"], *(["custom_code"] * remote_code)]
    data = ModelCardData(
        base_model=lineage[0] if len(lineage) == 1 else lineage or None,
        base_model_relation=("merge" if len(lineage) > 1 else "finetune") if lineage else None,
        library_name="transformers",
        license=src.get("license"),
        tags=tags,
        pipeline_tag="text-generation",
        datasets=recipe.get("training", {}).get("datasets") or None,
    )
    layers = plan["moe_layers"]
    moe_layers_text = (
        f"all {plan['layers']} layers"
        if len(layers) == plan["layers"]
        else f"{len(layers)} of {plan['layers']}: " + ", ".join(map(str, layers))
    )
    router_text = {
        "random": f"`random`: normal with std {spec['router_std']}, seed {spec['seed']}",
        "kmeans": f"`kmeans`: from the dense model's FFN inputs on `{spec.get('calibration')}`, seed {spec['seed']}",
    }.get(spec["router_init"], "`zero`: uniform routing at the start")
    template = files("upcycle.publish").joinpath("card_template.md").read_text()
    return ModelCard.from_template(
        data,
        template_str=template,
        model_name=repo_id or name,
        source_md=_source_md(src, base),
        source_revision=src.get("revision"),
        family=plan["family"],
        dense_params=count(plan["dense_params"]),
        architecture=plan["architecture"],
        remote_code=remote_code,
        init=spec["init"],
        method_text=method_text(spec),
        experts=plan["experts"],
        top_k=plan["top_k"],
        renormalized=spec.get("routing", "topk-softmax") == "topk-softmax",
        shared_text=shared_text(spec, plan),
        tool_version=recipe["tool"]["version"],
        moe_layers_text=moe_layers_text,
        router_text=router_text,
        total_params=count(plan["total_params"]),
        active_params=count(plan["active_params"]),
        dtype=recipe["dtype"],
        size_text=human_bytes(plan["bytes"]),
        exact=plan["exact_at_init"],
        exact_why=plan.get("exact_why"),
        method_exact=plan.get("method_exact", True),
        casts=[c["text"].replace("|", "\\|") for c in plan.get("casts", []) if "text" in c],  # inside a table
        lossy_casts=[c["text"] for c in plan.get("casts", []) if not c["exact"] and "text" in c],
        runs_in=_runs_in(plan),
        load_memory=human_bytes(int(LOAD_MEMORY_BASE + LOAD_MEMORY_FACTOR * plan["bytes"])),
        verify=recipe.get("verify"),
        expert_sources=[_expert_row(row) for row in recipe.get("sources") or []],
        shared_weights=recipe.get("shared_weights"),
        training=recipe.get("training"),
        repo_hint=repo_id or name,
        command=recipe["command"],
        mergekit_config=recipe.get("mergekit_config"),
    )


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes it private; keep the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def write_card_and_recipe(folder: Path, recipe: dict[str, Any]) -> None:
    """Write README.md and upcycle.json together; the recipe remembers which card it generated."""
    text = str(build_card(recipe, recipe.get("name") or Path(folder).name))
    recipe = recipe | {"card_sha256": _sha(text)}
    _atomic_write(Path(folder) / CARD, text)
    _atomic_write(Path(folder) / RECIPE, json.dumps(recipe, indent=2) + "\n")


def read_recipe(folder: Path) -> dict[str, Any] | None:
    path = Path(folder) / RECIPE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def card_is_generated(folder: Path, recipe: dict[str, Any]) -> bool:
    card = Path(folder) / CARD
    return card.is_file() and recipe.get("card_sha256") == _sha(card.read_text())


def update_recipe(folder: Path, **fields: Any) -> bool:
    """Add fields to upcycle.json and re-render the card if it was not edited. Returns True if it was."""
    recipe = read_recipe(folder)
    if recipe is None:
        return False
    regenerate = card_is_generated(folder, recipe)
    recipe |= fields
    if regenerate:
        write_card_and_recipe(folder, recipe)
    else:
        _atomic_write(Path(folder) / RECIPE, json.dumps(recipe, indent=2) + "\n")
    return regenerate


def _runs_in(plan_summary: dict[str, Any]) -> str:
    """The model card's "Runs in" line, from the plan summary's `serving` ("" for outputs made before it)."""
    rows = plan_summary.get("serving") or []
    how = {"tested": "run by upcycle's engine tests", "read": "from reading its code", "native": "native"}
    yes = [f"{r['engine']} ({how.get(r['evidence'], r['evidence'])})" for r in rows if r["loads"]]
    no = [f"not {r['engine']} ({r['why']})" for r in rows if not r["loads"]]
    return "; ".join([", ".join(yes)] * bool(yes) + no).replace("|", "\\|")
